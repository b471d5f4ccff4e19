"""RoPE scaling types yarn and longrope: logits equal transformers' on tiny random models, below and above the
original context; config.json round trips; bad values are one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slmkit.config import RopeScaling, preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.interop.hf import config_from_hf

VOCAB = 256
ORIGINAL = 16  # original_max_position_embeddings of every case: lengths 12 and 16 stay within, 17 and 40 pass it
HALF_DIM = 8  # head_dim 16 -> 8 rotated frequencies

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "rope_theta": 10000.0}
LONGROPE = {
    "rope_type": "longrope",
    "original_max_position_embeddings": ORIGINAL,
    "rope_theta": 10000.0,
    "short_factor": [1.0 + 0.05 * i for i in range(HALF_DIM)],
    "long_factor": [1.0 + 1.3 * i for i in range(HALF_DIM)],
}
# (transformers model_type, rope_parameters): Qwen2-style yarn (plain, and DeepSeek-style mscale with
# non-default betas and no truncation, and an explicit attention factor) and Llama-style longrope (the factor
# implied by max_position_embeddings / original, or given, and an explicit attention factor)
CASES = {
    "qwen2-yarn": ("qwen2", YARN),
    "qwen2-yarn-mscale": (
        "qwen2",
        {**YARN, "rope_theta": 1000.0, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False},
    ),
    "llama-yarn-attention-factor": ("llama", {**YARN, "factor": 2.0, "attention_factor": 1.2, "beta_slow": 2}),
    "llama-longrope": ("llama", LONGROPE),
    "qwen2-longrope-factor": ("qwen2", {**LONGROPE, "factor": 8.0, "attention_factor": 1.1}),
}


def hf_model(model_type: str, rope: dict, seed: int = 0):
    """A transformers model with every parameter randomised (small enough that logits stay near 1)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = cls(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        rope_parameters=json.loads(json.dumps(rope)),  # transformers edits the dict it is given
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 2 else 0.05))
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """case -> (transformers model, the slmkit model loaded from its save_pretrained directory)."""
    out = {}
    for case, (model_type, rope) in CASES.items():
        theirs = hf_model(model_type, rope)
        path = tmp_path_factory.mktemp(case)
        theirs.save_pretrained(path)
        out[case] = (theirs, load_model(path).eval(), path)
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("length", [12, 16, 17, 40])
def test_logits_equal_transformers_below_and_above_the_original_context(case, length, pairs):
    theirs, ours, _ = pairs[case]
    assert ours.config.rope_scaling.type == CASES[case][1]["rope_type"]
    idx = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = theirs(idx).logits
        got = ours(idx)
    assert expected.abs().max() > 0.1  # not a trivially small output
    assert (got - expected).abs().max().item() < 1e-5


def test_longrope_switches_factors_per_forward_as_transformers(pairs):
    """A forward whose last position passes the original context rotates every position with the long
    factors (so its first positions differ from a short forward's), and a cached decode that crosses the
    boundary matches transformers' decode with its cache step by step."""
    theirs, ours, _ = pairs["llama-longrope"]
    idx = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        short, long = ours(idx[:, :12]), ours(idx)
        assert (short - long[:, :12]).abs().max() > 1e-2  # the long factors changed the early positions too

        state = ours.new_state(1, 32)
        steps = [ours(idx[:, :12], state=state, pos=torch.arange(12))]
        for i in range(12, 24):
            steps.append(ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i]), upto=i + 1))
        out = theirs(idx[:, :12], use_cache=True)
        expected, cache = [out.logits], out.past_key_values
        for i in range(12, 24):
            out = theirs(idx[:, i : i + 1], past_key_values=cache, use_cache=True)
            expected.append(out.logits)
            cache = out.past_key_values
    got, want = torch.cat(steps, dim=1), torch.cat(expected, dim=1)
    assert (got - want).abs().max().item() < 1e-5


def test_yarn_cached_decode_equals_full_forward(pairs):
    _, ours, _ = pairs["qwen2-yarn"]
    idx = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(idx)
        state = ours.new_state(2, 32)
        steps = [ours(idx[:, :10], state=state, pos=torch.arange(10))]
        for i in range(10, 30):
            steps.append(ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i]), upto=i + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_keeps_rope_parameters_and_transformers_reads_them(case, pairs, tmp_path):
    import transformers

    theirs, ours, source = pairs[case]
    save_model(ours, tmp_path / "again")
    again = load_model(tmp_path / "again")
    assert again.config.rope_scaling == ours.config.rope_scaling
    written = json.loads((tmp_path / "again" / "config.json").read_text())["rope_parameters"]
    given = CASES[case][1]
    for key, value in given.items():
        assert written[key] == pytest.approx(value), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert reloaded.model.rotary_emb.attention_scaling == pytest.approx(theirs.model.rotary_emb.attention_scaling)
    idx = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (reloaded(idx).logits - ours(idx)).abs().max().item() < 1e-5


def test_slmkit_family_round_trips_longrope(tmp_path):
    rope = {
        "type": "longrope",
        "factor": 4.0,
        "original_max_seq_len": 16,
        "short_factor": [1.0] * 4,
        "long_factor": [1.0, 2.0, 3.0, 4.0],
    }
    config = preset("tiny", vocab_size=300, d_model=32, n_heads=4, n_kv_heads=2, family="slmkit", rope_scaling=rope)
    from slmkit.models import build_model

    model = build_model(config)
    model.init_weights(0)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config.rope_scaling == config.rope_scaling
    assert again.config.rope_scaling.long_factor == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    "scaling, message",
    [
        (dict(type="yarn", factor=0, original_max_seq_len=16), "factor must be a number >= 1"),
        (dict(type="yarn", factor=-2.0, original_max_seq_len=16), "factor must be a number >= 1"),
        (dict(type="yarn", factor=2.0), "yarn rope_scaling needs original_max_seq_len"),
        (dict(type="yarn", factor=2.0, original_max_seq_len=16, beta_fast=1, beta_slow=4), "beta_fast >= beta_slow"),
        (dict(type="yarn", factor=2.0, original_max_seq_len=16, mscale=-1.0), "mscale must be a positive number"),
        (dict(type="yarn", factor=2.0, original_max_seq_len=16, short_factor=[1.0]), "does not take short_factor"),
        (dict(type="longrope", factor=2.0, original_max_seq_len=16, short_factor=[1.0] * 8), "needs long_factor"),
        (
            dict(type="longrope", factor=2.0, original_max_seq_len=16, short_factor=[1.0] * 8, long_factor=[1.0] * 7),
            "long_factor has 7 entries; it needs one per rotated frequency, rope_dim / 2 = 8",
        ),
        (
            dict(type="longrope", factor=2.0, original_max_seq_len=16, short_factor=[1.0, 0.0] * 4, long_factor=[1.0]),
            "short_factor, a list of positive numbers",
        ),
        (dict(type="linear", factor=2.0, beta_fast=3.0), "linear rope_scaling does not take beta_fast"),
    ],
)
def test_bad_rope_scaling_is_one_clear_error(scaling, message):
    with pytest.raises(UserError, match=message):
        preset("tiny", vocab_size=300, d_model=64, n_heads=4, n_kv_heads=2, rope_scaling=scaling)


@pytest.mark.parametrize(
    "rope, message",
    [
        ({**LONGROPE, "short_factor": [1.0] * 3}, "short_factor has 3 entries"),
        ({**LONGROPE, "long_factor": None}, "longrope rope parameters need long_factor"),
        ({**YARN, "factor": 0}, "factor must be a number >= 1"),
        ({**YARN, "factor": "2"}, "rope parameters need factor, a number"),
    ],
)
def test_bad_rope_parameters_in_config_json(rope, message):
    d = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        rope_parameters=rope,
    )
    with pytest.raises(UserError, match=message):
        config_from_hf(d)


def test_attention_scale_defaults():
    yarn = RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)
    assert yarn.attention_scale() == pytest.approx(0.1 * math.log(4.0) + 1)
    longrope = RopeScaling(
        type="longrope", factor=4.0, original_max_seq_len=16, short_factor=(1.0,), long_factor=(1.0,)
    )
    assert longrope.attention_scale() == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(16)))
