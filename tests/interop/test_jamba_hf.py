"""Jamba both ways with transformers' own JambaForCausalLM (its PyTorch path, use_mamba_kernels false): Mamba-1
layers with dt/B/C norms and attention layers without positions, by period and offset, dense MLPs and mixtures of
experts (softmax top-k, not renormalised) by another period. Logits of forward calls within 1e-4, equal greedy
tokens, and our prefill + recurrent decode (the model's states and the decode core) equal to their greedy
continuation."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit_testing import greedy_logits as greedy

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=97, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48, ssm_state_size=8, ssm_chunk_size=4, moe_experts=4,
)  # fmt: skip


def random_model(**overrides):
    model = build_model(preset("micro-jamba", **(SMALL | overrides))).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # init leaves A_log, D and the norms at constants: make every weight count
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def hf_config(**overrides):
    fields = dict(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, use_mamba_kernels=False,
        tie_word_embeddings=False,
    ) | overrides  # fmt: skip
    return transformers.JambaConfig(**fields)


def decode_with_state(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Prefill, then one token per call through each layer's state (KV for attention, recurrent for Mamba)."""
    state = model.new_state(1, prompt.shape[1] + n)
    t = prompt.shape[1]
    logits = model(prompt, state=state, pos=torch.arange(t))
    out = []
    for i in range(n):
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
        logits = model(token, state=state, pos=torch.tensor([t + i]))
    return out


@pytest.mark.parametrize(
    "changes,periods",
    [
        (dict(), (4, 3, 2, 1)),  # the preset's M, M, M, A with experts in layers 1 and 3
        (dict(tie_embeddings=False, ssm_dt_rank=3, mlp_pattern=None, mlp="moe", moe_top_k=1), (4, 3, 1, 0)),
        (dict(layer_pattern=("attention", "mamba") * 2, mlp_pattern=None, mlp="gated"), (2, 0, 5, 4)),
    ],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, changes, periods):
    ours = random_model(**changes)
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "jamba" and config["architectures"] == ["JambaForCausalLM"]
    keys = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
    assert tuple(config[k] for k in keys) == periods
    theirs = transformers.JambaForCausalLM.from_pretrained(tmp_path / "m").eval()
    layer_types = ["full_attention" if m == "attention" else "linear_attention" for m in ours.config.layer_pattern]
    assert theirs.config.layer_types == layer_types
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        reference = greedy(lambda t: theirs(input_ids=t).logits, prompt, 12)
        assert greedy(ours, prompt, 12) == reference
        assert decode_with_state(ours, prompt, 12) == reference
    assert load_model(tmp_path / "m").config == ours.config  # and back: the same config


def test_a_transformers_checkpoint_loads_with_equal_logits_and_decodes_with_state(tmp_path):
    from slmkit.infer.core import decode_greedy

    torch.manual_seed(0)
    theirs = transformers.JambaForCausalLM(hf_config()).eval()
    with torch.no_grad():  # init leaves A_log, D and norms at constants: make every weight count
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    cfg = ours.config
    assert (cfg.family, cfg.positions, cfg.ssm_dt_b_c_norm, cfg.moe_norm_topk) == ("jamba", "none", True, False)
    assert cfg.layer_pattern == ("mamba", "attention") * 2 and cfg.mlp_pattern == ("gated", "moe") * 2
    idx = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        assert torch.allclose(ours(idx), reference, atol=1e-4)
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)
    # the decode core (what slm generate and the server run): two prompts of different lengths in one batch
    prompts = [idx[0, :6].tolist(), idx[0, 6:15].tolist()]
    outs, _ = decode_greedy(ours, prompts, 10)
    with torch.no_grad():
        for prompt, out in zip(prompts, outs, strict=True):
            assert out == greedy(lambda t: theirs(input_ids=t).logits, torch.tensor([prompt]), 10)
    again = tmp_path / "again"
    save_model(ours, again)
    written = json.loads((again / "config.json").read_text())
    assert (written["attn_layer_period"], written["attn_layer_offset"], written["num_experts"]) == (2, 1, 4)


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("mamba_proj_bias", True, "mamba_proj_bias"),
        ("mamba_conv_bias", False, "mamba_conv_bias"),
        ("head_dim", 4, "head_dim"),
        ("hidden_act", "gelu", "activation"),
        ("attn_layer_offset", 3, "attn_layer_offset"),
    ],
)
def test_unsupported_jamba_options_are_refused_by_name(tmp_path, key, value, named):
    transformers.JambaForCausalLM(hf_config(num_hidden_layers=2)).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(UserError, match=named):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(layer_pattern=("attention", "attention", "mamba", "attention")), "attention layers must recur"),
        (dict(mlp_pattern=("moe", "moe", "gated", "moe")), "moe layers must recur"),
        (dict(layer_pattern=("mamba", "gla", "mamba", "attention")), "gla"),
        (dict(positions="rope"), "positions"),
        (dict(moe_norm_topk=True), "moe_norm_topk"),
        (dict(ssm_dt_b_c_norm=False), "ssm_dt_b_c_norm"),
        (dict(mlp_pattern=("gated", "memory", "gated", "gated")), "memory"),
        (dict(moe_experts=1, moe_top_k=1), "moe_experts=1"),
    ],
)
def test_configs_jamba_cannot_express_are_refused_by_name(change, named):
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match=named):
        check_family(preset("micro-jamba", vocab_size=97, **change))


def test_preset_counts_its_parameters():
    from slmkit.interop.families import check_family

    cfg = check_family(preset("micro-jamba", **SMALL))
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert {"dt_layernorm", "b_layernorm", "c_layernorm"} <= set(dict(model.layers[0].mixer.named_children()))


def test_positions_none_adds_nothing_to_attention():
    """One attention layer without positions is order-blind: the last token's
    logits do not depend on the order of the tokens before it."""
    model = build_model(preset("tiny", vocab_size=50, n_layers=1, positions="none", family="slmkit")).eval()
    idx = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        a, b = model(idx)[0, -1], model(idx[:, [2, 0, 3, 1, 4]])[0, -1]
    assert torch.allclose(a, b, atol=1e-5)


def test_slm_export_to_hugging_face_loads_in_transformers(tmp_path):
    from slmkit_testing import run_slm

    model = random_model(ssm_chunk_size=5)
    save_model(model, tmp_path / "m")
    result = run_slm("export", tmp_path / "m", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    theirs = transformers.JambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    again = load_model(tmp_path / "hf")
    assert again.config == model.config and again.config.ssm_chunk_size == 5
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
        assert torch.allclose(theirs(input_ids=idx).logits, model(idx), atol=1e-4)


# ---- GGUF: llama.cpp's jamba architecture --------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_gguf_export_runs_in_llama_cpp_with_our_logits(tmp_path, data_dir, tied):
    """The file's layout (read back with gguf.GGUFReader) and llama.cpp's own logits on it (xllamacpp's libllama)."""
    import gguf
    import numpy as np

    from slmkit.data.shards import load_data_dir
    from slmkit.interop.gguf import export_gguf

    vocab = load_data_dir(data_dir).vocab_size
    model = random_model(vocab_size=vocab, tie_embeddings=tied)
    save_model(model, tmp_path / "m", tokenizer_dir=data_dir)
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "jamba"
    kv = reader.fields["jamba.attention.head_count_kv"]
    assert [int(kv.parts[i][0]) for i in kv.data] == [0, 0, 0, 1]  # mamba x 3, then attention
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.0.ssm_dt_norm.weight", "blk.0.ssm_b_norm.weight", "blk.0.ssm_c_norm.weight"} <= set(tensors)
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors  # dense
    assert tuple(tensors["blk.1.ffn_gate_exps.weight"].shape) == (32, 48, 4)  # (in, out, E) as gguf lists it
    assert ("output.weight" in tensors) == (not tied)
    from llamacpp_peer import available

    if not available():
        pytest.skip("xllamacpp (llama.cpp wheel) is not installed")
    from slmkit_testing import llama_cpp_eval

    prompt = list(range(1, 20))
    _, theirs = llama_cpp_eval(path, prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3
