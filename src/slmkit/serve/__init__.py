"""`slm serve`: an OpenAI-compatible HTTP server over `slmkit.infer.engine.Engine`."""
