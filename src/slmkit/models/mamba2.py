"""A Mamba-2 selective state-space mixer (Dao & Gu 2024, "Transformers are SSMs"), in plain PyTorch.

Per layer: ``in_proj`` makes the gate z, the conv input xBC and a time step per head; a depthwise causal
convolution (kernel K) and SiLU run over xBC, which splits into x (H heads of P channels), B and C (G groups
of N state channels, shared by H/G heads each). Each head keeps a state h (P, N):

    h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T          y_t = h_t C_t + D x_t

with dt_t = softplus(dt_raw + dt_bias) and A = -exp(A_log) (one scalar per head). The output is
RMSNorm(y * silu(z)) (the norm over all H*P channels, gate first), then ``out_proj``. Parameter names and shapes
are transformers' `Mamba2Mixer`'s, so weights map one to one (`slmkit.interop.families`, family mamba2).

Two ways to compute the same thing:
- `ssd_scan`: the chunked (state-space dual) form for training and prefill: within a chunk of Q tokens the
  output is a masked, decayed attention-like product; across chunks the state is carried by a short loop;
- `Mamba2Mixer.forward` with one token and a state: the recurrence above, one step.

The inference state (`Mamba2State`) per row: the last K-1 conv inputs and h for every head. To take back
rejected speculative tokens (`crop`) it also keeps two earlier states (before the latest call, and a checkpoint)
and the raw inputs of the latest 2 * REWIND positions, and recomputes forward from there: memory is two more
copies of h and a small input ring per row, not one h per position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.models.state import ReplayState

REWIND = 40  # tokens a state can always take back: a speculative round verifies at most k + 1 (33)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) * weight, in float32 (transformers' MambaRMSNormGated, gate before the norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(z.float())
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    chunk: int,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan in chunks. x (B, T, H, P), dt (B, T, H) (already softplus'd), a (H,) (negative),
    b, c (B, T, G, N), h0 (B, H, P, N) or None. Returns y (B, T, H, P) without the D skip, and the final state.

    Padding to a multiple of `chunk` uses dt = 0: decay 1 and no input, so the state passes through unchanged.
    """
    bsz, t, h, p = x.shape
    g, n = b.shape[2], b.shape[3]
    pad = (-t) % chunk
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        b, c = F.pad(b, (0, 0, 0, 0, 0, pad)), F.pad(c, (0, 0, 0, 0, 0, pad))
    nc = x.shape[1] // chunk
    dtype = x.dtype
    x, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    rep = h // g
    xs = (x * dt[..., None]).view(bsz, nc, chunk, h, p)  # dt_t x_t
    la = (dt * a.float()).view(bsz, nc, chunk, h)  # log decay per step (<= 0)
    cum = la.cumsum(2)  # (B, nc, Q, H)
    bs = b.view(bsz, nc, chunk, g, n)
    cs = c.view(bsz, nc, chunk, g, n)
    # within a chunk: y_i = sum_{j <= i} exp(cum_i - cum_j) (C_i . B_j) dt_j x_j
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # (B, nc, Q_i, Q_j, H)
    decay = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], -math.inf))
    scores = torch.einsum("bcign,bcjgn->bcijg", cs, bs).repeat_interleave(rep, dim=-1)  # (B, nc, Q, Q, H)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores * decay, xs)
    # each chunk's own contribution to the state at its end: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T
    to_end = torch.exp(cum[:, :, -1:] - cum)  # (B, nc, Q, H)
    b_heads = bs.repeat_interleave(rep, dim=3)  # (B, nc, Q, H, N)
    c_heads = cs.repeat_interleave(rep, dim=3)
    chunk_states = torch.einsum("bcqh,bcqhp,bcqhn->bchpn", to_end, xs, b_heads)
    # across chunks: carry the state, and read it out in each chunk with the decay since the chunk start
    state = h0.float() if h0 is not None else x.new_zeros(bsz, h, p, n)
    chunk_decay = torch.exp(cum[:, :, -1])  # (B, nc, H)
    entering = []
    for i in range(nc):
        entering.append(state)
        state = chunk_decay[:, i, :, None, None] * state + chunk_states[:, i]
    before = torch.stack(entering, dim=1)  # (B, nc, H, P, N)
    y = y + torch.einsum("bcqhn,bchpn,bcqh->bcqhp", c_heads, before, torch.exp(cum))
    y = y.reshape(bsz, nc * chunk, h, p)[:, :t]
    return y.to(dtype), state


class Mamba2State(ReplayState):
    """conv (B, Cc, K-1) and ssm (B, H, P, N, float32) per row, rewindable (`ReplayState`)."""

    kind = "mamba2"

    def __init__(self, mixer: Mamba2Mixer, batch_size: int, device, dtype) -> None:
        carry = {
            "conv": ((mixer.conv_dim, mixer.conv_kernel - 1), dtype),
            "ssm": ((mixer.n_heads, mixer.head_dim, mixer.state_size), torch.float32),
        }
        super().__init__(mixer, batch_size, carry, mixer.conv_dim + mixer.n_heads, REWIND, device, dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer (module docstring); `forward(x, ctx, state)` as every registered mixer."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        c = config.d_model
        self.d_inner = config.ssm_expand * c
        self.head_dim = config.ssm_head_dim
        self.n_heads = self.d_inner // self.head_dim
        self.n_groups = config.ssm_n_groups
        self.state_size = config.ssm_state_size
        self.conv_kernel = config.ssm_conv_kernel
        self.chunk_size = config.ssm_chunk_size
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size
        self.in_proj = nn.Linear(c, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, padding=self.conv_kernel - 1
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c, bias=False)
        self.reset_mixer_parameters()

    @torch.no_grad()
    def reset_mixer_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba's initialisation of the SSM scalars: A = 1..H, D = 1, dt log-uniform in [1e-3, 0.1] (dt_bias is
        its softplus inverse), the conv as torch's default (uniform, bound 1/sqrt(K)), and in_proj as torch's
        default too (uniform, bound 1/sqrt(d_model)), as the reference Mamba-2 leaves it, not the transformer's
        Normal(0, 0.02) of `init_weights`: the gate z, B and C multiply each other, and at 0.02 (width 64) they start
        so small that a mamba2 layer below an attention layer held MQAR recall at 0.294 after 2,000 steps; 0.794 at
        this scale (docs/architectures.md, associative recall)."""
        bound = 1 / math.sqrt(self.in_proj.in_features)
        self.in_proj.weight.copy_(torch.rand(self.in_proj.weight.shape, generator=generator) * 2 * bound - bound)
        bound = 1 / math.sqrt(self.conv_kernel)
        self.conv1d.weight.copy_(torch.rand(self.conv1d.weight.shape, generator=generator) * 2 * bound - bound)
        self.A_log.copy_(torch.log(torch.arange(1, self.n_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        u = torch.rand(self.n_heads, generator=generator)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def new_state(self, batch_size: int, max_len: int, device, dtype) -> Mamba2State:
        return Mamba2State(self, batch_size, device, dtype)

    # ---- pieces -------------------------------------------------------------------------------------
    def _split(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return proj.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)  # z, xBC, dt

    def _conv(self, xbc: torch.Tensor, history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU of xbc (B, T, Cc) after `history` (B, Cc, K-1) (zeros when None); returns
        the output (B, T, Cc) and the new history."""
        k = self.conv_kernel - 1
        seq = xbc.transpose(1, 2)  # (B, Cc, T)
        if history is None:
            history = seq.new_zeros(seq.shape[0], seq.shape[1], k)
        full = torch.cat((history.to(seq.dtype), seq), dim=2)  # (B, Cc, K-1 + T)
        if seq.shape[2] == 1:  # one decode step: a dot product per channel (a conv call costs ~10x more on CPU)
            out = (full * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)
            out = out + self.conv1d.bias[:, None] if self.conv1d.bias is not None else out
        else:
            out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (B, Cc, T)
        return F.silu(out).transpose(1, 2), full[:, :, full.shape[2] - k :]

    def _ssm_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        bsz, t, _ = xbc.shape
        gn = self.n_groups * self.state_size
        x, b, c = xbc.split([self.d_inner, gn, gn], dim=-1)
        x = x.reshape(bsz, t, self.n_heads, self.head_dim)
        b = b.reshape(bsz, t, self.n_groups, self.state_size)
        c = c.reshape(bsz, t, self.n_groups, self.state_size)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # (B, T, H)
        return x, b, c, dt

    def _step(self, h: torch.Tensor, x, b, c, dt) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: h (B, H, P, N); x (B, H, P); b, c (B, G, N); dt (B, H). Returns y (B, H, P) and h."""
        bsz, g = b.shape[0], self.n_groups
        a = -torch.exp(self.A_log.float())
        shape = (bsz, g, self.n_heads // g, self.head_dim, self.state_size)  # heads by group: B, C broadcast
        b, c = b.float()[:, :, None, None, :], c.float()[:, :, None, None, :]  # (B, G, 1, 1, N)
        decay = torch.exp(dt * a)[..., None, None]  # (B, H, 1, 1)
        update = ((dt[..., None] * x.float())[..., None].view(*shape[:4], 1) * b).view_as(h)
        h = decay * h + update
        y = (h.view(shape) * c).sum(-1).view(bsz, self.n_heads, self.head_dim)
        return y.to(x.dtype), h

    def replay(self, carry: dict[str, torch.Tensor], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state after feeding `inputs` (B, T, Cc + H: raw xBC and dt) to `carry` (conv, ssm)."""
        xbc_raw, dt_raw = inputs.split([self.conv_dim, self.n_heads], dim=-1)
        xbc, conv = self._conv(xbc_raw, carry["conv"])
        x, b, c, dt = self._ssm_inputs(xbc, dt_raw)
        _, h = ssd_scan(x, dt, -torch.exp(self.A_log.float()), b, c, self.chunk_size, carry["ssm"])
        return {"conv": conv, "ssm": h}

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx, state: Mamba2State | None) -> torch.Tensor:
        bsz, t, _ = hidden.shape
        z, xbc_raw, dt_raw = self._split(self.in_proj(hidden))
        xbc, conv = self._conv(xbc_raw, state.conv if state is not None else None)
        x, b, c, dt = self._ssm_inputs(xbc, dt_raw)
        a = -torch.exp(self.A_log.float())
        if state is not None and t == 1:
            y, h = self._step(state.ssm, x[:, 0], b[:, 0], c[:, 0], dt[:, 0])
            y = y[:, None]
        else:
            y, h = ssd_scan(x, dt, a, b, c, self.chunk_size, state.ssm if state is not None else None)
        y = y + x * self.D.to(x.dtype)[:, None]
        if state is not None:
            state.remember(ctx, {"conv": conv, "ssm": h}, torch.cat((xbc_raw, dt_raw), dim=-1))
        y = self.norm(y.reshape(bsz, t, self.d_inner), z)
        return self.out_proj(y)
