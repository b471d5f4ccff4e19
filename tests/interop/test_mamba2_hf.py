"""Mamba-2 both ways with transformers' own Mamba2ForCausalLM (its PyTorch path): logits of forward calls within
1e-4 and equal greedy tokens; slmkit's own format for hybrids, which Hugging Face and GGUF export refuse."""

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


def random_model(**overrides):
    fields = dict(vocab_size=97, d_model=32, n_layers=2, ssm_head_dim=16, ssm_state_size=8, ssm_chunk_size=8)
    cfg = preset("micro-mamba2", **(fields | overrides))
    model = build_model(cfg).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, groups, tied):
    ours = random_model(ssm_n_groups=groups, tie_embeddings=tied)
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mamba2" and config["architectures"] == ["Mamba2ForCausalLM"]
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        assert greedy(ours, prompt, 12) == greedy(lambda t: theirs(input_ids=t).logits, prompt, 12)


def test_a_transformers_checkpoint_loads_with_equal_logits_and_decodes_with_state(tmp_path):
    cfg = transformers.Mamba2Config(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=4, expand=2,
        n_groups=2, chunk_size=16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.Mamba2ForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    assert ours.config.mixers == {"mamba2"} and ours.config.ssm_n_groups == 2
    idx = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        assert torch.allclose(ours(idx), reference, atol=1e-4)
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)


def test_unsupported_mamba2_options_are_refused_by_name(tmp_path):
    cfg = transformers.Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1, head_dim=16, num_heads=4,
                                    n_groups=1, use_conv_bias=False)  # fmt: skip
    transformers.Mamba2ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="use_conv_bias"):
        load_model(tmp_path / "hf")


def test_hybrids_use_slmkit_format_and_export_refuses_cleanly(tmp_path):
    from slmkit.interop.hf import export_model

    cfg = preset(
        "micro-hybrid", vocab_size=97, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, ssm_head_dim=16, family="slmkit"
    )
    model = build_model(cfg).eval()
    model.init_weights(seed=0)
    save_model(model, tmp_path / "hybrid")
    assert json.loads((tmp_path / "hybrid" / "config.json").read_text())["model_type"] == "slmkit"
    again = load_model(tmp_path / "hybrid")
    assert again.config.layer_pattern == cfg.layer_pattern
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
    with pytest.raises(UserError, match="no transformers class"):
        export_model(tmp_path / "hybrid", "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gguf_export_writes_llama_cpp_mamba2_names_metadata_and_values(tmp_path, tiny_model_dir, dtype):
    """Through `slm export --format gguf`: llama.cpp's mamba2 architecture, its ssm keys, and every tensor in
    convert_hf_to_gguf.py's layout (A = -exp(A_log) and D as (H, 1), conv (C, K), dt_bias as ssm_dt.bias)."""
    import shutil

    import numpy as np
    from typer.testing import CliRunner

    gguf = pytest.importorskip("gguf")
    from slmkit.cli import app
    from slmkit.data.tokenizer import load_tokenizer

    tokens = load_tokenizer(tiny_model_dir / "tokenizer.json").get_vocab_size()  # 325 or 512, by the test corpus
    model = random_model(tie_embeddings=False, vocab_size=-(-tokens // 128) * 128)  # the tokens and padding
    cfg = model.config
    save_model(model, tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(app, ["export", str(tmp_path / "m"), "--format", "gguf", "--out", str(out),
                                      "--dtype", dtype])  # fmt: skip
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "mamba2"
    inner, heads = 2 * cfg.d_model, 2 * cfg.d_model // cfg.ssm_head_dim
    expected_keys = {
        "mamba2.embedding_length": cfg.d_model, "mamba2.block_count": cfg.n_layers,
        "mamba2.ssm.conv_kernel": cfg.ssm_conv_kernel, "mamba2.ssm.inner_size": inner,
        "mamba2.ssm.state_size": cfg.ssm_state_size, "mamba2.ssm.time_step_rank": heads,
        "mamba2.ssm.group_count": 1, "mamba2.feed_forward_length": 0, "mamba2.attention.head_count": 0,
        "mamba2.context_length": cfg.max_seq_len,
    }  # fmt: skip
    assert {k: field(k) for k in expected_keys} == expected_keys
    assert field("mamba2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert not any("rope" in k for k in reader.fields)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    expected = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"],
                "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        expected |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.ssm_in.weight": sd[p + "mixer.in_proj.weight"],
            f"blk.{i}.ssm_conv1d.weight": sd[p + "mixer.conv1d.weight"][:, 0, :],
            f"blk.{i}.ssm_conv1d.bias": sd[p + "mixer.conv1d.bias"],
            f"blk.{i}.ssm_dt.bias": sd[p + "mixer.dt_bias"],
            f"blk.{i}.ssm_a": -torch.exp(sd[p + "mixer.A_log"])[:, None],
            f"blk.{i}.ssm_d": sd[p + "mixer.D"][:, None],
            f"blk.{i}.ssm_norm.weight": sd[p + "mixer.norm.weight"][None, :],
            f"blk.{i}.ssm_out.weight": sd[p + "mixer.out_proj.weight"],
        }
    read = {t.name: t for t in reader.tensors}
    assert set(read) == set(expected)
    quantized = {"token_embd.weight", "output.weight"} | {
        n for n in expected if n.endswith(("ssm_in.weight", "ssm_out.weight"))
    }
    for name, want in expected.items():
        t = read[name]
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(want.shape), name  # ggml lists dims inner first
        if dtype == "q8_0" and name in quantized:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            np.testing.assert_allclose(got, want.numpy(), atol=want.abs().max().item() / 100, err_msg=name)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want.numpy(), err_msg=name)


def test_gguf_export_refuses_grouped_mamba2_norms_cleanly(tmp_path, tiny_model_dir):
    import shutil

    from slmkit.interop.gguf import export_gguf

    save_model(random_model(ssm_n_groups=2, vocab_size=384), tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    with pytest.raises(UserError, match="ssm_n_groups 1 only"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_hugging_face_family_refuses_other_mixers_with_the_fix():
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match="family: slmkit"):
        check_family(preset("micro", mixer="mamba2", vocab_size=97))
