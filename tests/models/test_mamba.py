"""The mamba (Mamba-1) mixer: its chunked scan against the per-token recurrence written out here, its state through
prefill + decode, inactive rows, rewinds within a call and across one-token calls, parameter counts, bad values and
training. The decode-core paths (engine, speculation, continuous batcher) run in tests/models/test_mamba2.py's
parametrized tests, which include micro-mamba."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.models.attention import Context
from slmkit.models.mamba import REWIND, MambaMixer, MambaState
from slmkit_testing import rel_err


def tiny_config(**overrides):
    base = dict(vocab_size=97, d_model=32, n_layers=2, ssm_state_size=8, ssm_chunk_size=8)
    return preset("micro-mamba", **{**base, **overrides})


def perturbed(module, seed=0, scale=0.2):
    """Weights far from the tiny initialisation, so every term of the mixer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def naive_mixer(mx: MambaMixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer's definition token by token, from its parameters alone: conv over the last K inputs, then per
    channel h = exp(dt A) h + dt x B, y = h . C + D x, times silu(z), out_proj."""
    bsz, t, _ = x.shape
    xs, z = mx.in_proj(x).split([mx.d_inner, mx.d_inner], dim=-1)
    k = mx.conv_kernel
    padded = F.pad(xs, (0, 0, k - 1, 0))
    w = mx.conv1d.weight[:, 0]  # (I, K)
    xs = F.silu(torch.stack([(padded[:, i : i + k] * w.t()).sum(1) + mx.conv1d.bias for i in range(t)], dim=1))
    rank, b, c = mx.x_proj(xs).split([mx.dt_rank, mx.state_size, mx.state_size], dim=-1)
    dt = F.softplus(mx.dt_proj(rank))  # (B, T, I)
    a = -torch.exp(mx.A_log)  # (I, N)
    h = torch.zeros(bsz, mx.d_inner, mx.state_size)
    ys = []
    for i in range(t):
        h = torch.exp(dt[:, i, :, None] * a) * h + (dt[:, i] * xs[:, i])[..., None] * b[:, i, None, :]
        ys.append((h * c[:, i, None, :]).sum(-1) + mx.D * xs[:, i])
    return mx.out_proj(torch.stack(ys, dim=1) * F.silu(z))


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_scan_equals_the_recurrence_written_out(chunk):
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(ssm_chunk_size=chunk, ssm_dt_rank=3), 0))
    x = torch.randn(3, 21, 32)  # not a multiple of the chunk
    with torch.no_grad():
        assert torch.allclose(mx(x, None, None), naive_mixer(mx, x), atol=1e-5, rtol=1e-5)


def test_large_decays_stay_finite():
    """Summed log-decays of a chunk far below -88 (exp would overflow if divided out): still the recurrence."""
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(ssm_chunk_size=16), 0))
    with torch.no_grad():
        mx.A_log.add_(4.0)  # A about -55 * (1..N): every step decays by exp(-dt * 55 n)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        out = mx(x, None, None)
        assert bool(torch.isfinite(out).all())
        assert torch.allclose(out, naive_mixer(mx, x), atol=1e-5, rtol=1e-5)


def test_gradients_through_the_recomputed_chunks_equal_the_recurrence():
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(ssm_chunk_size=4), 0))
    x = torch.randn(2, 10, 32)
    grads = []
    for f in (lambda: mx(x, None, None), lambda: naive_mixer(mx, x)):
        mx.zero_grad()
        (f() ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in mx.named_parameters()})
    for name in grads[0]:  # large gradients (the loss is a sum of squares): compared relative to their size
        assert rel_err(grads[0][name], grads[1][name]) < 1e-5, name


def test_prefill_then_one_token_steps_equal_the_parallel_forward():
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(), 0))
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(2, 64, None, torch.float32)
        outs = [mx(x[:, :11], Context(torch.arange(11)[None]), state)]
        outs += [mx(x[:, i : i + 1], Context(torch.tensor([[i]])), state) for i in range(11, 30)]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_inactive_rows_keep_their_state_and_crop_takes_back_a_call():
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(), 0))
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(2, 64, None, torch.float32)
        mx(x[:, :8], Context(torch.arange(8)[None]), state)
        # row 1 is fed garbage while inactive; row 0 is fed 3 tokens of which 2 are then taken back
        junk = torch.randn(2, 3, 32)
        mx(
            torch.stack((x[0, 8:11], junk[1])),
            Context(torch.tensor([[8, 9, 10]]), active=torch.tensor([True, False])),
            state,
        )
        state.crop(0, 9)
        assert state.length.tolist() == [9, 8]
        out = mx(torch.stack((x[0, 9:12], x[1, 8:11])), Context(torch.tensor([[9, 10, 11], [8, 9, 10]])), state)
    assert torch.allclose(out[0], full[0, 9:12], atol=1e-5)
    assert torch.allclose(out[1], full[1, 8:11], atol=1e-5)


def test_crop_goes_back_across_one_token_calls_and_refuses_too_far():
    torch.manual_seed(0)
    mx = perturbed(MambaMixer(tiny_config(), 0))
    x = torch.randn(1, 140, 32)
    with torch.no_grad():
        full = mx(x, None, None)
        state = mx.new_state(1, 256, None, torch.float32)
        mx(x[:, :10], Context(torch.arange(10)[None]), state)
        for i in range(10, 130):  # past the ring several times: the checkpoint moves along
            mx(x[:, i : i + 1], Context(torch.tensor([[i]])), state)
        state.crop(0, 130 - REWIND)  # as far back as promised
        outs = [mx(x[:, i : i + 1], Context(torch.tensor([[i]])), state) for i in range(130 - REWIND, 140)]
        assert torch.allclose(torch.cat(outs, 1), full[:, 130 - REWIND :], atol=1e-5)
        with pytest.raises(UserError, match="cannot go back"):
            state.crop(0, 10)


def test_state_size_does_not_grow_with_the_context():
    mx = MambaMixer(tiny_config(), 0)
    small, large = mx.new_state(1, 128, None, torch.float32), mx.new_state(1, 16384, None, torch.float32)
    nbytes = [sum(b.numel() * b.element_size() for b in s.buffers()) for s in (small, large)]
    assert nbytes[0] == nbytes[1] and isinstance(small, MambaState)
    assert small.ssm.shape == (1, 64, 8) and small.conv.shape == (1, 64, 3)


@pytest.mark.parametrize("name", ["micro-mamba", "small-mamba"])
@pytest.mark.parametrize("rank", [None, 5])
def test_parameter_count_matches_the_built_model(name, rank):
    cfg = preset(name, vocab_size=512, ssm_dt_rank=rank)
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert model.layers[0].mixer.dt_proj.weight.shape[1] == (rank or cfg.d_model // 16)
    assert cfg.flops_per_token(256) > 6 * cfg.num_params(include_embeddings=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ssm_dt_rank": 0}, "ssm_dt_rank must be a positive integer or null"),
        ({"ssm_dt_rank": 2.5}, "ssm_dt_rank must be an integer, got 2.5"),
        ({"ssm_state_size": -1}, "ssm_state_size must be a positive integer"),
        ({"ssm_conv_kernel": True}, "ssm_conv_kernel must be an integer, got True"),
    ],
)
def test_config_refuses_bad_values_with_one_clear_error(changes, message):
    with pytest.raises(UserError, match=message):
        tiny_config(**changes)


def test_init_weights_gives_mambas_start():
    model = build_model(tiny_config())
    model.init_weights(seed=0)
    mx = model.layers[0].mixer
    assert torch.allclose(torch.exp(mx.A_log[5]), torch.arange(1.0, 9.0))
    dt = F.softplus(mx.dt_proj.bias.detach())
    assert 1e-3 * 0.99 <= float(dt.min()) and float(dt.max()) <= 0.1 * 1.01


def test_training_lowers_the_loss_and_the_saved_model_reloads(data_dir, tmp_path):
    from slmkit.loading import load
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    cfg = TrainConfig(
        preset="micro-mamba", model={"d_model": 64, "n_layers": 2}, seq_len=64, batch_size=8, max_steps=25, lr=3e-3,
        warmup_steps=5, eval_interval=1000, save_interval=1000,
    )  # fmt: skip
    result = train(cfg, data_dir, tmp_path / "run")
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3
    lm = load(tmp_path / "run")
    assert lm.model.config.mixers == {"mamba"} and lm.model.config.family == "mamba"
    idx = torch.randint(0, lm.model.config.vocab_size, (1, 20))
    state = lm.model.new_state(1, 32)
    with torch.no_grad():
        stepwise = torch.cat([lm.model(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(20)], 1)
        assert torch.allclose(stepwise, lm.model(idx), atol=1e-4)
