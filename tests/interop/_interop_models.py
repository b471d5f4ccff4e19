"""Tiny random Hugging Face models per family, built with transformers' own classes, and a fixture
that saves them (import `hf_dirs` into a test module to use it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slmkit_testing import run_slm

VOCAB = 320
SRC = Path(__file__).resolve().parents[2] / "src"


def run_cli(*args: object, timeout: float = 300):
    return run_slm(*args, timeout=timeout)


# (model_type, config kwargs); each case exercises one family switch
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "llama-smollm-tied-gqa": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama-mobilellm-deep-thin": (
        "llama",
        dict(
            tie_word_embeddings=True, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96
        ),
    ),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})),
    "llama-rope-dynamic": (
        "llama",
        dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            }
        ),
    ),
    "mistral-sliding": ("mistral", dict(sliding_window=5)),
    "qwen2": ("qwen2", dict()),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "gpt2": ("gpt2", dict()),
}


def hf_config(model_type: str, **overrides):
    import transformers

    if model_type == "gpt2":
        base = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Config(**{**base, **overrides})
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[model_type]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    if model_type == "mistral":
        base["sliding_window"] = None
    return cls(**{**base, **overrides})


def make_hf_model(model_type: str, seed: int = 0, **overrides):
    """A transformers model with every parameter (biases and norms included) randomised, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(model_type, **overrides)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 0.1))
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every CASES model saved with save_pretrained (lazily, once per session)."""
    root = tmp_path_factory.mktemp("hf")

    class Lazy(dict):
        def __missing__(self, case: str) -> Path:
            model_type, overrides = CASES[case]
            model = make_hf_model(model_type, **overrides)
            out = root / case
            model.save_pretrained(out)
            self[case] = out
            return out

    return Lazy()
