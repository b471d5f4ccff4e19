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
rejected speculative tokens (`crop`) it also keeps the state from before the latest call and that call's
inputs (at most `REWIND` tokens), and recomputes forward from there: memory is one more copy of h per row, not
one per position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import UserError

REWIND = 40  # tokens of the latest call kept for `crop`: a speculative round verifies at most k + 1 (33)


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


class Mamba2State(nn.Module):
    """conv (B, Cc, K-1): the latest conv inputs; ssm (B, H, P, N); length (B,): tokens absorbed. For `crop`:
    prev_conv/prev_ssm/prev_length, the state before the latest call, and that call's raw conv inputs and time
    steps (up to REWIND tokens; a longer call, a prefill, cannot be taken back)."""

    kind = "mamba2"

    def __init__(self, mixer: Mamba2Mixer, batch_size: int, device, dtype) -> None:
        super().__init__()
        self.mixer = [mixer]  # not a submodule: the state holds no parameters
        k = mixer.conv_kernel - 1
        shapes = {
            "conv": (batch_size, mixer.conv_dim, k),
            "ssm": (batch_size, mixer.n_heads, mixer.head_dim, mixer.state_size),
            "prev_conv": (batch_size, mixer.conv_dim, k),
            "prev_ssm": (batch_size, mixer.n_heads, mixer.head_dim, mixer.state_size),
            "inputs": (batch_size, REWIND, mixer.conv_dim + mixer.n_heads),
        }
        for name, shape in shapes.items():
            kind = torch.float32 if "ssm" in name else dtype  # the scan's state stays in float32
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=kind), persistent=False)
        for name in ("length", "prev_length"):
            self.register_buffer(name, torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    def _buffers_list(self) -> list[str]:
        return ["conv", "ssm", "prev_conv", "prev_ssm", "inputs", "length", "prev_length"]

    def reset(self, start: int, stop: int) -> None:
        for name in self._buffers_list():
            getattr(self, name)[start:stop] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        if int(self.length[src]) != length:
            self.crop(src, length)
        for name in self._buffers_list():
            getattr(self, name)[dst] = getattr(self, name)[src]

    def pad_room(self) -> int:
        return 0  # every token fed changes the state: no padding can be taken back

    def crop(self, row: int, length: int) -> None:
        now, before = int(self.length[row]), int(self.prev_length[row])
        if length >= now:
            return
        if length < before or now - before > REWIND:
            raise UserError(
                f"a mamba2 state can take back only tokens of its latest call (at most {REWIND}): "
                f"asked to go from {now} back to {length}, the latest call started at {before}"
            )
        conv, ssm = self.mixer[0].replay(
            self.prev_conv[row : row + 1], self.prev_ssm[row : row + 1], self.inputs[row : row + 1, : length - before]
        )
        self.conv[row], self.ssm[row] = conv[0], ssm[0]
        self.length[row] = length

    def rows(self, start: int, stop: int) -> Mamba2State:
        view = Mamba2State.__new__(Mamba2State)
        nn.Module.__init__(view)
        view.mixer = self.mixer
        for name in self._buffers_list():
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view


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
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba's initialisation of the SSM scalars: A = 1..H, D = 1, dt log-uniform in [1e-3, 0.1] (dt_bias is
        its softplus inverse), and the conv as torch's default (uniform, bound 1/sqrt(K))."""
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
        rep = self.n_heads // self.n_groups
        a = -torch.exp(self.A_log.float())
        b, c = b.float().repeat_interleave(rep, dim=1), c.float().repeat_interleave(rep, dim=1)  # (B, H, N)
        decay = torch.exp(dt * a)[..., None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[..., None] * x.float())[..., None] * b[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, c)
        return y.to(x.dtype), h

    def replay(self, conv: torch.Tensor, ssm: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv history and SSM state after feeding `inputs` (B, T, Cc + H: raw xBC and dt) to (conv, ssm)."""
        xbc_raw, dt_raw = inputs.split([self.conv_dim, self.n_heads], dim=-1)
        xbc, conv = self._conv(xbc_raw, conv)
        x, b, c, dt = self._ssm_inputs(xbc, dt_raw)
        h = ssm.float()
        for i in range(x.shape[1]):
            _, h = self._step(h, x[:, i], b[:, i], c[:, i], dt[:, i])
        return conv, h

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
            self._remember(state, ctx, conv, h, torch.cat((xbc_raw, dt_raw), dim=-1))
        y = self.norm(y.reshape(bsz, t, self.d_inner), z)
        return self.out_proj(y)

    @staticmethod
    def _remember(state: Mamba2State, ctx, conv: torch.Tensor, h: torch.Tensor, raw: torch.Tensor) -> None:
        """Write the new state for active rows; keep the old state and this call's inputs for `crop`."""
        bsz, t, _ = raw.shape
        keep = ctx.active if ctx is not None and ctx.active is not None else None
        if keep is None:
            keep = torch.ones(bsz, dtype=torch.bool, device=raw.device)
        k3, k4 = keep[:, None, None], keep[:, None, None, None]
        end = (ctx.pos[:, -1] + 1).expand(bsz) if ctx is not None else state.length + t  # tokens absorbed after it
        state.prev_conv.copy_(torch.where(k3, state.conv, state.prev_conv))
        state.prev_ssm.copy_(torch.where(k4, state.ssm, state.prev_ssm))
        state.prev_length.copy_(torch.where(keep, state.length, state.prev_length))
        n = min(t, REWIND)
        if t <= REWIND:
            state.inputs[:, :n].copy_(torch.where(k3, raw.to(state.inputs.dtype), state.inputs[:, :n]))
        else:  # too long to take back: the state before it is this state
            state.prev_length.copy_(torch.where(keep, end, state.prev_length))
            state.prev_conv.copy_(torch.where(k3, conv.to(state.conv.dtype), state.prev_conv))
            state.prev_ssm.copy_(torch.where(k4, h, state.prev_ssm))
        state.conv.copy_(torch.where(k3, conv.to(state.conv.dtype), state.conv))
        state.ssm.copy_(torch.where(k4, h, state.ssm))
        state.length.copy_(torch.where(keep, end, state.length))
