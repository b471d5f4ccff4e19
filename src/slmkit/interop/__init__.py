"""Interop: model directories (atomic, Hugging Face format), per-family specs, transformers and GGUF."""
