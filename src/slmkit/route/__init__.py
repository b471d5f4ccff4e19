"""Routing between a small (weak) and a large (strong) model.

- :mod:`slmkit.route.router`: learned routers (features from the weak model's own hidden states, logistic
  regression or a small MLP), their directory format (``router.json`` + ``router.safetensors``), fingerprints
  of the models a router was trained for, and :func:`load_router`.
- :mod:`slmkit.route.items`: per-item quality and confidence of one model on eval tasks.
- :mod:`slmkit.route.metrics`: quality vs strong-call share curves, APGR, CPT and bootstrap intervals.
- :mod:`slmkit.route.train`: ``slm route train`` and ``slm route eval``.
- :mod:`slmkit.route.token`: token-level routing (R2R-style): the small model generates, unsure tokens come
  from the large one.
"""
