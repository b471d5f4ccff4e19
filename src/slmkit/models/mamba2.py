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
    """One layer's mamba2 state over `batch_size` rows (see the module docstring).

    conv (B, Cc, K-1), ssm (B, H, P, N) float32, length (B,): the state after `length` tokens. To go back:
    - prev_*: the state before the latest call (a verification pass is taken back from here);
    - ck_*: a checkpoint at ck_length, and ring (B, 2 * REWIND, Cc + H): the raw conv inputs and time steps of
      positions [ck_length, length), slot p % size, so a draft model's one-token calls can be taken back too.
      Before a call would overwrite inputs the checkpoint still needs, the checkpoint moves forward to
      REWIND tokens before the call's end (a replay of at most REWIND + 1 tokens, about every REWIND tokens).
    A row can go back to any length >= min(prev_length, ck_length): at least REWIND tokens, or into its latest
    call, unless that call was longer than the ring (a long prefill)."""

    kind = "mamba2"
    NAMES = ("conv", "ssm", "length", "prev_conv", "prev_ssm", "prev_length", "ck_conv", "ck_ssm", "ck_length", "ring")

    def __init__(self, mixer: Mamba2Mixer, batch_size: int, device, dtype) -> None:
        super().__init__()
        self.mixer = [mixer]  # not a submodule: the state holds no parameters
        conv = (batch_size, mixer.conv_dim, mixer.conv_kernel - 1)
        ssm = (batch_size, mixer.n_heads, mixer.head_dim, mixer.state_size)
        for prefix in ("", "prev_", "ck_"):
            self.register_buffer(prefix + "conv", torch.zeros(conv, device=device, dtype=dtype), persistent=False)
            self.register_buffer(prefix + "ssm", torch.zeros(ssm, device=device), persistent=False)  # float32
            self.register_buffer(
                prefix + "length", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False
            )
        ring = (batch_size, 2 * REWIND, mixer.conv_dim + mixer.n_heads)
        self.register_buffer("ring", torch.zeros(ring, device=device, dtype=dtype), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    @property
    def ring_size(self) -> int:
        return self.ring.shape[1]

    def reset(self, start: int, stop: int) -> None:
        for name in self.NAMES:
            getattr(self, name)[start:stop] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        self.crop(src, length)
        for name in self.NAMES:
            getattr(self, name)[dst] = getattr(self, name)[src]

    def pad_room(self) -> int:
        return 0  # every token fed changes the state: padding cannot be taken back for free

    def _inputs(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Raw inputs of positions [start, stop) of `row` from the ring, (1, stop - start, Cc + H)."""
        slots = torch.arange(start, stop, device=self.ring.device) % self.ring_size
        return self.ring[row, slots].unsqueeze(0)

    def crop(self, row: int, length: int) -> None:
        now = int(self.length[row])
        if length >= now:
            return
        prev, ck = int(self.prev_length[row]), int(self.ck_length[row])
        if prev <= length and now - prev <= self.ring_size:
            conv, ssm, base = self.prev_conv, self.prev_ssm, prev  # inside the latest call: the shortest replay
        elif ck <= length:
            conv, ssm, base = self.ck_conv, self.ck_ssm, ck
        else:
            raise UserError(
                f"a mamba2 state cannot go back from {now} to {length} tokens (it keeps the last {REWIND} at least)"
            )
        new_conv, new_ssm = self.mixer[0].replay(
            conv[row : row + 1], ssm[row : row + 1], self._inputs(row, base, length)
        )
        self.conv[row], self.ssm[row], self.length[row] = new_conv[0], new_ssm[0], length
        # the state before the latest call is unchanged; what was fed after `length` is forgotten
        if prev > length:
            self.prev_conv[row], self.prev_ssm[row], self.prev_length[row] = new_conv[0], new_ssm[0], length

    def _advance_checkpoints(self, keep: torch.Tensor, t: int, start: torch.Tensor) -> None:
        """Before a call of t tokens at positions start (B,): move each row's checkpoint so that the ring keeps
        [ck_length, end) once the call is written (rows whose checkpoint would fall out of it)."""
        end = start + t
        need = keep & (end - self.ck_length > self.ring_size)
        if t > REWIND or not bool(need.any()):
            return  # a long call sets the checkpoint at its own start or end (`remember`)
        for row in need.nonzero().flatten().tolist():
            ck, target = int(self.ck_length[row]), int(end[row]) - REWIND  # target <= start: inputs are in the ring
            conv, ssm = self.mixer[0].replay(
                self.ck_conv[row : row + 1], self.ck_ssm[row : row + 1], self._inputs(row, ck, target)
            )
            self.ck_conv[row], self.ck_ssm[row], self.ck_length[row] = conv[0], ssm[0], target

    def remember(self, ctx, conv: torch.Tensor, h: torch.Tensor, raw: torch.Tensor) -> None:
        """After a call with raw inputs (B, T, Cc + H) that produced conv history `conv` and SSM state `h`: active
        rows take them; the state before the call, the inputs and the checkpoint are kept for `crop`."""
        bsz, t, _ = raw.shape
        keep = ctx.active if ctx is not None and ctx.active is not None else None
        if keep is None:
            keep = torch.ones(bsz, dtype=torch.bool, device=raw.device)
        pos = ctx.pos.expand(bsz, t) if ctx is not None else self.length[:, None] + torch.arange(t, device=raw.device)
        start, end = pos[:, 0], pos[:, -1] + 1
        self._advance_checkpoints(keep, t, start)
        k3, k4 = keep[:, None, None], keep[:, None, None, None]
        size = self.ring_size
        # the ring: this call's inputs at their positions' slots (the last `size` of a longer call)
        tail = min(t, size)
        slots = (pos[:, t - tail :] % size)[:, :, None].expand(-1, -1, raw.shape[2])
        old = self.ring.gather(1, slots)
        self.ring.scatter_(1, slots, torch.where(k3, raw[:, t - tail :].to(self.ring.dtype), old))
        # the state before this call
        self.prev_conv.copy_(torch.where(k3, self.conv, self.prev_conv))
        self.prev_ssm.copy_(torch.where(k4, self.ssm, self.prev_ssm))
        self.prev_length.copy_(torch.where(keep, start, self.prev_length))
        if t > REWIND:  # a long call: the checkpoint moves to its start (its inputs fit the ring) or its end
            fits = t <= size
            self.ck_conv.copy_(torch.where(k3, self.conv if fits else conv.to(self.conv.dtype), self.ck_conv))
            self.ck_ssm.copy_(torch.where(k4, self.ssm if fits else h, self.ck_ssm))
            self.ck_length.copy_(torch.where(keep, start if fits else end, self.ck_length))
        self.conv.copy_(torch.where(k3, conv.to(self.conv.dtype), self.conv))
        self.ssm.copy_(torch.where(k4, h, self.ssm))
        self.length.copy_(torch.where(keep, end, self.length))

    def rows(self, start: int, stop: int) -> Mamba2State:
        view = Mamba2State.__new__(Mamba2State)
        nn.Module.__init__(view)
        view.mixer = self.mixer
        for name in self.NAMES:
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
        if inputs.shape[1] == 0:
            return conv.clone(), ssm.clone()
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
            state.remember(ctx, conv, h, torch.cat((xbc_raw, dt_raw), dim=-1))
        y = self.norm(y.reshape(bsz, t, self.d_inner), z)
        return self.out_proj(y)
