"""The family switches on slmkit's own model: counts, sliding window in the cached path, validation."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.interop.checkpoint import save_model
from slmkit.interop.hf import config_from_hf, config_to_hf
from slmkit.models import build_model
from slmkit.train.config import TrainConfig

FAMILIES = {
    "llama-bias": dict(qkv_bias=True, out_bias=True, mlp_bias=True),
    "mistral": dict(family="mistral", sliding_window=4),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=24),
    "gpt2": dict(
        family="gpt2", n_kv_heads=4, norm="layernorm", mlp="plain", positions="learned", activation="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True,
    ),
    "llama3-rope": dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_seq_len": 16}),
    "yarn-rope": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 8}),
}  # fmt: skip


def make(case: str, seed: int = 0) -> torch.nn.Module:
    model = build_model(preset("tiny", vocab_size=300, max_seq_len=64, **FAMILIES[case]))
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    return model.eval()


@pytest.mark.parametrize("case", list(FAMILIES))
def test_num_params_and_cached_decode(case):
    model = make(case)
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, 300, (2, 14))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 32)
        steps = [model(idx[:, :5], state=state, pos=torch.arange(5))]
        for i in range(5, 14):
            steps.append(model(idx[:, i : i + 1], state=state, pos=torch.tensor([i]), upto=i + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_sliding_window_limits_attention_and_rows_of_different_lengths_are_exact():
    model = make("mistral")
    idx = torch.randint(0, 300, (1, 12))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 300
    with torch.no_grad():
        a, b = model(idx), model(changed)
    # with a window of 4 per layer and 2 layers, token 2 reaches at most position 2 + 2 * 3 = 8
    assert not torch.allclose(a[:, 2:9], b[:, 2:9])
    torch.testing.assert_close(a[:, 9:], b[:, 9:])

    long, short = torch.randint(0, 300, (9,)), torch.randint(0, 300, (4,))
    batch = torch.stack([long, torch.cat([short, torch.zeros(5, dtype=torch.long)])])
    with torch.no_grad():
        state = model.new_state(2, 16)
        batched = model(batch, state=state, pos=torch.arange(9)[None].expand(2, 9))
        alone_long, alone_short = model(long[None]), model(short[None])
    torch.testing.assert_close(batched[0], alone_long[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[1, :4], alone_short[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(norm="batchnorm"), "norm='batchnorm' is not supported"),
        (dict(activation="swiglu"), "activation='swiglu' is not supported"),
        (dict(family="falcon"), "family='falcon' is not supported"),
        (dict(sliding_window=0, family="mistral"), "sliding_window must be a positive integer"),
        (dict(rope_scaling={"type": "ntk", "factor": 2}), "rope_scaling type .ntk. is not supported"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor must be a number >= 1"),
        (dict(rope_scaling={"type": "llama3", "factor": 8}), "llama3 rope_scaling needs"),
    ],
)
def test_invalid_switches(changes, message):
    with pytest.raises(UserError, match=message):
        preset("tiny", **changes)


# what a family's config.json cannot express (rules in slmkit.interop.families, not in slmkit.config)
FAMILY_RULES = [
    (dict(qk_norm=True), "family 'llama' cannot express qk_norm=True"),
    (dict(family="qwen2"), "family 'qwen2' cannot express qkv_bias=False"),
    (dict(qkv_bias=True), "family 'llama' has one attention_bias flag: set qkv_bias == out_bias"),
    (dict(FAMILIES["gpt2"], n_kv_heads=2), "family 'gpt2' has one n_head key: set n_heads == n_kv_heads"),
]


@pytest.mark.parametrize("changes, message", FAMILY_RULES)
def test_family_rules_are_refused_before_training(changes, message):
    # `slm train --preset tiny --set ...` resolves its model config here, before any step runs
    with pytest.raises(UserError, match=f"model config: {message}"):
        TrainConfig(preset="tiny", model=changes, max_steps=1)


@pytest.mark.parametrize("changes, message", FAMILY_RULES)
def test_family_rules_are_refused_on_save(changes, message, tmp_path):
    # a config built in Python (no train config) is not written in a format that cannot hold it
    model = build_model(preset("tiny", vocab_size=300, **changes))
    with pytest.raises(UserError, match=message):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_default_config_is_unchanged_llama():
    cfg = preset("tiny")
    assert (cfg.family, cfg.norm, cfg.mlp, cfg.positions, cfg.activation) == (
        "llama",
        "rmsnorm",
        "gated",
        "rope",
        "silu",
    )
    assert config_from_hf(config_to_hf(cfg)) == cfg
    names = set(build_model(cfg).state_dict())
    assert "layers.0.self_attn.q_proj.weight" in names and not any(n.endswith(".bias") for n in names)
