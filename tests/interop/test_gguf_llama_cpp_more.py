"""GGUF exports that only llama.cpp itself proves: yarn rope scaling on llama, qwen2, qwen3 and the expert architectures
(prompts longer than the original window), and the `mamba` / `mamba2` architectures. Each file is read back with
gguf.GGUFReader (runs everywhere) and, where the xllamacpp wheel is installed (tests/llamacpp_peer.py), run in libllama
with an f32 KV cache (logits of every prompt position against ours) and in llama-server (greedy decoding against ours).
Measured maxima are in docs/long-context.md, docs/interop.md and docs/architectures.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmkit.config import ModelConfig, preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import save_model
from slmkit.interop.gguf import export_gguf
from slmkit.models import build_model
from slmkit_testing import perturbed_saved as saved
from slmkit_testing import word_tokenizer

VOCAB = 320
ORIGINAL = 32  # yarn's original window; prompts run to 80
YARN = dict(type="yarn", factor=4.0, original_max_seq_len=ORIGINAL)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def attention_config(family: str, rope_scaling) -> ModelConfig:
    # head width 32 and theta 100 put yarn's ramp inside the rotated dimensions (dims 0 to 6 of 16 frequencies)
    extra = {"qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}.get(family, {})
    return preset("tiny", family=family, vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96,
                  max_seq_len=128, rope_theta=100.0, rope_scaling=rope_scaling, **extra)  # fmt: skip


def fields(path) -> dict:
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def llama_cpp_logits(path, prompt):
    from llamacpp_peer import available

    if not available():
        pytest.skip("xllamacpp (llama.cpp wheel) is not installed")
    from slmkit_testing import llama_cpp_eval

    llm, theirs = llama_cpp_eval(path, prompt)
    llm.close()
    return theirs


def greedy_agrees(path, model, prompt: list[int], n_new: int) -> bool:
    """llama-server's greedy continuation (its own decode loop: KV cache or recurrent state) equals ours."""
    from llamacpp_peer import llama_server_greedy
    from slmkit.infer.generate import generate_ids

    tokens, _ = llama_server_greedy(path, prompt, n_new)
    return tokens == list(generate_ids(model, prompt, n_new))


@pytest.mark.parametrize(
    "family, extra, attn_factor",
    [
        ("llama", {}, None),  # transformers' default attention factor 0.1 ln 4 + 1: no key
        ("qwen2", {}, None),
        ("qwen3", {}, None),
        ("llama", {"attention_factor": 1.3}, 1.3 / (0.1 * math.log(4) + 1)),
        ("qwen2", {"mscale": 0.8, "mscale_all_dim": 1.2, "beta_fast": 32, "beta_slow": 1},
         (0.08 * math.log(4) + 1) / (0.12 * math.log(4) + 1) / (0.1 * math.log(4) + 1)),
    ],
)  # fmt: skip
def test_yarn_export_runs_in_llama_cpp_with_our_logits(tmp_path, tokenizer_json, family, extra, attn_factor):
    model = saved(tmp_path, tokenizer_json, attention_config(family, {**YARN, **extra}), scale=0.3)
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    keys = fields(path)
    assert keys[f"{family}.rope.scaling.type"] == "yarn"
    assert keys[f"{family}.rope.scaling.factor"] == pytest.approx(4.0)
    assert keys[f"{family}.rope.scaling.original_context_length"] == ORIGINAL
    if attn_factor is None:
        assert f"{family}.rope.scaling.attn_factor" not in keys
    else:
        assert keys[f"{family}.rope.scaling.attn_factor"] == pytest.approx(attn_factor, rel=1e-6)

    prompt = torch.randint(1, VOCAB, (80,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
        plain = build_model(model.config.replace(rope_scaling=None)).eval()
        plain.load_state_dict(model.state_dict())
        unscaled = plain(torch.tensor([prompt]))[0].numpy()
    assert np.abs(unscaled - ours)[ORIGINAL:].max() > 1.0  # yarn moves these logits: the check below can fail
    theirs = llama_cpp_logits(path, prompt)
    assert np.abs(theirs - ours).max() < 1e-3  # measured 2.7e-5 to 3.1e-4 (logits up to about 10.9)
    assert greedy_agrees(path, model, prompt[:24], 24)  # decoding from 24 to 48, past the original window


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_yarn_mixture_of_experts_runs_in_llama_cpp_with_our_logits(tmp_path, tokenizer_json, family):
    """The same keys on llama.cpp's expert architectures (Mixtral as `llama`, `qwen2moe`, `olmoe`)."""
    import shutil

    from test_gguf_moe import CASES
    from test_moe_hf import random_moe

    model = random_moe(family, vocab_size=VOCAB, d_ff=32, max_seq_len=128, rope_theta=100.0, rope_scaling=YARN,
                       **CASES[family][1])  # fmt: skip
    save_model(model, tmp_path / "m")
    shutil.copy(tokenizer_json, tmp_path / "m" / "tokenizer.json")
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert fields(path)[f"{CASES[family][0]}.rope.scaling.type"] == "yarn"
    prompt = torch.randint(1, VOCAB, (80,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    theirs = llama_cpp_logits(path, prompt)
    assert np.abs(theirs - ours).max() < 1e-3  # measured 1.0e-5 to 3.0e-5 (logits up to about 5.5)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"truncate": False}, "truncate: false"),
        ({"beta_fast": 16}, "beta_fast 16"),
        ({"beta_slow": 2}, "beta_slow 2"),
    ],
)
def test_yarn_options_llama_cpp_cannot_express_are_refused(tmp_path, tokenizer_json, change, named):
    saved(tmp_path, tokenizer_json, attention_config("llama", {**YARN, **change}), scale=0.0)
    with pytest.raises(UserError, match=named):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_slm_export_refuses_longrope_in_one_line(tmp_path, tokenizer_json):
    from slmkit_testing import run_slm

    longrope = dict(type="longrope", factor=4.0, original_max_seq_len=ORIGINAL, short_factor=[1.0] * 16,
                    long_factor=[2.0] * 16)  # fmt: skip
    saved(tmp_path, tokenizer_json, attention_config("llama", longrope), scale=0.0)
    result = run_slm("export", tmp_path / "m", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "longrope" in result.stderr, result.stderr
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name, arch", [("micro-mamba", "mamba"), ("micro-mamba2", "mamba2")])
def test_ssm_export_runs_in_llama_cpp_with_our_logits(tmp_path, tokenizer_json, name, arch):
    """llama.cpp's recurrent `mamba` / `mamba2` graphs on our files: the whole prompt in one batch of one sequence.
    Weights moved by 0.2 from init (which leaves A_log, D, dt bias and the norms at constants) so each counts; our scan
    in chunks of 16, so the 40 tokens cross chunk boundaries (llama.cpp scans token by token)."""
    cfg = preset(name, vocab_size=VOCAB, d_model=64, n_layers=2, ssm_chunk_size=16)
    model = saved(tmp_path, tokenizer_json, cfg, scale=0.2)
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert fields(path)["general.architecture"] == arch
    prompt = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    theirs = llama_cpp_logits(path, prompt)
    assert np.abs(theirs - ours).max() < 1e-3  # measured 2.0e-5 (mamba), 6.2e-6 (mamba2); logits up to about 7
    assert greedy_agrees(path, model, prompt[:24], 24)  # llama.cpp's recurrent decode, one token at a time
