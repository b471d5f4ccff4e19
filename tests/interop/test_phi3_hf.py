"""family phi3: transformers' Phi3ForCausalLM (fused qkv_proj and gate_up_proj, partial rotary, a sliding window,
longrope scaling) both ways, logits within 1e-5 of transformers' below and above the original context."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.interop.families import check_family
from slmkit.models import build_model

VOCAB, ORIGINAL = 256, 16
# partial_rotary_factor 0.75 of head_dim 16: 12 channels turn, 6 frequencies
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(6)],
    "long_factor": [1.0 + 1.3 * i for i in range(6)],
}
CASES = {
    "plain": dict(),
    "sliding": dict(sliding_window=5),
    "longrope-partial": dict(partial_rotary_factor=0.75, rope_parameters=LONGROPE),
    "longrope-attention-factor": dict(rope_parameters={**LONGROPE, "attention_factor": 1.3, "short_factor": [1.0] * 8,
                                                       "long_factor": [2.0] * 8}),
}  # fmt: skip


def phi3(seed: int = 0, **overrides):
    import transformers

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, original_max_position_embeddings=ORIGINAL,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    kwargs.update(json.loads(json.dumps(overrides)))  # transformers edits the dicts it is given
    config = transformers.Phi3Config(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.1 * noise)
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for case, overrides in CASES.items():
        theirs = phi3(**overrides)
        path = tmp_path_factory.mktemp(case)
        theirs.save_pretrained(path)
        out[case] = (theirs, load_model(path).eval())
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [12, 17, 40])
def test_transformers_phi3_loads_with_equal_logits(case, length, pairs):
    theirs, ours = pairs[case]
    assert ours.config.family == "phi3"
    idx = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = theirs(idx).logits
        assert (ours(idx) - expected).abs().max().item() < 1e-5


def test_switches_are_read():
    theirs = phi3(partial_rotary_factor=0.75, rope_parameters=LONGROPE)
    from slmkit.interop.hf import config_from_hf

    config = config_from_hf(theirs.config.to_dict())
    assert config.rope_fraction == 0.75 and config.rope_dim == 12
    scaling = config.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_seq_len) == ("longrope", 4.0, ORIGINAL)
    assert config_from_hf(phi3(sliding_window=5).config.to_dict()).sliding_window == 5
    assert config_from_hf(phi3().config.to_dict()).sliding_window is None


def test_cached_decode_across_the_original_context_equals_transformers(pairs):
    theirs, ours = pairs["longrope-partial"]
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state = ours.new_state(1, 32)
        got = [ours(idx[:, :10], state=state, pos=torch.arange(10))]
        got += [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i]), upto=i + 1) for i in range(10, 24)]
        out = theirs(idx[:, :10], use_cache=True)
        want, cache = [out.logits], out.past_key_values
        for i in range(10, 24):
            out = theirs(idx[:, i : i + 1], past_key_values=cache, use_cache=True)
            want.append(out.logits)
            cache = out.past_key_values
    assert (torch.cat(got, dim=1) - torch.cat(want, dim=1)).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_save_is_phi3_that_transformers_loads(case, pairs, tmp_path):
    import transformers

    _, ours = pairs[case]
    save_model(ours, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == ["Phi3ForCausalLM"]
    again = load_model(tmp_path / "m")
    assert again.config == ours.config
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == "Phi3ForCausalLM"
    names = set(dict(theirs.named_parameters()))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)).abs().max().item() < 1e-5


def test_a_fresh_slmkit_phi3_model_loads_in_transformers(tmp_path):
    import transformers

    config = preset("tiny", vocab_size=300, max_seq_len=64, family="phi3", tie_embeddings=False)
    model = build_model(config)
    model.init_weights(0)
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert (theirs(idx).logits - model(idx)).abs().max().item() < 1e-5


def test_phi3_refuses_what_phi3config_cannot_hold():
    yarn = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 32}
    with pytest.raises(UserError, match="family 'phi3' cannot express rope_scaling=.*yarn.*needs None or 'longrope'"):
        check_family(preset("tiny", family="phi3", rope_scaling=yarn))
    with pytest.raises(UserError, match="family 'phi3' cannot express qkv_bias=True"):
        check_family(preset("tiny", family="phi3", qkv_bias=True))
    with pytest.raises(UserError, match="family 'phi3' cannot express head_dim=24"):
        check_family(preset("tiny", family="phi3", head_dim=24))
