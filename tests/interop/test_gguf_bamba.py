"""GGUF export of Bamba (Mamba-2 and attention layers, a gated MLP after each, rotary on half of each head) as
llama.cpp's `granitehybrid`. The file is read back with gguf.GGUFReader (keys, shapes, values: runs everywhere) and,
where the xllamacpp wheel is installed (tests/llamacpp_peer.py), run in libllama with an f32 KV cache (logits of every
prompt position against ours) and in llama-server (greedy decoding against ours). Measured maxima are in
docs/interop.md and docs/architectures.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.gguf import export_gguf, permute_for_llama_cpp
from slmkit_testing import perturbed_saved as saved
from slmkit_testing import word_tokenizer

VOCAB = 320
PATTERN = ("mamba2", "attention", "mamba2", "attention")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def bamba(**overrides):
    """A random Bamba: width 64, heads of 16 channels (8 turned by rope), Mamba-2 heads of 16, state 8; our scan in
    chunks of 16, so 40-token prompts cross chunk boundaries (llama.cpp scans token by token)."""
    fields = dict(
        vocab_size=VOCAB, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, ssm_head_dim=16, ssm_state_size=8,
        ssm_chunk_size=16, max_seq_len=128, rope_theta=100.0, layer_pattern=PATTERN,
    ) | overrides  # fmt: skip
    return preset("micro-hybrid", **fields)


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def interleaved_rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """llama.cpp's NORM rope on (T, H, D): pairs (x0, x1), (x2, x3) ... of the first rope_dim channels turn."""
    inv = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    angle = pos[:, None, None].double() * inv  # (T, 1, rope_dim / 2)
    a, b = x[..., 0:rope_dim:2].double(), x[..., 1:rope_dim:2].double()
    turned = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1)
    return torch.cat([turned.flatten(-2), x[..., rope_dim:].double()], -1)


def test_partial_permutation_makes_interleaved_rope_equal_rotate_half_rope():
    """The rows we reorder for llama.cpp, turned by its interleaved-pair rope, equal ours turned by rotate-half rope
    and then reordered: per head, only the first rope_dim channels move."""
    from slmkit.models.attention import apply_rope, rope_cos_sin

    heads, head, rope_dim, theta = 3, 16, 8, 100.0
    weight = torch.randn(heads * head, 5, dtype=torch.float64)
    pos = torch.arange(7)
    x = torch.randn(7, 5, dtype=torch.float64)
    ours_q = (x @ weight.T).reshape(7, heads, head)
    cos, sin = rope_cos_sin(pos, rope_dim, theta)
    ours = apply_rope(ours_q.transpose(0, 1)[None].float(), cos[None, None], sin[None, None])[0].transpose(0, 1)
    permuted = permute_for_llama_cpp(weight, heads, rope_dim)
    theirs = interleaved_rope((x @ permuted.T).reshape(7, heads, head), pos, rope_dim, theta)
    back = permute_for_llama_cpp(ours.reshape(7, heads * head).T.double(), heads, rope_dim).T.reshape(7, heads, head)
    assert torch.allclose(theirs, back, atol=1e-5)
    assert torch.equal(permuted.reshape(heads, head, 5)[:, rope_dim:], weight.reshape(heads, head, 5)[:, rope_dim:])
    assert torch.equal(permute_for_llama_cpp(weight, heads, head), permute_for_llama_cpp(weight, heads))


def test_bamba_gguf_keys_and_tensors_read_back(tmp_path, tokenizer_json):
    import gguf

    model = saved(
        tmp_path, tokenizer_json, bamba(tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True), scale=0.2
    )
    cfg = model.config
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    keys = fields(reader)
    assert keys["general.architecture"] == "granitehybrid"
    expected = {
        "block_count": 4, "context_length": 128, "embedding_length": 64, "feed_forward_length": 96,
        "attention.head_count": 4, "attention.head_count_kv": [0, 2, 0, 2], "attention.key_length": 16,
        "attention.value_length": 16, "rope.dimension_count": 8, "rope.scaling.finetuned": True,
        "ssm.conv_kernel": 4, "ssm.inner_size": 128, "ssm.state_size": 8, "ssm.time_step_rank": 8,
        "ssm.group_count": 1, "embedding_scale": 1.0, "residual_scale": 1.0, "logit_scale": 1.0,
    }  # fmt: skip
    for key, value in expected.items():
        assert keys[f"granitehybrid.{key}"] == value, key
    assert keys["granitehybrid.attention.scale"] == pytest.approx(1 / math.sqrt(16))
    assert keys["granitehybrid.rope.freq_base"] == pytest.approx(100.0)
    assert keys["granitehybrid.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)

    tensors = {t.name: t for t in reader.tensors}
    state = {k: v.float() for k, v in model.state_dict().items()}

    def value(name):  # gguf lists shapes innermost first; the data comes back in torch's row-major order
        t = tensors[name]
        return torch.from_numpy(np.array(t.data)).reshape(tuple(reversed([int(n) for n in t.shape])))

    # Mamba-2 layer 0: A as -exp(A_log) and A, D as (H, 1) columns, conv (C, K), the gated norm as one group
    assert torch.allclose(value("blk.0.ssm_a"), -state["layers.0.mixer.A_log"].exp()[:, None])
    assert torch.equal(value("blk.0.ssm_d"), state["layers.0.mixer.D"][:, None])
    assert torch.equal(value("blk.0.ssm_dt.bias"), state["layers.0.mixer.dt_bias"])
    assert torch.equal(value("blk.0.ssm_conv1d.weight"), state["layers.0.mixer.conv1d.weight"][:, 0])
    assert torch.equal(value("blk.0.ssm_norm.weight"), state["layers.0.mixer.norm.weight"][None])
    assert torch.equal(value("blk.0.ssm_in.weight"), state["layers.0.mixer.in_proj.weight"])
    assert "blk.0.attn_q.weight" not in tensors and "blk.1.ssm_in.weight" not in tensors
    # attention layer 1: q/k rows reordered over the 8 turned channels of each head, v and o as they are
    q, k_bias = state["layers.1.self_attn.q_proj.weight"], state["layers.1.self_attn.k_proj.bias"]
    assert torch.equal(value("blk.1.attn_q.weight"), permute_for_llama_cpp(q, 4, 8))
    assert torch.equal(value("blk.1.attn_k.bias"), permute_for_llama_cpp(k_bias, 2, 8))
    assert torch.equal(value("blk.1.attn_v.weight"), state["layers.1.self_attn.v_proj.weight"])
    assert torch.equal(value("blk.1.attn_output.bias"), state["layers.1.self_attn.o_proj.bias"])
    # every layer: its norms and gated MLP (with biases here)
    for i in range(4):
        assert torch.equal(value(f"blk.{i}.ffn_norm.weight"), state[f"layers.{i}.post_attention_layernorm.weight"])
        assert torch.equal(value(f"blk.{i}.ffn_up.bias"), state[f"layers.{i}.mlp.up_proj.bias"])
        assert tuple(int(n) for n in tensors[f"blk.{i}.ffn_gate.weight"].shape) == (64, 96)
    assert torch.equal(value("output.weight"), state["lm_head.weight"])
    assert tensors["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied head, no biases, Mamba-2 first
        dict(tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True,
             n_layers=3, layer_pattern=("attention", "mamba2", "mamba2")),
    ],
)  # fmt: skip
def test_bamba_gguf_runs_in_llama_cpp_with_our_logits(tmp_path, tokenizer_json, overrides):
    """llama.cpp's granitehybrid graph (recurrent Mamba-2 state and a KV cache side by side) on our file: 40 positions
    in one batch, then llama-server's own greedy decode, token by token, against ours."""
    from llamacpp_peer import available

    cfg = bamba(**overrides)
    model = saved(tmp_path, tokenizer_json, cfg, scale=0.2)
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    if not available():
        pytest.skip("xllamacpp (llama.cpp wheel) is not installed")
    from llamacpp_peer import llama_server_greedy
    from slmkit.infer.generate import generate_ids
    from slmkit_testing import llama_cpp_eval

    prompt = torch.randint(1, VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    llm, theirs = llama_cpp_eval(path, prompt)
    llm.close()
    assert np.abs(theirs - ours).max() < 1e-3  # measured: see docs/interop.md
    tokens, _ = llama_server_greedy(path, prompt[:24], 24)
    assert tokens == list(generate_ids(model, prompt[:24], 24))


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(ssm_n_groups=2), "ssm_n_groups"),
        (dict(ssm_expand=4, ssm_head_dim=32), "ssm_expand"),
        (dict(n_layers=2, layer_pattern=None, mixer="mamba2"), "only mamba2 layers"),
        (dict(n_layers=2, layer_pattern=None, mixer="attention"), "only attention layers"),
    ],
)
def test_what_granitehybrid_cannot_compute_is_refused_by_name(tmp_path, tokenizer_json, change, named):
    saved(tmp_path, tokenizer_json, bamba(**change), scale=0.0)
    with pytest.raises(UserError, match=named):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_slm_export_refuses_grouped_bamba_in_one_line(tmp_path, tokenizer_json):
    from slmkit_testing import run_slm

    saved(tmp_path, tokenizer_json, bamba(ssm_n_groups=2), scale=0.0)
    result = run_slm("export", tmp_path / "m", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "ssm_n_groups" in result.stderr, result.stderr
    assert result.stderr.startswith("error:"), result.stderr
    assert not (tmp_path / "m.gguf").exists()
