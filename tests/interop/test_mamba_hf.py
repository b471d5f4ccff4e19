"""Mamba-1 both ways with transformers' own MambaForCausalLM (its PyTorch path): logits of forward calls within 1e-4
and equal greedy tokens; `slm export` to Hugging Face and back; GGUF for llama.cpp's `mamba` read back with
gguf.GGUFReader (architecture, `mamba.ssm.*` keys, every tensor's name, shape and values)."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit_testing import greedy_logits as greedy

transformers = pytest.importorskip("transformers")


def random_model(**overrides):
    base = dict(vocab_size=97, d_model=32, n_layers=2, ssm_state_size=8, ssm_chunk_size=8)
    cfg = preset("micro-mamba", **{**base, **overrides})
    model = build_model(cfg).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("rank", [None, 5])
@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, rank, tied):
    ours = random_model(ssm_dt_rank=rank, tie_embeddings=tied)
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["architectures"] == ["MambaForCausalLM"]
    assert config["time_step_rank"] == (rank or 2) and config["intermediate_size"] == 64
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert theirs.backbone.layers[0].mixer.time_step_rank == (rank or 2)
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        assert greedy(ours, prompt, 12) == greedy(lambda t: theirs(input_ids=t).logits, prompt, 12)


def test_a_transformers_checkpoint_loads_with_equal_logits_and_decodes_with_state(tmp_path):
    cfg = transformers.MambaConfig(
        vocab_size=101, hidden_size=48, num_hidden_layers=2, state_size=6, expand=2, conv_kernel=3,
        time_step_rank=7, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # away from the initialisation: D, conv bias, norms and A all matter
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    c = ours.config
    assert c.mixers == {"mamba"} and (c.ssm_state_size, c.ssm_conv_kernel, c.mamba_dt_rank) == (6, 3, 7)
    idx = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        assert torch.allclose(ours(idx), reference, atol=1e-4)
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_conv_bias": False}, "mamba with use_conv_bias=False is not supported"),
        ({"use_bias": True}, "mamba with use_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "mamba with hidden_act='gelu' is not supported"),
    ],
)
def test_unsupported_mamba_options_are_refused_by_name(tmp_path, changes, message):
    cfg = transformers.MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, **changes)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "hf")


def test_slm_export_to_hugging_face_and_back(tmp_path, tiny_model_dir):
    from slmkit_testing import run_slm

    model = random_model(ssm_dt_rank=3, ssm_chunk_size=5)
    save_model(model, tmp_path / "m", tokenizer_dir=tiny_model_dir)
    result = run_slm("export", tmp_path / "m", "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    again = load_model(tmp_path / "hf")
    # config.json holds the mamba fields only: the unused attention ones come back as the reader sets them
    assert again.config == model.config.replace(n_heads=1, n_kv_heads=1, d_ff=32)
    assert (again.config.ssm_dt_rank, again.config.ssm_chunk_size) == (3, 5)
    idx = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))


# ---- GGUF ------------------------------------------------------------------------------------------------
def test_gguf_export_holds_llama_cpps_mamba_layout(tmp_path, tiny_model_dir):
    import gguf

    from slmkit.interop.gguf import export_gguf

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = random_model(vocab_size=vocab, ssm_dt_rank=3, tie_embeddings=False)
    save_model(model, tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "mamba"
    expected_keys = {
        "mamba.embedding_length": 32, "mamba.block_count": 2, "mamba.ssm.conv_kernel": 4, "mamba.ssm.inner_size": 64,
        "mamba.ssm.state_size": 8, "mamba.ssm.time_step_rank": 3, "mamba.feed_forward_length": 0,
        "mamba.attention.head_count": 0,
    }  # fmt: skip
    assert {k: fields[k] for k in expected_keys} == expected_keys
    assert math.isclose(fields["mamba.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    assert "mamba.attention.head_count_kv" not in fields and "mamba.rope.freq_base" not in fields

    state = {k: v.detach() for k, v in model.state_dict().items()}
    want = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    want["output.weight"] = state["lm_head.weight"]
    for i in range(2):
        p, b = f"layers.{i}.", f"blk.{i}."
        want[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        want[b + "ssm_in.weight"] = state[p + "mixer.in_proj.weight"]
        want[b + "ssm_conv1d.weight"] = state[p + "mixer.conv1d.weight"][:, 0]  # (I, K)
        want[b + "ssm_conv1d.bias"] = state[p + "mixer.conv1d.bias"]
        want[b + "ssm_x.weight"] = state[p + "mixer.x_proj.weight"]
        want[b + "ssm_dt.weight"] = state[p + "mixer.dt_proj.weight"]
        want[b + "ssm_dt.bias"] = state[p + "mixer.dt_proj.bias"]
        want[b + "ssm_a"] = -torch.exp(state[p + "mixer.A_log"])  # A itself, (I, N)
        want[b + "ssm_d"] = state[p + "mixer.D"]
        want[b + "ssm_out.weight"] = state[p + "mixer.out_proj.weight"]
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MAMBA]}  # what llama.cpp's mamba reads
    stems = {re.sub(r"^blk\.\d+\.", "blk.{bid}.", name).removesuffix(".weight").removesuffix(".bias") for name in got}
    assert stems == known
    for name, tensor in want.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        values = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(tensor.shape)
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(tensor.shape), name  # ggml lists dims reversed
        assert torch.equal(values, tensor.float()), name


def test_gguf_keeps_the_small_ssm_tensors_in_f32_at_q8_0(tmp_path, tiny_model_dir):
    import gguf

    from slmkit.interop.gguf import export_gguf

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    save_model(random_model(vocab_size=vocab), tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ssm_in.weight"] == "Q8_0" and types["blk.1.ssm_out.weight"] == "Q8_0"
    for name in ("ssm_conv1d.weight", "ssm_x.weight", "ssm_dt.weight", "ssm_a", "ssm_d", "attn_norm.weight"):
        assert types[f"blk.0.{name}"] == "F32", name
