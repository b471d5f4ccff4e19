"""Bamba both ways with transformers' own BambaForCausalLM (its PyTorch path): a Mamba-2 / attention hybrid with
an MLP in every layer and rotary on half of each head. Logits of forward calls within 1e-4, equal greedy tokens,
and our recurrent decode equal to their greedy continuation."""

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

PATTERN = ("mamba2", "attention", "mamba2", "attention")


def random_model(**overrides):
    fields = dict(
        vocab_size=97, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=64, ssm_head_dim=16, ssm_state_size=8,
        ssm_chunk_size=8, layer_pattern=PATTERN,
    ) | overrides  # fmt: skip
    model = build_model(preset("micro-hybrid", **fields)).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def decode_with_state(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Prefill, then one token per call through each layer's state (KV for attention, recurrent for Mamba-2)."""
    state = model.new_state(1, prompt.shape[1] + n)
    t = prompt.shape[1]
    logits = model(prompt, state=state, pos=torch.arange(t))
    out = []
    for i in range(n):
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
        logits = model(token, state=state, pos=torch.tensor([t + i]))
    return out


@pytest.mark.parametrize("groups,tied,bias", [(1, True, False), (2, False, True)])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, groups, tied, bias):
    ours = random_model(ssm_n_groups=groups, tie_embeddings=tied, qkv_bias=bias, out_bias=bias, mlp_bias=bias)
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "bamba" and config["architectures"] == ["BambaForCausalLM"]
    assert config["attn_layer_indices"] == [1, 3]
    theirs = transformers.BambaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert theirs.config.layers_block_type == ["linear_attention", "full_attention"] * 2
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        reference = greedy(lambda t: theirs(input_ids=t).logits, prompt, 12)
        assert greedy(ours, prompt, 12) == reference
        assert decode_with_state(ours, prompt, 12) == reference


def test_a_transformers_checkpoint_loads_with_equal_logits_and_decodes_with_state(tmp_path):
    cfg = transformers.BambaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[0, 2], mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=16, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.BambaForCausalLM(cfg).eval()
    with torch.no_grad():  # init leaves A_log, D and norms at constants: make every weight count
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    assert ours.config.layer_pattern == ("attention", "mamba2", "attention")
    assert ours.config.rope_fraction == 0.5 and ours.config.ssm_n_groups == 2
    idx = torch.randint(0, 101, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        assert torch.allclose(ours(idx), reference, atol=1e-4)
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)
        prompt = idx[:, :6]
        assert decode_with_state(ours, prompt, 10) == greedy(lambda t: theirs(input_ids=t).logits, prompt, 10)
    again = tmp_path / "again"
    save_model(ours, again)
    assert json.loads((again / "config.json").read_text())["attn_layer_indices"] == [0, 2]


@pytest.mark.parametrize(
    "key,value", [("mamba_proj_bias", True), ("mamba_conv_bias", False), ("time_step_limit", [0.0, 1.0])]
)
def test_unsupported_bamba_options_are_refused_by_name(tmp_path, key, value):
    cfg = transformers.BambaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        attn_layer_indices=[1], mamba_n_heads=4, mamba_d_state=8,
    )  # fmt: skip
    transformers.BambaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(UserError, match=key):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize(
    "change,named",
    [(dict(rope_fraction=1.0), "rope_fraction"), (dict(activation="gelu"), "activation"),
     (dict(layer_pattern=("mamba2", "gla", "mamba2", "attention")), "gla")],
)  # fmt: skip
def test_configs_bamba_cannot_express_are_refused_by_name(change, named):
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match=named):
        check_family(preset("micro-hybrid", vocab_size=97, **change))


@pytest.mark.parametrize("name", ["micro-hybrid", "small-hybrid"])
def test_hybrid_presets_are_saved_as_bamba(name):
    from slmkit.interop.families import check_family

    cfg = check_family(preset(name))
    assert cfg.family == "bamba" and cfg.rope_dim == cfg.dim_per_head // 2


def test_rope_fraction_is_checked_and_other_families_refuse_partial_rotary():
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match="rope_fraction=0.3"):
        preset("micro", vocab_size=97, rope_fraction=0.3)  # 32 * 0.3 -> 9 channels: odd
    with pytest.raises(UserError, match="family 'llama' cannot express rope_fraction=0.5"):
        check_family(preset("micro", vocab_size=97, rope_fraction=0.5))


def test_partial_rotary_leaves_the_other_channels_unturned():
    from slmkit.models.attention import apply_rope, rope_cos_sin

    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope_cos_sin(torch.arange(5), 4, 10000.0)
    out = apply_rope(x, cos[None, None], sin[None, None])
    assert torch.equal(out[..., 4:], x[..., 4:])
    assert torch.allclose(out[..., :4], apply_rope(x[..., :4], cos[None, None], sin[None, None]))
    assert not torch.allclose(out[:, :, 1:, :4], x[:, :, 1:, :4])
