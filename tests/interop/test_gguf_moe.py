"""GGUF export of mixtures of experts in llama.cpp's expert layout (Mixtral as `llama`, `qwen2moe`, `olmoe`): keys
and tensors read back with gguf.GGUFReader, and an independent MoE forward computed from the file's tensors alone
(stacked experts, router, shared expert and its sigmoid gate, OLMoE's q/k norm over the projection) matching ours.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_gguf import read, rope
from test_moe_hf import decisive_tokens, random_moe

from slmkit.errors import UserError
from slmkit.interop.checkpoint import save_model
from slmkit.interop.gguf import export_gguf, gguf_tensors, permute_for_llama_cpp

pytest.importorskip("gguf")
VOCAB = 300
CASES = {
    "mixtral": ("llama", dict()),
    "qwen2_moe": ("qwen2moe", dict(qkv_bias=True, moe_shared_d_ff=64, moe_shared_gate=True, moe_norm_topk=False)),
    # llama.cpp's olmoe loads its k norm as (d_model,): no grouped kv heads (refused, below)
    "olmoe": ("olmoe", dict(n_kv_heads=4, qk_norm=True, qk_norm_over="projection", moe_norm_topk=False)),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from slmkit.data.tokenizer import train_tokenizer

    words = "expert router token layer shared gate small model".split()
    texts = [" ".join(words[(i * 5 + j) % len(words)] for j in range(40)) for i in range(30)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, VOCAB).save(str(path))
    return path


def exported(family, tokenizer_json, directory, dtype="f32", **overrides):
    model = random_moe(family, vocab_size=VOCAB, d_ff=32, **{**CASES[family][1], **overrides})
    save_model(model, directory / "m")
    shutil.copyfile(tokenizer_json, directory / "m" / "tokenizer.json")
    return model, export_gguf(directory / "m", directory / "m.gguf", dtype)


@pytest.mark.parametrize("family", list(CASES))
def test_expert_keys_and_stacked_tensors_read_back(family, tokenizer_json, tmp_path):
    model, path = exported(family, tokenizer_json, tmp_path)
    cfg = model.config
    fields, tensors = read(path)
    arch = CASES[family][0]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == cfg.moe_experts
    assert fields[f"{arch}.expert_used_count"] == cfg.moe_top_k
    assert fields[f"{arch}.expert_feed_forward_length"] == cfg.d_ff
    assert fields.get(f"{arch}.expert_shared_feed_forward_length") == (cfg.moe_shared_d_ff or None)
    mlp = model.layers[1].mlp
    e, f, c = cfg.moe_experts, cfg.d_ff, cfg.d_model
    expected = {
        "ffn_gate_inp.weight": mlp.gate.weight,
        "ffn_gate_exps.weight": torch.stack([x.gate_proj.weight for x in mlp.experts]),
        "ffn_up_exps.weight": torch.stack([x.up_proj.weight for x in mlp.experts]),
        "ffn_down_exps.weight": torch.stack([x.down_proj.weight for x in mlp.experts]),
    }
    if cfg.moe_shared_d_ff:
        expected |= {
            "ffn_gate_shexp.weight": mlp.shared_expert.gate_proj.weight,
            "ffn_up_shexp.weight": mlp.shared_expert.up_proj.weight,
            "ffn_down_shexp.weight": mlp.shared_expert.down_proj.weight,
            "ffn_gate_inp_shexp.weight": mlp.shared_expert_gate.weight,
        }
    if cfg.qk_norm:
        expected |= {"attn_q_norm.weight": model.layers[1].self_attn.q_norm.weight}
        assert tensors["blk.1.attn_k_norm.weight"][1].shape == (cfg.n_kv_heads * cfg.dim_per_head,)
    assert tensors["blk.1.ffn_gate_exps.weight"][1].shape == (e, f, c)
    assert tensors["blk.1.ffn_down_exps.weight"][1].shape == (e, c, f)
    for name, want in expected.items():
        assert torch.equal(tensors[f"blk.1.{name}"][1], want.detach().float()), name
    q = model.layers[0].self_attn.q_proj.weight.detach()
    if arch == "llama":  # Mixtral rotates interleaved pairs in llama.cpp
        q = permute_for_llama_cpp(q, cfg.n_heads)
    assert torch.equal(tensors["blk.0.attn_q.weight"][1], q)
    assert not any(".experts." in n or "ffn_gate.weight" in n or "ffn_up.weight" in n for n in tensors)
    assert set(tensors) == set(gguf_tensors(model))


def test_routers_stay_f32_in_a_quantized_file(tokenizer_json, tmp_path):
    _, path = exported("qwen2_moe", tokenizer_json, tmp_path, "q8_0")
    _, tensors = read(path)
    assert tensors["blk.0.ffn_gate_inp.weight"][0] == "F32"
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"][0] == "F32"
    assert tensors["blk.0.ffn_gate_exps.weight"][0] == "Q8_0"
    assert tensors["blk.0.ffn_down_exps.weight"][0] == "Q8_0"


def reference_logits(path, tokens: list[int]) -> torch.Tensor:
    """llama.cpp's MoE graphs (llm_build_moe_ffn) from the file alone: softmax router, top-k, weights renormalised
    only by `llama` (Mixtral), experts from the stacked tensors, plus the sigmoid-gated shared expert."""
    fields, tensors = read(path)
    w = {name: values.double() for name, (_, values) in tensors.items()}
    arch = fields["general.architecture"]
    n_heads, n_kv = fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"]
    top_k, eps = fields[f"{arch}.expert_used_count"], fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    t = len(tokens)
    x = w["token_embd.weight"][tokens]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def norm(h, name):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    def linear(h, name):
        y = h @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    for i in range(fields[f"{arch}.block_count"]):
        p = f"blk.{i}."
        h = norm(x, p + "attn_norm.weight")
        q, k, v = linear(h, p + "attn_q"), linear(h, p + "attn_k"), linear(h, p + "attn_v")
        if arch == "olmoe":  # over the whole projection, before the heads are split
            q, k = norm(q, p + "attn_q_norm.weight"), norm(k, p + "attn_k_norm.weight")
        d = q.shape[-1] // n_heads
        q, k, v = q.view(t, n_heads, d), k.view(t, n_kv, d), v.view(t, n_kv, d)
        base = fields[f"{arch}.rope.freq_base"]
        q = rope(q, torch.arange(t), base, torch.ones(1), neox=arch != "llama")
        k = rope(k, torch.arange(t), base, torch.ones(1), neox=arch != "llama")
        k, v = k.repeat_interleave(n_heads // n_kv, dim=1), v.repeat_interleave(n_heads // n_kv, dim=1)
        attn = (torch.einsum("thd,shd->hts", q, k) / d**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + linear(torch.einsum("hts,shd->thd", attn, v).reshape(t, -1), p + "attn_output")
        h = norm(x, p + "ffn_norm.weight")
        probs = linear(h, p + "ffn_gate_inp").softmax(-1)
        weights, chosen = probs.topk(top_k, dim=-1)
        if arch == "llama":
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for n in range(t):
            for j in range(top_k):
                e = chosen[n, j]
                gate, up = w[p + "ffn_gate_exps.weight"][e] @ h[n], w[p + "ffn_up_exps.weight"][e] @ h[n]
                out[n] += weights[n, j] * (w[p + "ffn_down_exps.weight"][e] @ (torch.nn.functional.silu(gate) * up))
        if p + "ffn_up_shexp.weight" in w:
            shared = torch.nn.functional.silu(linear(h, p + "ffn_gate_shexp")) * linear(h, p + "ffn_up_shexp")
            out += torch.sigmoid(linear(h, p + "ffn_gate_inp_shexp")) * linear(shared, p + "ffn_down_shexp")
        x = x + out
    return norm(x, "output_norm.weight") @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("family", list(CASES))
def test_a_reference_forward_from_the_file_matches_our_logits(family, tokenizer_json, tmp_path):
    model, path = exported(family, tokenizer_json, tmp_path)
    tokens = decisive_tokens(model, VOCAB, (1, 20))
    with torch.no_grad():
        ours = model(tokens)[0].double()
    assert (reference_logits(path, tokens[0].tolist()) - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("qwen2_moe", {"moe_norm_topk": True}, "qwen2moe architecture does not renormalise"),
        ("olmoe", {"moe_norm_topk": True}, "olmoe architecture does not renormalise"),
        ("olmoe", {"n_kv_heads": 2}, "olmoe needs as many kv heads as heads"),
    ],
)
def test_routing_llama_cpp_would_compute_differently_is_refused(family, overrides, message, tokenizer_json, tmp_path):
    with pytest.raises(UserError, match=message):
        exported(family, tokenizer_json, tmp_path, **overrides)
    assert not (tmp_path / "m.gguf").exists()
