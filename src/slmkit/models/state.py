"""Per-layer inference state: what a mixer keeps between forward passes, behind one Protocol.

A model's state is one `LayerState` per layer (`ModelState`), made by ``model.new_state(batch, max_len)``;
each mixer builds, reads and writes only its own. Rows are sequences: the decode core admits a sequence into a
row (`reset`), moves the last row into a freed one so running rows stay packed (`move`), and takes back
rejected speculative tokens (`crop`). Nothing outside `slmkit.models` knows what a state holds.

Kinds:
- `KVState`: keys and values at one slot per position (slot = position), attended over slots ``<= query``;
  stale slots past a row's length are never visible, so reset and crop cost nothing.
- `RingKVState`: a sliding-window cache that really bounds memory: ``window + slack`` slots reused modulo,
  each slot tagged with the position it holds (-1 when empty). The slack keeps the keys that earlier queries of
  one multi-token call (a verification pass, a prefill chunk) still need while later tokens are written.
- recurrent states (state-space, linear attention) implement the same Protocol: `crop` restores the state after
  ``length`` tokens, so such a mixer keeps its state after each of its latest few positions (a speculative round
  rewinds at most k + 1 of them); `reset` zeroes a row; rows marked inactive in a pass must keep their state.

All states are `nn.Module`s with their tensors as buffers, so ``torch.compile`` treats them as static
addresses (CUDA graphs) and ``.to(device)`` moves them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from slmkit.errors import UserError


@runtime_checkable
class LayerState(Protocol):
    """One layer's inference state over ``batch_size`` rows."""

    @property
    def batch_size(self) -> int: ...

    def reset(self, start: int, stop: int) -> None:
        """Forget rows [start, stop): a new sequence starts there at position 0."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Make row dst hold what row src holds after its first `length` tokens (row src is then free)."""

    def crop(self, row: int, length: int) -> None:
        """Keep only the first `length` tokens of row `row` (speculative tokens past it were rejected); a recurrent
        state may go back only a bounded number of positions, at least a speculative round (33)."""

    def rows(self, start: int, stop: int) -> LayerState:
        """Rows [start, stop) as a state of their own; writes land in this state (views)."""


class KVState(nn.Module):
    """Keys and values (B, K, S, D), slot = position; queries see slots up to their own position."""

    kind = "kv"

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, device=None, dtype=torch.float32
    ) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self, start: int, stop: int) -> None:
        pass  # a new row writes slot p before any query at p reads it; later stale slots stay masked

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def crop(self, row: int, length: int) -> None:
        pass  # slots from `length` on are masked until rewritten

    def pad_room(self) -> int:
        """Positions a pass may feed a row past its real tokens and then `crop` (rows of different lengths in one
        prefill): any, since slots past a query are masked until rewritten."""
        return self.max_len

    def rows(self, start: int, stop: int) -> KVState:
        view = KVState.__new__(KVState)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view

    def update(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upto: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v (B, K, T, D) at positions pos (T,) or (1, T), or per row (B, T); return the keys and values
        to attend over, slots [0, upto), and None for their positions (slot index = position)."""
        if pos.dim() == 2 and pos.shape[0] == 1:
            pos = pos[0]  # one set of positions for every row
        if pos.dim() == 1:
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
        else:  # each row writes its own slots (rows at different lengths)
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
            self.k.transpose(1, 2)[rows, pos] = k.transpose(1, 2)  # (B, T, K, D) into (B, S, K, D)
            self.v.transpose(1, 2)[rows, pos] = v.transpose(1, 2)
        if upto is None:
            return self.k, self.v, None
        return self.k[:, :, :upto], self.v[:, :, :upto], None


class RingKVState(nn.Module):
    """A sliding-window cache of ``window + slack`` slots; slot ``p % size`` holds position p."""

    kind = "ring"

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        slack: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        self.window, self.slack = window, slack
        size = window + slack
        shape = (batch_size, n_kv_heads, size, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # the position each slot holds; -1: empty (never visible)
        self.register_buffer("slot_pos", torch.full((batch_size, size), -1, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def reset(self, start: int, stop: int) -> None:
        self.slot_pos[start:stop] = -1

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]
        self.slot_pos[dst] = self.slot_pos[src]

    def pad_room(self) -> int:
        # positions written past a row's end overwrite the oldest slots; within the slack those are out of every
        # later query's window
        return self.slack

    def crop(self, row: int, length: int) -> None:
        # rejected positions must not be seen (nor seen twice once rewritten); the slack guarantees the positions
        # they overwrote were older than any later query's window
        self.slot_pos[row].masked_fill_(self.slot_pos[row] >= length, -1)

    def rows(self, start: int, stop: int) -> RingKVState:
        view = RingKVState.__new__(RingKVState)
        nn.Module.__init__(view)
        view.window, view.slack = self.window, self.slack
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        view.register_buffer("slot_pos", self.slot_pos[start:stop], persistent=False)
        return view

    def update(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upto: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) for positions pos (T,) or (B, T); return keys, values and their positions
        (B, S') to attend over. A call of up to slack + 1 tokens writes first and attends over the ring; a longer
        one (a prefill) attends over the ring followed by its own tokens, then keeps the newest `size` of them."""
        b, _, t, _ = k.shape
        pos = pos.expand(b, t) if pos.dim() == 2 else pos.unsqueeze(0).expand(b, t)  # (B, T)
        size = self.size
        if t <= self.slack + 1:
            self._write(pos, k, v)
            return self.k, self.v, self.slot_pos
        keys = torch.cat((self.k, k), dim=2)  # (B, K, S + T, D)
        values = torch.cat((self.v, v), dim=2)
        key_pos = torch.cat((self.slot_pos, pos), dim=1)  # (B, S + T)
        self._write(pos[:, -size:], k[:, :, -size:], v[:, :, -size:])
        return keys, values, key_pos

    def _write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = pos % self.size  # (B, T), distinct within a row since T <= size
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
        self.k.transpose(1, 2)[rows, slots] = k.transpose(1, 2)
        self.v.transpose(1, 2)[rows, slots] = v.transpose(1, 2)
        self.slot_pos[rows, slots] = pos


class ReplayState(nn.Module):
    """A recurrent state (state-space, linear attention) that can take tokens back by recomputing forward.

    `carry` names the tensors the recurrence passes on, each (B, *shape); the mixer's ``replay(carry, inputs)``
    feeds raw per-token inputs (B, T, width) to a carry and returns the new one. Kept besides the carry:
    - prev_*: the carry before the latest call (a verification pass is taken back from there);
    - ck_*: a checkpoint at ck_length, and a ring (B, 2 * rewind, width) with the raw inputs of positions
      [ck_length, length) at slot p % size, so that a draft model's one-token calls can be taken back too. Before a
      call would overwrite inputs the checkpoint still needs, the checkpoint moves forward to `rewind` tokens
      before the call's end (one replay of about `rewind` tokens every `rewind` tokens).
    A row can go back to any length >= min(prev_length, ck_length): at least `rewind` tokens, or anywhere into
    its latest call unless that call was longer than the ring (a long prefill). Memory: three carries and the
    ring per row, whatever the context."""

    def __init__(self, mixer: nn.Module, batch_size: int, carry: dict, width: int, rewind: int, device, dtype):
        super().__init__()
        self.mixer = [mixer]  # not a submodule: the state holds no parameters
        self.carry_names = tuple(carry)
        self.rewind = rewind
        self.names: list[str] = ["ring"]
        for prefix in ("", "prev_", "ck_"):
            for name, (shape, kind) in carry.items():
                buf = torch.zeros((batch_size, *shape), device=device, dtype=kind)
                self.register_buffer(prefix + name, buf, persistent=False)
                self.names.append(prefix + name)
            length = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.register_buffer(prefix + "length", length, persistent=False)
            self.names.append(prefix + "length")
        ring = torch.zeros(batch_size, 2 * rewind, width, device=device, dtype=dtype)
        self.register_buffer("ring", ring, persistent=False)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    @property
    def ring_size(self) -> int:
        return self.ring.shape[1]

    def carry(self, prefix: str = "", start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        return {n: getattr(self, prefix + n)[start:stop] for n in self.carry_names}

    def reset(self, start: int, stop: int) -> None:
        for name in self.names:
            getattr(self, name)[start:stop] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        self.crop(src, length)
        for name in self.names:
            getattr(self, name)[dst] = getattr(self, name)[src]

    def pad_room(self) -> int:
        return 0  # every token fed changes the state: padding cannot be taken back for free

    def _inputs(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Raw inputs of positions [start, stop) of `row` from the ring, (1, stop - start, width)."""
        slots = torch.arange(start, stop, device=self.ring.device) % self.ring_size
        return self.ring[row, slots].unsqueeze(0)

    def _replay(self, prefix: str, row: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        carry = self.carry(prefix, row, row + 1)
        if stop == start:
            return {n: t.clone() for n, t in carry.items()}
        return self.mixer[0].replay(carry, self._inputs(row, start, stop))

    def _set(self, prefix: str, row: int, carry: dict[str, torch.Tensor], length: int) -> None:
        for name, tensor in carry.items():
            getattr(self, prefix + name)[row] = tensor[0]
        getattr(self, prefix + "length")[row] = length

    def crop(self, row: int, length: int) -> None:
        now = int(self.length[row])
        if length >= now:
            return
        prev, ck = int(self.prev_length[row]), int(self.ck_length[row])
        if prev <= length and now - prev <= self.ring_size:
            base, prefix = prev, "prev_"  # inside the latest call: the shortest replay
        elif ck <= length:
            base, prefix = ck, "ck_"
        else:
            raise UserError(
                f"a recurrent state cannot go back from {now} to {length} tokens (it keeps the last {self.rewind} "
                "at least)"
            )
        carry = self._replay(prefix, row, base, length)
        self._set("", row, carry, length)
        if prev > length:  # what was fed after `length` is forgotten
            self._set("prev_", row, carry, length)

    def _advance_checkpoints(self, keep: torch.Tensor, t: int, start: torch.Tensor) -> None:
        """Before a short call (t <= rewind) at positions start (B,): move the checkpoints that would fall out of
        the ring once the call is written to `rewind` tokens before the call's end (<= start: in the ring)."""
        if t > self.rewind:
            return  # a long call puts the checkpoint at its own start or end (`remember`)
        end = start + t
        need = keep & (end - self.ck_length > self.ring_size)
        if not bool(need.any()):
            return
        for row in need.nonzero().flatten().tolist():
            target = int(end[row]) - self.rewind
            self._set("ck_", row, self._replay("ck_", row, int(self.ck_length[row]), target), target)

    def remember(self, ctx, carry: dict[str, torch.Tensor], raw: torch.Tensor) -> None:
        """After a call with raw inputs (B, T, width) that ended in `carry`: active rows take it; the carry before
        the call, the inputs and the checkpoint are kept for `crop`. Inactive rows keep everything."""
        bsz, t, _ = raw.shape
        keep = ctx.active if ctx is not None and ctx.active is not None else None
        every = keep is None  # every row takes the call: plain copies, no masking (the batch-1 decode path)
        if keep is None:
            keep = torch.ones(bsz, dtype=torch.bool, device=raw.device)
        pos = ctx.pos.expand(bsz, t) if ctx is not None else self.length[:, None] + torch.arange(t, device=raw.device)
        start, end = pos[:, 0], pos[:, -1] + 1
        self._advance_checkpoints(keep, t, start)
        size = self.ring_size
        tail = min(t, size)  # the ring takes this call's inputs (the last `size` of a longer call)
        slots = (pos[:, t - tail :] % size)[:, :, None].expand(-1, -1, raw.shape[2])
        new_inputs = raw[:, t - tail :].to(self.ring.dtype)
        if not every:
            new_inputs = torch.where(keep[:, None, None], new_inputs, self.ring.gather(1, slots))
        self.ring.scatter_(1, slots, new_inputs)

        def put(prefix: str, new: dict[str, torch.Tensor], length: torch.Tensor) -> None:
            for name, tensor in new.items():
                target = getattr(self, prefix + name)
                if every:
                    target.copy_(tensor)
                else:
                    mask = keep.view(-1, *([1] * (target.dim() - 1)))
                    target.copy_(torch.where(mask, tensor.to(target.dtype), target))
            target = getattr(self, prefix + "length")
            target.copy_(length if every else torch.where(keep, length, target))

        before = self.carry()
        put("prev_", before, start)
        if t > self.rewind:  # a long call: the checkpoint goes to its start (inputs fit the ring) or its end
            put("ck_", before if t <= size else carry, start if t <= size else end)
        put("", carry, end)

    def rows(self, start: int, stop: int) -> ReplayState:
        view = self.__class__.__new__(self.__class__)
        nn.Module.__init__(view)
        view.mixer, view.carry_names, view.rewind, view.names = self.mixer, self.carry_names, self.rewind, self.names
        for name in self.names:
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view


class ModelState(nn.Module):
    """A model's inference state: one entry per layer (None for a layer that keeps nothing)."""

    def __init__(self, layers: list[nn.Module | None], batch_size: int, max_len: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(s if s is not None else nn.Identity() for s in layers)
        self._batch_size, self.max_len = batch_size, max_len
        # plain references for the per-layer lookup of every forward pass (ModuleList indexing is slow)
        self._by_layer: list[LayerState | None] = list(layers)  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def layer(self, i: int) -> LayerState | None:
        return self._by_layer[i]

    def _each(self) -> list[LayerState]:
        return [s for s in self._by_layer if s is not None]

    def reset(self, start: int, stop: int) -> None:
        for s in self._each():
            s.reset(start, stop)

    def move(self, src: int, dst: int, length: int) -> None:
        for s in self._each():
            s.move(src, dst, length)

    def crop(self, row: int, length: int) -> None:
        for s in self._each():
            s.crop(row, length)

    def pad_room(self) -> int:
        """Positions a pass may feed past a row's real tokens and then crop; 0 unless every layer's state says
        more (a recurrent state absorbs whatever it is fed)."""
        return min((getattr(s, "pad_room", lambda: 0)() for s in self._each()), default=self.max_len)

    def rows(self, start: int, stop: int) -> ModelState:
        views = [s.rows(start, stop) if s is not None else None for s in self._by_layer]
        return ModelState(views, stop - start, self.max_len)  # type: ignore[arg-type]
