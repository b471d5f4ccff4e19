"""Linear-attention mixers: gated linear attention (`gla`) and BASED (`based`), in plain PyTorch.

Both keep, per head, a state S (Dk, Dv) instead of a key-value cache:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = q_t S_t

- `gla` (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training"): q, k of
  width d_model / 2 split into n_heads heads, v of width d_model; a data-dependent decay per key channel,
  g_t = logsigmoid(W2 W1 x_t + b) / 16 (a low-rank gate of rank `linear_gate_rank`, temperature 16); q scaled by
  1/sqrt(Dk); each head's output RMS-normalised, gated by silu(W_g x_t), then projected by o_proj.
- `based` (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
  tradeoff"): no decay (g = 0); q, k projected to `linear_feature_dim` (d) channels per head and lifted by the
  2nd-order Taylor map phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)], so phi(q).phi(k) = 1 + q.k/sqrt(d) +
  (q.k)^2/(2d) (about exp(q.k/sqrt(d)), and >= 1/2); o = phi(q) S / phi(q) z with z the running sum of phi(k)
  (kept as one more value column of S). In the same layer a sliding-window softmax attention (window
  `linear_window`, the `attention` mixer with that window) gives exact local recall; the two branches' outputs
  (each with its own output projection) are summed.

Training and prefill use the chunked form (`chunked_linear_attention`): within a chunk of Q tokens a masked,
decayed (Q, Q) product, across chunks the state carried by a short loop; one decoded token is one step of the
recurrence (a chunk of one). Decays enter as differences of cumulative log gates (never as quotients of small
products), so nothing overflows however strong the decay; the price is a (Q, Q, Dk) decay tensor per chunk and
head, about what plain attention's (T, T) scores cost at T = Q * Dk (`linear_chunk_size` trades it against the
loop). BASED has no decay and skips that tensor.

The inference state is fixed in size per row whatever the context: a `LinearState` (a `ReplayState`: rewindable
by recomputing from the raw inputs of the latest positions) holding S for every head, and for `based` also the
window branch's ring of keys and values (`BasedState`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import UserError
from slmkit.models.attention import Attention, Context, RMSNorm
from slmkit.models.state import ReplayState

REWIND = 40  # tokens a state can always take back (a speculative round verifies at most k + 1 = 33)
GATE_TEMPERATURE = 16.0  # gla's log decays are logsigmoid(.) / 16: near 1 unless the gate is far negative
DECAY_RANGE = (0.9, 0.999)  # gla's decays at the start of training (per key channel of a head, low to high)


def chunked_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, chunk: int, s0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_t = q_t S_t with S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, in chunks of `chunk` tokens.

    q, k (B, H, T, Dk); g (B, H, T, Dk) log decays (<= 0), or None for no decay; v (B, H, T, Dv); s0 (B, H, Dk, Dv)
    or None (zeros). Returns o (B, H, T, Dv) in q's dtype and the final S in float32. Padding to a whole chunk
    uses k = 0 and g = 0 (no input, no decay), so the final S is that after the last real token."""
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    if t == 1:  # one decoded token: the recurrence itself, a few small kernels
        state = s0.float() if s0 is not None else q.new_zeros(bsz, h, dk, dv, dtype=torch.float32)
        if g is not None:
            state = torch.exp(g[:, :, 0].float()).unsqueeze(-1) * state
        state = state + k[:, :, 0].float().unsqueeze(-1) * v[:, :, 0].float().unsqueeze(-2)  # k^T v
        return (q.float() @ state).to(dtype), state  # (B, H, 1, Dk) @ (B, H, Dk, Dv)
    chunk = min(chunk, t)
    pad = (-t) % chunk
    q, k, v = q.float(), k.float(), v.float()
    g = g.float() if g is not None else None
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, 0, 0, pad)) if g is not None else None
    nc = q.shape[2] // chunk
    q, k = q.view(bsz, h, nc, chunk, dk), k.view(bsz, h, nc, chunk, dk)
    v = v.view(bsz, h, nc, chunk, dv)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if g is None:
        scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, nc, Q_i, Q_j)
        q_from_start, k_to_end, chunk_decay = q, k, None
    else:
        cum = g.view(bsz, h, nc, chunk, dk).cumsum(3)  # log decay from the chunk start through each token
        # A_ij = sum_d q_id k_jd exp(cum_id - cum_jd) for j <= i (exponents <= 0 there; the rest masked first)
        diff = cum.unsqueeze(4) - cum.unsqueeze(3)  # (B, H, nc, Q_i, Q_j, Dk)
        decay = torch.exp(diff.masked_fill(~causal[:, :, None], -math.inf))
        scores = torch.einsum("bhcid,bhcjd,bhcijd->bhcij", q, k, decay)
        q_from_start = q * torch.exp(cum)  # the state entering the chunk decays until token i
        k_to_end = k * torch.exp(cum[:, :, :, -1:] - cum)  # token j's input decays until the chunk's end
        chunk_decay = torch.exp(cum[:, :, :, -1])  # (B, H, nc, Dk)
    o = scores @ v  # (B, H, nc, Q, Dv)
    chunk_states = k_to_end.transpose(-1, -2) @ v  # each chunk's own contribution at its end, (B, H, nc, Dk, Dv)
    state = s0.float() if s0 is not None else q.new_zeros(bsz, h, dk, dv)
    entering = []
    for c in range(nc):
        entering.append(state)
        carried = state if chunk_decay is None else chunk_decay[:, :, c, :, None] * state
        state = carried + chunk_states[:, :, c]
    o = o + q_from_start @ torch.stack(entering, dim=2)  # (B, H, nc, Q, Dv)
    o = o.reshape(bsz, h, nc * chunk, dv)[:, :, :t]
    return o.to(dtype), state


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)] over the last dimension (d -> 1 + d + d^2), so that
    phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)."""
    d = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * d)
    return torch.cat((ones, x / d**0.25, second), dim=-1)


class LinearState(ReplayState):
    """S (B, H, Dk, Dv) per row, float32, rewindable (`ReplayState`); the mixer says the widths."""

    kind = "linear"

    def __init__(self, mixer: nn.Module, batch_size: int, device, dtype) -> None:
        carry = {"s": ((mixer.n_heads, mixer.state_k, mixer.state_v), torch.float32)}
        super().__init__(mixer, batch_size, carry, mixer.input_width, REWIND, device, dtype)


class BasedState(nn.Module):
    """A `based` layer's state: the linear branch's `LinearState` and the window branch's keys and values (a
    `RingKVState` of window + slack slots, or a `KVState` when max_len is no longer than that). It takes back up
    to slack + 1 tokens (33: a speculative round), the ring's limit, and refuses more."""

    kind = "based"

    def __init__(self, linear: LinearState, window: nn.Module) -> None:
        super().__init__()
        self.linear, self.window = linear, window

    @property
    def batch_size(self) -> int:
        return self.linear.batch_size

    def reset(self, start: int, stop: int) -> None:
        self.linear.reset(start, stop)
        self.window.reset(start, stop)

    def move(self, src: int, dst: int, length: int) -> None:
        self.linear.move(src, dst, length)
        self.window.move(src, dst, length)

    def crop(self, row: int, length: int) -> None:
        # a ring keeps the window's keys for slack + 1 tokens back (a speculative round); further back they were
        # overwritten, and the window branch would quietly attend to fewer keys
        slack = getattr(self.window, "slack", None)
        now = int(self.linear.length[row])
        if slack is not None and now - length > slack + 1:
            raise UserError(
                f"a based state cannot go back from {now} to {length} tokens (its window cache keeps the last "
                f"{slack + 1})"
            )
        self.linear.crop(row, length)
        self.window.crop(row, length)

    def pad_room(self) -> int:
        return 0  # the linear branch absorbs every token it is fed

    def rows(self, start: int, stop: int) -> BasedState:
        return BasedState(self.linear.rows(start, stop), self.window.rows(start, stop))


class GatedLinearAttention(nn.Module):
    """`gla` (module docstring); `forward(x, ctx, state)` as every registered mixer."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.n_heads = config.n_heads
        self.key_dim = c // 2
        self.state_k, self.state_v = self.key_dim // self.n_heads, c // self.n_heads
        self.chunk = config.linear_chunk_size
        rank = config.linear_gate_rank
        self.q_proj = nn.Linear(c, self.key_dim, bias=False)
        self.k_proj = nn.Linear(c, self.key_dim, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(c, rank, bias=False), nn.Linear(rank, self.key_dim, bias=True))
        self.g_proj = nn.Linear(c, c, bias=False)  # the output gate
        self.o_norm = RMSNorm(self.state_v, config.norm_eps)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.input_width = 2 * self.key_dim + c  # what a state keeps per position to replay it: k, v, g
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self, generator: torch.Generator | None = None) -> None:
        """The decay gate's bias: at a zero gate input the decays of each head's key channels spread
        geometrically in -log(decay) over DECAY_RANGE (short to long memories), as decay = sigmoid(b)^(1/16)."""
        low, high = DECAY_RANGE
        log_decay = -torch.exp(torch.linspace(math.log(-math.log(low)), math.log(-math.log(high)), self.state_k))
        p = torch.exp(log_decay * GATE_TEMPERATURE)  # sigmoid(b)
        self.gk_proj[1].bias.copy_(torch.log(p / (1 - p)).repeat(self.n_heads))

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> LinearState:
        return LinearState(self, batch_size, device, dtype)

    def _heads(self, x: torch.Tensor, d: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, d).transpose(1, 2)  # (B, H, T, d)

    def _split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, v, g = raw.split([self.key_dim, self.v_proj.out_features, self.key_dim], dim=-1)
        return self._heads(k, self.state_k), self._heads(v, self.state_v), self._heads(g, self.state_k)

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """S after feeding `inputs` (B, T, width: raw k, v, g) to `carry`."""
        k, v, g = self._split(inputs)
        _, s = chunked_linear_attention(k, k, v, g, self.chunk, carry["s"])  # the output is not needed: q = k
        return {"s": s}

    def forward(self, x: torch.Tensor, ctx: Context | None, state: LinearState | None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self._heads(self.q_proj(x), self.state_k) * self.state_k**-0.5  # (B, H, T, Dk)
        g = F.logsigmoid(self.gk_proj(x).float()).to(x.dtype) / GATE_TEMPERATURE  # (B, T, C/2) log decays
        raw = torch.cat((self.k_proj(x), self.v_proj(x), g), dim=-1)  # (B, T, width)
        k, v, g = self._split(raw)
        o, s = chunked_linear_attention(q, k, v, g, self.chunk, state.s if state is not None else None)
        if state is not None:
            state.remember(ctx, {"s": s}, raw)
        o = self.o_norm(o.transpose(1, 2)).reshape(b, t, c)  # per-head norm, (B, T, C)
        return self.o_proj(o * F.silu(self.g_proj(x)))


class BasedAttention(nn.Module):
    """`based` (module docstring): Taylor-feature linear attention plus a sliding-window softmax branch."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.n_heads, self.feature_dim = config.n_heads, config.linear_feature_dim
        self.head_dim = c // self.n_heads
        self.state_k = 1 + self.feature_dim + self.feature_dim**2
        self.state_v = self.head_dim + 1  # the values and a column of ones: the normaliser phi(q).z
        self.chunk = config.linear_chunk_size
        features = self.n_heads * self.feature_dim
        self.q_proj = nn.Linear(c, features, bias=False)
        self.k_proj = nn.Linear(c, features, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.window_attn = Attention(config.replace(sliding_window=config.linear_window), layer_idx)
        self.input_width = features + c  # what a state keeps per position to replay it: k before features, v

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> BasedState:
        window = self.window_attn.new_state(batch_size, max_len, device, dtype)
        return BasedState(LinearState(self, batch_size, device, dtype), window)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return taylor_features(x.view(b, t, self.n_heads, self.feature_dim).transpose(1, 2))  # (B, H, T, Dk)

    def _kv(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = raw.split([self.n_heads * self.feature_dim, raw.shape[-1] - self.n_heads * self.feature_dim], dim=-1)
        b, t, _ = v.shape
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        return self._features(k), torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)  # (B, H, T, Dk), (.., D + 1)

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """S after feeding `inputs` (B, T, width: raw k, v) to `carry`."""
        k, v = self._kv(inputs)
        _, s = chunked_linear_attention(k, k, v, None, self.chunk, carry["s"])  # the output is not needed: q = k
        return {"s": s}

    def forward(self, x: torch.Tensor, ctx: Context | None, state: BasedState | None) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q = self._features(self.q_proj(x).float())  # (B, H, T, Dk), float32: so is o, divided below
        raw = torch.cat((self.k_proj(x), self.v_proj(x)), dim=-1)  # (B, T, width)
        k, v = self._kv(raw)
        o, s = chunked_linear_attention(q, k, v, None, self.chunk, state.linear.s if state is not None else None)
        if state is not None:
            state.linear.remember(ctx, {"s": s}, raw)
        o = (o[..., :-1] / o[..., -1:]).to(x.dtype)  # phi(q) S / phi(q) z: the normaliser is >= 1/2 per token seen
        linear = self.o_proj(o.transpose(1, 2).reshape(b, t, c))
        return linear + self.window_attn(x, ctx, state.window if state is not None else None)
