"""A Mamba-1 selective state-space mixer (Gu & Dao 2023), in plain PyTorch, as transformers' `MambaMixer` computes it.

Per layer: ``in_proj`` makes x and the gate z (inner width I each); a depthwise causal convolution (kernel K) and
SiLU run over x; ``x_proj`` reads the result and makes a low-rank time step (rank R), B and C (N each);
``dt_proj`` lifts the time step to every channel. Each channel i keeps a state h_i of N numbers:

    h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t          y_t = h_t . C_t + D x_t

with dt = softplus(dt_proj(.)) per channel and A = -exp(A_log) of shape (I, N): unlike Mamba-2, the decay differs
per channel and per state entry. The output is ``out_proj(y * silu(z))``. Parameter names and shapes are
transformers' (`slmkit.interop.families`, family mamba). Jamba's mixers first RMS-normalise the low-rank time
step, B and C (`ssm_dt_b_c_norm`; weights `dt_layernorm`, `b_layernorm`, `c_layernorm`, as transformers names them).

Two ways to compute the same thing:
- `selective_scan`: chunks of Q tokens; inside a chunk a doubling (Hillis-Steele) scan combines (decay, input)
  pairs in log2(Q) steps, multiplying decays (each <= 1) rather than dividing by cumulative ones, which would
  overflow as soon as the summed log-decay of a chunk passed about -88; across chunks the state is carried by a
  short loop. When gradients are needed, each chunk is recomputed in the backward pass (activation checkpointing),
  so training memory grows with T x I x N only through the per-chunk carries, not through every scan level;
- `MambaMixer.forward` with one token and a state: the recurrence above, one step.

The inference state (`MambaState`) per row: the last K-1 conv inputs and h (I x N, float32). It rewinds for
speculative decoding like Mamba-2's (`slmkit.models.state.ReplayState`): the raw conv inputs (width I) of the
latest positions are kept and replayed, since dt, B and C follow from them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slmkit.models.attention import RMSNorm
from slmkit.models.state import ReplayState

REWIND = 40  # tokens a state can always take back: a speculative round verifies at most k + 1 (33)


def _scan_chunk(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: x, dt (B, Q, I), a (I, N), b, c (B, Q, N), h0 (B, I, N), float32. Returns y (B, Q, I) without the
    D skip, and the state after the chunk."""
    decay = torch.exp(dt[..., None] * a)  # (B, Q, I, N): exp(dt A), each in (0, 1]
    inputs = (dt * x)[..., None] * b[:, :, None, :]  # dt x B^T
    q, step = x.shape[1], 1
    # after the step of width s, position t holds the product of decays over (t - 2s, t] and the inputs summed
    # over that window, each decayed to t; when s reaches Q every window starts at the chunk's first token
    while step < q:
        inputs = torch.cat((inputs[:, :step], inputs[:, step:] + decay[:, step:] * inputs[:, :-step]), dim=1)
        decay = torch.cat((decay[:, :step], decay[:, step:] * decay[:, :-step]), dim=1)
        step *= 2
    h = decay * h0[:, None] + inputs  # (B, Q, I, N): the state after every token of the chunk
    y = (h * c[:, :, None, :]).sum(-1)
    return y, h[:, -1]


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    chunk: int,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan in chunks. x, dt (B, T, I) (dt already softplus'd), a (I, N) (negative), b, c (B, T, N),
    h0 (B, I, N) or None. Returns y (B, T, I) (x's dtype) without the D skip, and the final state (float32)."""
    bsz, t, inner = x.shape
    dtype = x.dtype
    x, dt, a, b, c = x.float(), dt.float(), a.float(), b.float(), c.float()
    h = h0.float() if h0 is not None else x.new_zeros(bsz, inner, a.shape[1])
    recompute = torch.is_grad_enabled() and any(v.requires_grad for v in (x, dt, a, b, c, h))
    ys = []
    for start in range(0, t, chunk):
        part = (x[:, start : start + chunk], dt[:, start : start + chunk], a)
        part += (b[:, start : start + chunk], c[:, start : start + chunk], h)
        y, h = checkpoint(_scan_chunk, *part, use_reentrant=False) if recompute else _scan_chunk(*part)
        ys.append(y)
    return torch.cat(ys, dim=1).to(dtype), h


class MambaState(ReplayState):
    """conv (B, I, K-1) and ssm (B, I, N, float32) per row, rewindable (`ReplayState`)."""

    kind = "mamba"

    def __init__(self, mixer: MambaMixer, batch_size: int, device, dtype) -> None:
        carry = {
            "conv": ((mixer.d_inner, mixer.conv_kernel - 1), dtype),
            "ssm": ((mixer.d_inner, mixer.state_size), torch.float32),
        }
        super().__init__(mixer, batch_size, carry, mixer.d_inner, REWIND, device, dtype)


class MambaMixer(nn.Module):
    """The Mamba-1 mixer (module docstring); `forward(x, ctx, state)` as every registered mixer."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.d_inner = config.ssm_expand * c
        self.state_size = config.ssm_state_size
        self.conv_kernel = config.ssm_conv_kernel
        self.chunk_size = config.ssm_chunk_size
        self.dt_rank = config.mamba_dt_rank
        self.in_proj = nn.Linear(c, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.conv_kernel, groups=self.d_inner, padding=self.conv_kernel - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.state_size, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, self.state_size))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, c, bias=False)
        if config.ssm_dt_b_c_norm:  # Jamba's norms over the low-rank time step, B and C (before dt_proj)
            self.dt_layernorm = RMSNorm(self.dt_rank, config.norm_eps)
            self.b_layernorm = RMSNorm(self.state_size, config.norm_eps)
            self.c_layernorm = RMSNorm(self.state_size, config.norm_eps)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba's initialisation (transformers' `init_mamba_weights`): A = 1..N in every channel (S4D-real), D = 1,
        dt_proj's weight uniform in +-1/sqrt(R), dt log-uniform in [1e-3, 0.1] (dt_proj's bias is its softplus
        inverse), and the conv as torch's default (uniform, bound 1/sqrt(K))."""
        bound = 1 / math.sqrt(self.conv_kernel)
        self.conv1d.weight.copy_(torch.rand(self.conv1d.weight.shape, generator=generator) * 2 * bound - bound)
        a = torch.arange(1, self.state_size + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        self.dt_proj.weight.copy_(torch.rand(self.dt_proj.weight.shape, generator=generator) * 2 * std - std)
        u = torch.rand(self.d_inner, generator=generator)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> MambaState:
        return MambaState(self, batch_size, device, dtype)

    # ---- pieces -------------------------------------------------------------------------------------
    def _conv(self, x: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU of x (B, T, I) after `history` (B, I, K-1) (zeros when None); returns the
        output (B, T, I) and the new history."""
        k = self.conv_kernel - 1
        seq = x.transpose(1, 2)  # (B, I, T)
        if history is None:
            history = seq.new_zeros(seq.shape[0], seq.shape[1], k)
        full = torch.cat((history.to(seq.dtype), seq), dim=2)  # (B, I, K-1 + T)
        if seq.shape[2] == 1:  # one decode step: a dot product per channel (a conv call costs ~10x more on CPU)
            out = (full * self.conv1d.weight[:, 0]).sum(-1, keepdim=True) + self.conv1d.bias[:, None]
        else:
            out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # (B, I, T)
        return F.silu(out).transpose(1, 2), full[:, :, full.shape[2] - k :]

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (B, T, I, float32, softplus'd), B and C (B, T, N) from the conv output x (B, T, I)."""
        rank, b, c = self.x_proj(x).split([self.dt_rank, self.state_size, self.state_size], dim=-1)
        modules = self._modules
        if "dt_layernorm" in modules:
            rank, b, c = modules["dt_layernorm"](rank), modules["b_layernorm"](b), modules["c_layernorm"](c)
        dt = F.softplus(self.dt_proj(rank).float())  # the module, not its weight: compression may replace it
        return dt, b, c

    def _step(self, h: torch.Tensor, x, dt, b, c) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: h (B, I, N); x, dt (B, I); b, c (B, N). Returns y (B, I) and h."""
        a = -torch.exp(self.A_log.float())
        h = torch.exp(dt[..., None] * a) * h + (dt * x.float())[..., None] * b.float()[:, None]
        y = (h * c.float()[:, None]).sum(-1)
        return y.to(x.dtype), h

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state after feeding `inputs` (B, T, I: raw conv inputs) to `carry` (conv, ssm)."""
        x, conv = self._conv(inputs, carry["conv"])
        dt, b, c = self._ssm_inputs(x)
        _, h = selective_scan(x, dt, -torch.exp(self.A_log.float()), b, c, self.chunk_size, carry["ssm"])
        return {"conv": conv, "ssm": h}

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx, state: MambaState | None) -> torch.Tensor:
        t = hidden.shape[1]
        x_raw, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, T, I) each
        x, conv = self._conv(x_raw, state.conv if state is not None else None)
        dt, b, c = self._ssm_inputs(x)
        if state is not None and t == 1:
            y, h = self._step(state.ssm, x[:, 0], dt[:, 0], b[:, 0], c[:, 0])
            y = y[:, None]
        else:
            a = -torch.exp(self.A_log.float())
            y, h = selective_scan(x, dt, a, b, c, self.chunk_size, state.ssm if state is not None else None)
        y = y + x * self.D.to(x.dtype)
        if state is not None:
            state.remember(ctx, {"conv": conv, "ssm": h}, x_raw)
        return self.out_proj(y * F.silu(z))
