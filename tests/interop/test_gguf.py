"""GGUF export: every key and tensor read back with gguf.GGUFReader, and logits of an independent
reference forward that follows llama.cpp's conventions (interleaved rope for `llama`, NeoX for Qwen,
fused q/k/v for GPT-2) computed from the file's tensors alone."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from _interop_models import CASES, VOCAB, make_hf_model

from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.interop.gguf import export_gguf, gguf_tensors, tensor_types
from slmkit_testing import word_tokenizer

TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2, "q4_0": 0.2}  # x max |w|


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("gguf_models")

    class Lazy(dict):
        def __missing__(self, case):
            model_type, overrides = CASES[case]
            out = root / case
            make_hf_model(model_type, **overrides).save_pretrained(out)
            shutil.copyfile(tokenizer_json, out / "tokenizer.json")
            self[case] = out
            return out

    return Lazy()


def read(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(values, dtype=np.float32)))
    return fields, tensors


def expected_names(cfg) -> set[str]:
    per_layer = {"attn_norm.weight", "ffn_norm.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"}
    top = {"token_embd.weight", "output_norm.weight"}
    if cfg.family == "gpt2":
        per_layer |= {"attn_qkv.weight", "attn_qkv.bias", "attn_norm.bias", "ffn_norm.bias", "attn_output.bias"}
        per_layer |= {"ffn_up.bias", "ffn_down.bias"}
        top |= {"position_embd.weight", "output_norm.bias", "output.weight"}
    else:
        per_layer |= {"attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight"}
        if cfg.qkv_bias:
            per_layer |= {"attn_q.bias", "attn_k.bias", "attn_v.bias"}
        if cfg.out_bias:
            per_layer |= {"attn_output.bias"}
        if cfg.qk_norm:
            per_layer |= {"attn_q_norm.weight", "attn_k_norm.weight"}
        if not cfg.tie_embeddings:
            top |= {"output.weight"}
        if cfg.rope_scaling is not None:
            top |= {"rope_freqs.weight"}
    return top | {f"blk.{i}.{name}" for i in range(cfg.n_layers) for name in per_layer}


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("llama", "f32"),
        ("llama", "q8_0"),
        ("llama-smollm-tied-gqa", "f16"),
        ("llama-rope-llama3", "bf16"),
        ("llama-mobilellm-deep-thin", "q4_0"),
        ("mistral-sliding", "f16"),
        ("qwen2", "q8_0"),
        ("qwen3", "q4_0"),
        ("gpt2", "f32"),
    ],
)
def test_every_key_and_tensor_reads_back(case, dtype, model_dirs, tokenizer_json, tmp_path):
    directory = model_dirs[case]
    model = load_model(directory)
    cfg = model.config
    path = export_gguf(directory, tmp_path / "m.gguf", dtype)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would make it, not tempfile's private 0600
    fields, tensors = read(path)

    arch = {"mistral": "llama"}.get(cfg.family, cfg.family)
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.n_layers
    assert fields[f"{arch}.embedding_length"] == cfg.d_model
    assert fields[f"{arch}.feed_forward_length"] == cfg.d_ff
    assert fields[f"{arch}.attention.head_count"] == cfg.n_heads
    assert fields[f"{arch}.attention.head_count_kv"] == cfg.n_kv_heads
    window = cfg.sliding_window or cfg.max_seq_len
    assert fields[f"{arch}.context_length"] == min(cfg.max_seq_len, window)
    eps_key = "layer_norm_epsilon" if cfg.norm == "layernorm" else "layer_norm_rms_epsilon"
    assert fields[f"{arch}.attention.{eps_key}"] == pytest.approx(cfg.norm_eps)
    if cfg.positions == "rope":
        assert fields[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert fields[f"{arch}.rope.dimension_count"] == cfg.dim_per_head
    vocab = json.loads(tokenizer_json.read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB
    assert all(tokens[i] == tok for tok, i in vocab["model"]["vocab"].items())
    assert tokens[0] == "<|endoftext|>" and fields["tokenizer.ggml.token_type"][0] == 3  # control
    assert fields["tokenizer.ggml.token_type"][-1] == 5  # padding rows past the tokenizer are unused
    assert fields["tokenizer.ggml.merges"] == [
        m if isinstance(m, str) else " ".join(m) for m in vocab["model"]["merges"]
    ]
    assert fields["tokenizer.ggml.eos_token_id"] == cfg.eos_token_id

    assert set(tensors) == expected_names(cfg)
    reference = gguf_tensors(model)
    head = "output.weight" if "output.weight" in reference else "token_embd.weight"
    for name, (kind, values) in tensors.items():
        want = reference[name]
        if want.dim() == 1:
            assert kind == "F32", name
        elif name == head and dtype == "q4_0":  # llama.cpp keeps the output head at higher precision
            assert kind == "Q8_0", name
        else:
            assert kind == dtype.upper(), name
        assert kind == tensor_types(reference, dtype)[name][0].upper()
        assert values.shape == want.shape, name
        error = (values - want).abs().max().item()
        assert error <= TOLERANCE[kind.lower()] * want.abs().max().item() + 1e-7, (name, error)


# ---- an independent reader: llama.cpp's conventions, from the file alone ----------------------------
def rope(x: torch.Tensor, positions: torch.Tensor, base: float, divisors: torch.Tensor, neox: bool) -> torch.Tensor:
    """x (T, H, D). ggml's NORM mode rotates pairs (2i, 2i+1); NEOX rotates (i, i + D/2)."""
    d = x.shape[-1]
    theta = positions[:, None].double() * (base ** (-torch.arange(0, d, 2).double() / d)) / divisors  # (T, D/2)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def reference_logits(path, tokens: list[int]) -> torch.Tensor:
    fields, tensors = read(path)
    w = {name: values.double() for name, (_, values) in tensors.items()}
    arch = fields["general.architecture"]
    n_layers, n_heads = fields[f"{arch}.block_count"], fields[f"{arch}.attention.head_count"]
    n_kv = fields[f"{arch}.attention.head_count_kv"]
    t = len(tokens)
    x = w["token_embd.weight"][tokens]
    positions = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def norm(h, prefix):
        if arch == "gpt2":
            eps = fields["gpt2.attention.layer_norm_epsilon"]
            h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
            return h * w[prefix + ".weight"] + w[prefix + ".bias"]
        eps = fields[f"{arch}.attention.layer_norm_rms_epsilon"]
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w[prefix + ".weight"]

    def linear(h, prefix):
        y = h @ w[prefix + ".weight"].T
        return y + w[prefix + ".bias"] if prefix + ".bias" in w else y

    if arch == "gpt2":
        x = x + w["position_embd.weight"][:t]
    divisors = w.get("rope_freqs.weight", torch.ones(1))
    for i in range(n_layers):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm")
        if arch == "gpt2":
            q, k, v = linear(h, p + "attn_qkv").chunk(3, dim=-1)
        else:
            q, k, v = linear(h, p + "attn_q"), linear(h, p + "attn_k"), linear(h, p + "attn_v")
        d = q.shape[-1] // n_heads
        q, k, v = q.view(t, n_heads, d), k.view(t, n_kv, d), v.view(t, n_kv, d)
        if p + "attn_q_norm.weight" in w:
            q, k = norm(q, p + "attn_q_norm"), norm(k, p + "attn_k_norm")
        if arch != "gpt2":
            base = fields[f"{arch}.rope.freq_base"]
            q = rope(q, positions, base, divisors, neox=arch != "llama")
            k = rope(k, positions, base, divisors, neox=arch != "llama")
        k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / d**0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear(torch.einsum("hts,shd->thd", attn, v).reshape(t, -1), p + "attn_output")
        h = norm(x, p + "ffn_norm")
        if arch == "gpt2":
            up = linear(h, p + "ffn_up")
            x = x + linear(torch.nn.functional.gelu(up, approximate="tanh"), p + "ffn_down")
        else:
            x = x + linear(
                torch.nn.functional.silu(linear(h, p + "ffn_gate")) * linear(h, p + "ffn_up"), p + "ffn_down"
            )
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, "output_norm") @ head.T


@pytest.mark.parametrize("case", ["llama", "llama-smollm-tied-gqa", "llama-rope-llama3", "qwen2", "qwen3", "gpt2"])
def test_gguf_reference_forward_matches_our_logits(case, model_dirs, tmp_path):
    directory = model_dirs[case]
    path = export_gguf(directory, tmp_path / "m.gguf", "f32")
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ours = load_model(directory)(torch.tensor([tokens]))[0].double()
    assert (reference_logits(path, tokens) - ours).abs().max().item() < 1e-3


def test_refusals_leave_no_file(model_dirs, tmp_path):
    directory = model_dirs["llama"]
    with pytest.raises(UserError, match="GGUF dtype 'q3_k' is not supported"):
        export_gguf(directory, tmp_path / "a.gguf", "q3_k")
    with pytest.raises(UserError, match="silu MLP without biases"):
        export_gguf(model_dirs["llama-bias"], tmp_path / "b.gguf", "f16")
    with pytest.raises(UserError, match="dynamic"):
        export_gguf(model_dirs["llama-rope-dynamic"], tmp_path / "c.gguf", "f16")
    # a WordLevel tokenizer cannot be written as llama.cpp's gpt2 BPE vocabulary
    word_level = tmp_path / "wl"
    shutil.copytree(directory, word_level)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(word_level / "tokenizer.json"))
    with pytest.raises(UserError, match="needs a byte-level BPE tokenizer"):
        export_gguf(word_level, tmp_path / "d.gguf", "f16")
    (word_level / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        export_gguf(word_level, tmp_path / "e.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wl"]
