"""Sampling defaults: what `slm generate`, `slmkit.generate` and `slm serve` do with a setting nobody gave.

`slm generate` and the Python API share one set, the same as `slmkit.infer.sampling.SamplingParams()`: greedy,
no filters, no penalties, so the same prompt gives the same text wherever it runs. `slm serve` follows OpenAI's
API where OpenAI's defaults differ (an OpenAI client's request means what it means at OpenAI). The table of both
is in docs/inference.md. Plain constants without imports: the CLI reads them to build `--help`, which must not
import torch.
"""

from __future__ import annotations

# ---- slm generate and slmkit.generate (and SamplingParams) ---------------------------------------------------
MAX_NEW_TOKENS = 128
TEMPERATURE = 0.0  # greedy
TOP_K: int | None = None
TOP_P: float | None = None
MIN_P: float | None = None
REPETITION_PENALTY = 1.0  # off
FREQUENCY_PENALTY = 0.0  # off
PRESENCE_PENALTY = 0.0  # off

# ---- slm serve: OpenAI's defaults where they differ ---------------------------------------------------------
OPENAI_TEMPERATURE = 1.0
OPENAI_TOP_P = 1.0  # the whole distribution: the same as no top-p
OPENAI_COMPLETION_MAX_TOKENS = 16  # /v1/completions; /v1/chat/completions defaults to the rest of the context
