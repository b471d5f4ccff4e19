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

transformers = pytest.importorskip("transformers")


def random_model(**overrides):
    cfg = preset(
        "micro-mamba2", vocab_size=97, d_model=32, n_layers=2, ssm_head_dim=16, ssm_state_size=8, ssm_chunk_size=8,
        **overrides,
    )  # fmt: skip
    model = build_model(cfg).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def greedy(step, prompt: torch.Tensor, n: int) -> list[int]:
    tokens = prompt.clone()
    for _ in range(n):
        tokens = torch.cat((tokens, step(tokens)[:, -1:].argmax(-1)), dim=1)
    return tokens[0, prompt.shape[1] :].tolist()


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


def test_gguf_export_of_mamba2_is_refused_cleanly(tmp_path, tiny_model_dir):
    import shutil

    from slmkit.interop.gguf import export_gguf

    model = random_model()
    save_model(model, tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    with pytest.raises(UserError, match="no llama.cpp architecture"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_hugging_face_family_refuses_other_mixers_with_the_fix():
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match="family: slmkit"):
        check_family(preset("micro", mixer="mamba2", vocab_size=97))
