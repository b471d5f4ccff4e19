"""A new mixer plugs in through the registry alone: a toy recurrent mixer, defined only here, in a hybrid
(recurrent + attention) model, decodes through the engine (static batches, speculation), the continuous batcher
(rows joining and leaving, chunked prefill) and the server with greedy output equal to a plain loop over full
forward passes. Nothing in infer/ or serve/ knows it exists.

The toy's state is one vector per row, so a placeholder token fed to a row that is still prefilling, or a pad,
would corrupt it: the test fails unless the core marks such rows inactive and rewinds rejected speculative
tokens through `crop`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkit.config import PLUGIN_MIXER_COUNTS, ModelConfig
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine
from slmkit.models import build_model
from slmkit.models.registry import MIXERS, register_mixer
from slmkit_testing import PROMPTS, plain_greedy, run_batcher

SNAPSHOTS = 16  # positions a toy state can rewind: enough for a speculative round (k + 1 tokens)


class ToyRecurrentState(nn.Module):
    """h (B, C): the running state; snaps (B, R, C): h after each of the row's latest R positions (slot p % R
    holds h after p tokens), so `crop` can go back up to R - 1 positions; length (B,): tokens absorbed."""

    def __init__(self, batch_size: int, dim: int, device, dtype) -> None:
        super().__init__()
        self.register_buffer("h", torch.zeros(batch_size, dim, device=device, dtype=dtype), persistent=False)
        shape = (batch_size, SNAPSHOTS, dim)
        self.register_buffer("snaps", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("length", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    def reset(self, start: int, stop: int) -> None:
        self.h[start:stop] = 0
        self.snaps[start:stop, 0] = 0  # h after 0 tokens
        self.length[start:stop] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        for name in ("h", "snaps", "length"):
            getattr(self, name)[dst] = getattr(self, name)[src]

    def crop(self, row: int, length: int) -> None:
        now = int(self.length[row])
        if length >= now:
            return
        assert now - length < SNAPSHOTS, "a toy state rewinds at most SNAPSHOTS - 1 positions"
        self.h[row] = self.snaps[row, length % SNAPSHOTS]
        self.length[row] = length

    def rows(self, start: int, stop: int) -> ToyRecurrentState:
        view = ToyRecurrentState.__new__(ToyRecurrentState)
        nn.Module.__init__(view)
        for name in ("h", "snaps", "length"):
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view


class ToyRecurrentMixer(nn.Module):
    """h_t = decay * h_{t-1} + W_in x_t; y_t = W_out tanh(h_t): a linear recurrence, position-free."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.in_proj = nn.Linear(c, c, bias=False)
        self.out_proj = nn.Linear(c, c, bias=False)
        self.decay_logit = nn.Parameter(torch.linspace(-1.0, 2.0, c))

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> ToyRecurrentState:
        return ToyRecurrentState(batch_size, self.in_proj.in_features, device, dtype)

    def forward(self, x: torch.Tensor, ctx, state: ToyRecurrentState | None) -> torch.Tensor:
        b, t, c = x.shape
        u = self.in_proj(x)  # (B, T, C)
        decay = torch.sigmoid(self.decay_logit)
        h = state.h if state is not None else x.new_zeros(b, c)
        hs = []
        for i in range(t):
            h = decay * h + u[:, i]
            hs.append(h)
        after = torch.stack(hs, dim=1)  # (B, T, C): h after each token
        if state is not None:
            # rows fed a placeholder (inactive) keep their state
            keep = ctx.active[:, None] if ctx.active is not None else torch.ones(b, 1, dtype=torch.bool)
            pos = ctx.pos.expand(b, t)[:, -SNAPSHOTS:]
            slots = ((pos + 1) % SNAPSHOTS)[:, :, None].expand(-1, -1, c)  # (B, T', C)
            old = state.snaps.gather(1, slots)
            state.snaps.scatter_(1, slots, torch.where(keep[:, :, None], after[:, -SNAPSHOTS:], old))
            state.h.copy_(torch.where(keep, h, state.h))
            state.length.copy_(torch.where(keep[:, 0], pos[:, -1] + 1, state.length))
        return self.out_proj(torch.tanh(after))


@pytest.fixture(scope="module")
def toy(tiny_model_dir):
    """A hybrid model (toy recurrent layer, then attention) with the tiny model's tokenizer, and that tokenizer."""
    from slmkit.data.tokenizer import load_tokenizer

    register_mixer("toy_recurrent", ToyRecurrentMixer)
    tokenizer = load_tokenizer(tiny_model_dir / "tokenizer.json")
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
        max_seq_len=96, layer_pattern=("toy_recurrent", "attention"), eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    model = build_model(config)
    model.init_weights(seed=3)
    with torch.no_grad():  # varied, prompt-dependent greedy text
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    yield model.eval(), tokenizer
    MIXERS.pop("toy_recurrent")
    PLUGIN_MIXER_COUNTS.pop("toy_recurrent")


def test_the_toy_mixer_is_wired_in(toy):
    model, _ = toy
    state = model.new_state(2, 16)
    assert isinstance(state.layer(0), ToyRecurrentState) and model.layers[0].mixer_name == "mixer"
    assert model.layers[1].mixer_name == "self_attn"


def test_engine_batches_equal_the_plain_loop(toy):
    model, tokenizer = toy
    engine = Engine(model, tokenizer)
    outs = engine.generate(PROMPTS, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 12)


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_speculative_decoding_equals_the_plain_loop(toy, mode):
    from slmkit.infer.engine import EngineStats

    model, tokenizer = toy
    draft = build_model(model.config)  # a different (random) toy model: many rejections, so many crops
    draft.init_weights(seed=9)
    engine = Engine(model, tokenizer, draft=draft.eval())
    prompt = PROMPTS[3]
    stats = EngineStats()
    [out] = engine.generate(prompt, max_new_tokens=30, speculate=mode, speculate_k=4, min_acceptance=0.0, stats=stats)
    assert stats.drafted > 0 and stats.accepted < stats.drafted  # verification passes with rejections happened
    assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 30)


def test_continuous_batcher_with_rows_joining_and_leaving_equals_the_plain_loop(toy):
    model, tokenizer = toy
    # 2 rows for 4 requests, a 3-token prefill budget: prompts spread over steps while other rows decode
    batcher = ContinuousBatcher(model, tokenizer, max_batch=2, prefill_chunk=3)
    lengths = [5, 9, 3, 7]
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    seqs = run_batcher(batcher, requests, join_after=1, steps=2)
    for req, seq in zip(requests, seqs, strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


@pytest.mark.parametrize("speculate", ["off", "lookup"])
def test_the_server_serves_it(toy, speculate):
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    model, tokenizer = toy
    app = create_app(Engine(model, tokenizer), model_name="toy", max_batch=2, speculate=speculate, speculate_k=4)
    body = {"model": "toy", "prompt": PROMPTS[3], "max_tokens": 24, "temperature": 0}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    expected = plain_greedy(model, tokenizer.encode(PROMPTS[3]).ids, 24)
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected)


def test_the_server_refuses_an_unknown_speculation(toy):
    from slmkit.errors import UserError
    from slmkit.serve.app import create_app

    model, tokenizer = toy
    with pytest.raises(UserError, match="lookup drafts or not at all"):
        create_app(Engine(model, tokenizer), speculate="draft")


def test_batcher_lookup_speculation_equals_the_plain_loop(toy):
    """Every row drafts from its own text and all drafts are verified in one pass; rows join and leave."""
    model, tokenizer = toy
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3, prefill_chunk=4, speculate="lookup", speculate_k=4)
    lengths = [20, 9, 25, 14]
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    seqs = [batcher.submit(r) for r in requests[:2]]
    for _ in range(6):
        batcher.step()
    seqs += [batcher.submit(r) for r in requests[2:]]
    while batcher.has_work:
        batcher.step()
    assert sum(s.drafted for s in seqs) > 0 and sum(s.accepted for s in seqs) < sum(s.drafted for s in seqs)
    for req, seq in zip(requests, seqs, strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


def test_compiled_batcher_step_keeps_idle_rows_state(toy, caplog):
    """The compiled step runs over every row; rows still prefilling (or idle) are fed an inactive placeholder,
    which a recurrent state must not absorb."""
    model, tokenizer = toy
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3, prefill_chunk=3, compile=True)
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, [6, 9, 4, 8], strict=True)]
    with caplog.at_level("WARNING"):
        seqs = batcher.run(requests)
    assert "decoding eagerly" not in caplog.text
    for req, seq in zip(requests, seqs, strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


def test_a_plugin_mixer_is_counted(toy):
    # no counts given at registration: measured from the module, so num_params matches the model exactly
    model, _ = toy
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in model.layers[0].mixer.parameters() if p.ndim >= 2)
    assert model.config._mixer_params("toy_recurrent") == (
        sum(p.numel() for p in model.layers[0].mixer.parameters()),
        matrices,
    )
    assert model.config.flops_per_token() > 0
