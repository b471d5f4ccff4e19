"""Linear-attention mixers: gated linear attention (`gla`) and BASED (`based`), in plain PyTorch.

Both keep, per head, a state S (Dk, Dv) instead of a key-value cache:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          o_t = q_t S_t

- `gla` (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training"): q, k of
  width Dk = d_model / 2 split into heads, v of width d_model; a data-dependent decay per key channel,
  g_t = logsigmoid(W2 W1 x_t + b) / 16 (a low-rank gate, temperature 16); the output per head RMS-normalised,
  gated by swish(W_r x_t), then projected.
- `based` (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
  tradeoff"): no decay (g = 0); q, k projected to a small feature width d (16) per head and lifted by the
  2nd-order Taylor map phi(x) = [1, x / d^(1/4), (x outer x) / sqrt(2 d)], so phi(q).phi(k) = 1 + q.k/sqrt(d) +
  (q.k)^2/(2d), about exp(q.k/sqrt(d)); o = phi(q) S / (phi(q) z) with z the running sum of phi(k). Alongside,
  in the same layer, a short sliding-window softmax attention (window `linear_window`, 64) for exact local
  recall; the two outputs are summed (each branch has its own output projection).

Training and prefill use a chunked form (`chunked_linear_attention`): within a chunk of Q tokens a masked,
decayed (Q, Q) product, across chunks the state carried by a short loop; decoding a token is one step of the
recurrence. Decays are applied as differences of cumulative log gates, never as products of small numbers.

The inference state is a `ReplayState` (rewindable by recomputing from kept inputs) holding S per head (and
for `based` the key sum z folded into S as an extra value column), plus for `based` the window branch's
`RingKVState`: a fixed size per row whatever the context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.models.attention import RMSNorm, Attention, Context
from slmkit.models.state import ReplayState

REWIND = 40  # tokens a state can always take back (a speculative round verifies at most 33)
GATE_TEMPERATURE = 16.0
EPS = 1e-6


def chunked_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, chunk: int, s0: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_t = q_t S_t with S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, in chunks. q, k, g (B, H, T, Dk) (g: log decays
    <= 0, or None for none), v (B, H, T, Dv), s0 (B, H, Dk, Dv) or None. Returns o (B, H, T, Dv) and the final S.
    Padding uses k = 0 and g = 0: no input, no decay."""
    bsz, h, t, dk = q.shape
    dv = v.shape[-1]
    pad = (-t) % chunk
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    g = torch.zeros_like(k) if g is None else g.float()
    if pad:
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    nc = q.shape[2] // chunk
    q, k, g = (x.view(bsz, h, nc, chunk, dk) for x in (q, k, g))
    v = v.view(bsz, h, nc, chunk, dv)
    cum = g.cumsum(3)  # (B, H, nc, Q, Dk)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # within a chunk: A_ij = sum_d q_id k_jd exp(cum_id - cum_jd), j <= i
    diff = cum.unsqueeze(4) - cum.unsqueeze(3)  # (B, H, nc, Q_i, Q_j, Dk)
    decay = torch.exp(diff.masked_fill(~causal[:, :, None], -math.inf))
    scores = torch.einsum("bhcid,bhcjd,bhcijd->bhcij", q, k, decay)
    o = torch.einsum("bhcij,bhcjv->bhciv", scores, v)
    # each chunk's own contribution to the state at its end, and the decay across the whole chunk
    k_to_end = k * torch.exp(cum[:, :, :, -1:] - cum)
    chunk_states = torch.einsum("bhcjd,bhcjv->bhcdv", k_to_end, v)
    chunk_decay = torch.exp(cum[:, :, :, -1])  # (B, H, nc, Dk)
    state = s0.float() if s0 is not None else q.new_zeros(bsz, h, dk, dv)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, :, c, :, None] * state + chunk_states[:, :, c]
    before = torch.stack(entering, dim=2)  # (B, H, nc, Dk, Dv)
    o = o + torch.einsum("bhcid,bhcdv->bhciv", q * torch.exp(cum), before)
    o = o.reshape(bsz, h, nc * chunk, dv)[:, :, :t]
    return o.to(dtype), state


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)] over the last dimension (d), so that
    phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)."""
    d = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * d)
    return torch.cat((ones, x / d**0.25, second), dim=-1)


class LinearState(ReplayState):
    """S (B, H, Dk, Dv) per row, float32, rewindable (`ReplayState`)."""

    kind = "linear"

    def __init__(self, mixer: nn.Module, batch_size: int, device, dtype) -> None:
        carry = {"s": ((mixer.n_heads, mixer.state_k, mixer.state_v), torch.float32)}
        super().__init__(mixer, batch_size, carry, mixer.input_width, REWIND, device, dtype)


class BasedState(nn.Module):
    """A `based` layer's state: the linear branch's `LinearState` and the window branch's ring of keys/values."""

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
        self.linear.crop(row, length)
        self.window.crop(row, length)

    def pad_room(self) -> int:
        return 0

    def rows(self, start: int, stop: int) -> BasedState:
        return BasedState(self.linear.rows(start, stop), self.window.rows(start, stop))


class GatedLinearAttention(nn.Module):
    """`gla` (module docstring)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.n_heads = config.n_heads
        self.key_dim = c // 2
        if self.key_dim % self.n_heads or c % self.n_heads:
            from slmkit.errors import UserError

            raise UserError(f"model config: gla needs d_model / 2 ({self.key_dim}) divisible by n_heads")
        self.state_k, self.state_v = self.key_dim // self.n_heads, c // self.n_heads
        self.chunk = config.linear_chunk_size
        rank = config.linear_gate_rank
        self.q_proj = nn.Linear(c, self.key_dim, bias=False)
        self.k_proj = nn.Linear(c, self.key_dim, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(c, rank, bias=False), nn.Linear(rank, self.key_dim, bias=True))
        self.g_proj = nn.Linear(c, c, bias=False)  # output gate
        self.o_norm = RMSNorm(self.state_v, config.norm_eps)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.input_width = 2 * self.key_dim + c + self.key_dim  # q is not needed to replay: k, v, g (and padding)

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> LinearState:
        return LinearState(self, batch_size, device, dtype)

    def _heads(self, x: torch.Tensor, d: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, d).transpose(1, 2)  # (B, H, T, d)

    def _kvg(self, x: torch.Tensor) -> torch.Tensor:
        """The raw inputs of the recurrence, (B, T, width): k, v and the log decay (q rides along as zeros)."""
        k, v = self.k_proj(x), self.v_proj(x)
        g = F.logsigmoid(self.gk_proj(x)) / GATE_TEMPERATURE
        return torch.cat((torch.zeros_like(k), k, v, g), dim=-1)

    def _split(self, raw: torch.Tensor):
        kd, c = self.key_dim, self.v_proj.out_features
        _, k, v, g = raw.split([kd, kd, c, kd], dim=-1)
        return self._heads(k, self.state_k), self._heads(v, self.state_v), self._heads(g, self.state_k)

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        k, v, g = self._split(inputs)
        _, s = chunked_linear_attention(torch.zeros_like(k), k, v, g, self.chunk, carry["s"])
        return {"s": s}

    def forward(self, x: torch.Tensor, ctx: Context | None, state: LinearState | None) -> torch.Tensor:
        b, t, c = x.shape
        q = self._heads(self.q_proj(x), self.state_k)
        raw = self._kvg(x)
        k, v, g = self._split(raw)
        o, s = chunked_linear_attention(q, k, v, g, self.chunk if t > 1 else 1, state.s if state is not None else None)
        if state is not None:
            state.remember(ctx, {"s": s}, raw)
        o = self.o_norm(o).transpose(1, 2).reshape(b, t, c)
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
        self.q_proj = nn.Linear(c, self.n_heads * self.feature_dim, bias=False)
        self.k_proj = nn.Linear(c, self.n_heads * self.feature_dim, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.window_attn = Attention(config.replace(sliding_window=config.linear_window), layer_idx)
        self.input_width = 2 * self.n_heads * self.feature_dim + c

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> BasedState:
        window = self.window_attn.new_state(batch_size, max_len, device, dtype)
        return BasedState(LinearState(self, batch_size, device, dtype), window)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return taylor_features(x.view(b, t, self.n_heads, self.feature_dim).transpose(1, 2))  # (B, H, T, Dk)

    def _kv(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.n_heads * self.feature_dim
        _, k, v = raw.split([f, f, raw.shape[-1] - 2 * f], dim=-1)
        b, t, _ = v.shape
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        return self._features(k), torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        k, v = self._kv(inputs)
        _, s = chunked_linear_attention(torch.zeros_like(k), k, v, None, self.chunk, carry["s"])
        return {"s": s}

    def forward(self, x: torch.Tensor, ctx: Context | None, state: BasedState | None) -> torch.Tensor:
        b, t, c = x.shape
        q_raw = self.q_proj(x)
        raw = torch.cat((torch.zeros_like(q_raw), self.k_proj(x), self.v_proj(x)), dim=-1)
        q = self._features(q_raw)
        k, v = self._kv(raw)
        s0 = state.linear.s if state is not None else None
        o, s = chunked_linear_attention(q, k, v, None, self.chunk if t > 1 else 1, s0)
        if state is not None:
            state.linear.remember(ctx, {"s": s}, raw)
        o = o[..., :-1] / (o[..., -1:] + EPS)  # phi(q) S / phi(q) z
        linear = self.o_proj(o.transpose(1, 2).reshape(b, t, c))
        return linear + self.window_attn(x, ctx, state.window if state is not None else None)
