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
- `CompactKVState`: slot = position with keys and values quantized (int8/int4, per token and head) and/or key
  channels pruned (ThinK); `SinkKVState`: attention sinks + a window in a fixed number of slots, keys stored before
  rotation and rotated by their place in the cache (StreamingLLM), so a stream may run past the model's context.
  Both are chosen by a `KVCacheSpec` passed to ``model.new_state``.
- recurrent states (state-space, linear attention) implement the same Protocol: `crop` restores the state after
  ``length`` tokens, so such a mixer keeps its state after each of its latest few positions (a speculative round
  rewinds at most k + 1 of them); `reset` zeroes a row; rows marked inactive in a pass must keep their state.

All states are `nn.Module`s with their tensors as buffers, so ``torch.compile`` treats them as static
addresses (CUDA graphs) and ``.to(device)`` moves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

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

    # Optional: `position_buffers() -> list[Tensor] | None`, the tensors (B, H, S, X) whose slot s holds position s
    # (None or absent: positions cannot be copied between rows), what the batcher's prefix cache copies.


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

    def position_buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def slots(self) -> int:
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

    def keep_slots(self, row: int, src: torch.Tensor, start: int) -> None:
        """Move row's slots `src` (n,) to slots start..start+n-1 (a verified tree's accepted path, made contiguous)."""
        n = src.shape[0]
        self.k[row, :, start : start + n] = self.k[row, :, src]  # advanced indexing reads a copy first
        self.v[row, :, start : start + n] = self.v[row, :, src]


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

    @property
    def slots(self) -> int:
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
        # with a cache that rotates keys itself (`SinkKVState`): the most positions it rotates at (its slots); rotary
        # angles then stay below slots + call length whatever the sequence length. None: absolute positions.
        sizes = [s.slots for s in self._by_layer if getattr(s, "rotates_keys", False)]
        self.rotary_slots: int | None = max(sizes) if sizes else None

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

    def keep_slots(self, row: int, src: torch.Tensor, start: int) -> None:
        """Move row's slots `src` to slots start.. in every layer (plain KV caches only: a verified tree's path)."""
        for s in self._each():
            s.keep_slots(row, src, start)

    def pad_room(self) -> int:
        """Positions a pass may feed past a row's real tokens and then crop; 0 unless every layer's state says
        more (a recurrent state absorbs whatever it is fed)."""
        return min((getattr(s, "pad_room", lambda: 0)() for s in self._each()), default=self.max_len)

    def storage_bytes(self) -> int:
        """Bytes the state's tensors really hold (measured from their storage, not computed from shapes)."""
        return storage_bytes(self)

    def bytes_per_token(self) -> float | None:
        """Bytes one cached position takes over every layer that caches positions (keys, values, scales, tags);
        None when no layer does (recurrent states only)."""
        per = [storage_bytes(s) / (s.batch_size * s.slots) for s in self._each() if hasattr(s, "slots")]
        return sum(per) if per else None

    def rows(self, start: int, stop: int) -> ModelState:
        views = [s.rows(start, stop) if s is not None else None for s in self._by_layer]
        return ModelState(views, stop - start, self.max_len)  # type: ignore[arg-type]


# ---- bounded and compressed KV caches (`KVCacheSpec`: --kv-window/--kv-sinks, --kv-dtype, --kv-prune-keys) ----
KVDtype = Literal["auto", "int8", "int4"]
_BITS: dict[str, int | None] = {"auto": None, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class KVCacheSpec:
    """How attention layers keep their keys and values at inference (the default: every position, model dtype).

    window: keep the last `window` positions (plus `sinks` first ones): a cache of sinks + window slots whatever the
        sequence length (`SinkKVState`); generation may then run past the model's context.
    dtype: int8 / int4: keys and values quantized per token and kv head (asymmetric: a scale and a zero point in
        float16 per token and head), dequantized when attended over.
    prune_keys: drop this fraction of each kv head's key channels, chosen by query-driven importance on a row's
        first prefill pass (ThinK); values keep every channel.
    topk: with a window: InfLLM-style block memory (`BlockMemoryKVState`): positions that leave the window are kept
        in blocks of `block_size` (default 16), each with `reps` representative keys, and every query also attends
        to the `topk` blocks whose representative keys score highest for it.
    memory_blocks: keep at most this many blocks (the oldest go first); None: enough for the whole sequence.
    distance_cap: with a memory, the rotary distance of every key farther than this from its query (memory, sinks)
        is this (InfLLM: the window, the default); a larger cap keeps true distances up to it.
    Only attention layers read it; recurrent layers' states are bounded already."""

    window: int | None = None
    sinks: int = 0
    dtype: KVDtype = "auto"
    prune_keys: float = 0.0
    topk: int | None = None
    block_size: int | None = None
    memory_blocks: int | None = None
    reps: int = 4
    distance_cap: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise UserError(f"--kv-window must be >= 1 position, got {self.window}")
        if self.sinks < 0:
            raise UserError(f"--kv-sinks must be >= 0, got {self.sinks}")
        if self.sinks and self.window is None:
            raise UserError("--kv-sinks needs --kv-window: sink tokens are kept besides a window of recent ones")
        if self.dtype not in _BITS:
            raise UserError(f"--kv-dtype must be auto, int8 or int4, got {self.dtype!r}")
        if not (0.0 <= self.prune_keys < 1.0):
            raise UserError(f"--kv-prune-keys must be a fraction in [0, 1), got {self.prune_keys:g}")
        if self.prune_keys and self.window is not None:
            raise UserError(
                "--kv-prune-keys cannot be combined with --kv-window: the windowed cache keeps keys before their "
                "rotation (positions are re-assigned inside it), and rotation mixes the channels pruning would drop"
            )
        self._check_memory()

    def _check_memory(self) -> None:
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.topk is not None and (not whole(self.topk) or self.topk < 1):
            raise UserError(f"--kv-memory must be >= 1 block retrieved per query, got {self.topk}")
        if self.block_size is not None and (not whole(self.block_size) or self.block_size < 1):
            raise UserError(f"--kv-block must be >= 1 position, got {self.block_size}")
        if self.memory_blocks is not None and (not whole(self.memory_blocks) or self.memory_blocks < 1):
            raise UserError(f"--kv-memory-blocks must be >= 1, got {self.memory_blocks}")
        if not whole(self.reps) or self.reps < 1:
            raise UserError(f"reps (representative keys per block) must be >= 1, got {self.reps}")
        if self.distance_cap is not None and (not whole(self.distance_cap) or self.distance_cap < 1):
            raise UserError(f"distance_cap must be >= 1 position, got {self.distance_cap}")
        if self.topk is None:
            extra = [n for n, v in (("--kv-block", self.block_size), ("--kv-memory-blocks", self.memory_blocks)) if v]
            if extra or self.distance_cap is not None:
                raise UserError(f"{(extra or ['distance_cap'])[0]} needs --kv-memory TOPK (the block memory)")
            return
        if self.window is None:
            raise UserError(
                "--kv-memory needs --kv-window: the block memory holds the positions that leave the local window"
            )
        if self.memory_blocks is not None and self.memory_blocks < self.topk:
            raise UserError(
                f"--kv-memory-blocks {self.memory_blocks} is fewer than the {self.topk} blocks retrieved per query "
                "(--kv-memory)"
            )

    @property
    def block(self) -> int:
        """Positions per memory block."""
        return self.block_size or 16

    @property
    def is_default(self) -> bool:
        return self.window is None and self.dtype == "auto" and not self.prune_keys

    @property
    def bounded(self) -> bool:
        """Whether the cache holds a fixed number of positions (generation may run past the model's context)."""
        return self.window is not None

    @property
    def bits(self) -> int | None:
        return _BITS[self.dtype]

    def describe(self) -> str:
        parts = [f"window {self.window} + {self.sinks} sinks"] if self.window is not None else ["full"]
        if self.topk is not None:
            kept = f"{self.memory_blocks} blocks" if self.memory_blocks else "every block"
            parts.append(f"memory: top {self.topk} of {kept} of {self.block}")
        parts.append(self.dtype if self.dtype != "auto" else "model dtype")
        if self.prune_keys:
            parts.append(f"{self.prune_keys:.0%} of key channels pruned")
        return ", ".join(parts)


def storage_bytes(module: nn.Module) -> int:
    """Bytes of the storage behind a module's buffers (each storage once): what a state really holds."""
    seen: dict[int, int] = {}
    for buf in module.buffers():
        storage = buf.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> codes (..., D) uint8 (int4: two per byte, (..., D/2)), scale and zero (..., 1) in float16.
    Asymmetric per vector: min..max maps onto 0..2^bits-1; codes are computed against the float16-rounded scale and
    zero, so storing those adds no error of its own."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-4).half()
    zero = lo.half()
    codes = ((xf - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, zero


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    if bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    return (codes.float() * scale.float() + zero.float()).to(dtype)


class SlotStore(nn.Module):
    """Vectors (B, K, S, D) at slots, as they are (bits None) or quantized (8 or 4 bits, `quantize`)."""

    def __init__(self, shape: tuple[int, int, int, int], bits: int | None, device, dtype: torch.dtype) -> None:
        super().__init__()
        b, h, s, d = shape
        self.bits, self.dtype = bits, dtype
        if bits is None:
            self.names: tuple[str, ...] = ("data",)
            self.register_buffer("data", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            return
        if bits == 4 and d % 2:
            raise UserError(f"--kv-dtype int4 packs two channels per byte: needs an even head dim, got {d}")
        self.names = ("data", "scale", "zero")
        width = d if bits == 8 else d // 2
        self.register_buffer("data", torch.zeros((b, h, s, width), device=device, dtype=torch.uint8), persistent=False)
        self.register_buffer("scale", torch.zeros((b, h, s, 1), device=device, dtype=torch.float16), persistent=False)
        self.register_buffer("zero", torch.zeros((b, h, s, 1), device=device, dtype=torch.float16), persistent=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x.to(self.dtype),) if self.bits is None else quantize(x, self.bits)

    def decode(self, parts: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        return parts[0].to(dtype) if self.bits is None else dequantize(*parts, self.bits, dtype)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """What x reads back as once stored."""
        return x if self.bits is None else self.decode(self.encode(x), x.dtype)

    def write(self, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x (B, K, T, D) into slots (B, T) of rows (B, 1); slots distinct within a row."""
        for name, part in zip(self.names, self.encode(x), strict=True):
            getattr(self, name).transpose(1, 2)[rows, slots] = part.transpose(1, 2)

    def read(self, dtype: torch.dtype, stop: int | None = None) -> torch.Tensor:
        return self.decode(tuple(getattr(self, n)[:, :, :stop] for n in self.names), dtype)

    def move(self, src: int, dst: int, length: int | None = None) -> None:
        for name in self.names:
            buf = getattr(self, name)
            buf[dst, :, :length] = buf[src, :, :length]

    def view(self, start: int, stop: int) -> SlotStore:
        view = SlotStore.__new__(SlotStore)
        nn.Module.__init__(view)
        view.bits, view.dtype, view.names = self.bits, self.dtype, self.names
        for name in self.names:
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view


def _row_slots(pos: torch.Tensor, b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, 1) and positions (B, T) of a call's positions (T,), (1, T) or (B, T)."""
    pos = pos.expand(b, t) if pos.dim() == 2 else pos.unsqueeze(0).expand(b, t)
    return torch.arange(b, device=pos.device).unsqueeze(1), pos


class CompactKVState(nn.Module):
    """Slot = position as in `KVState`, with keys and values quantized (`SlotStore`) and/or key channels pruned.

    Pruning (ThinK): on a row's first pass (a prefill at position 0) each kv head keeps the key channels with the
    largest |q|·|k| (norms over that pass's tokens, the query norms summed over the head's query group); stored keys
    have only those channels, and queries are cut to them before the dot product (the softmax scale stays
    1/sqrt(head dim)). A prompt prefilled in chunks chooses from its first chunk."""

    kind = "compact"

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
        bits: int | None = None,
        prune_keys: float = 0.0,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.key_dim = head_dim - int(round(prune_keys * head_dim))
        if self.key_dim < 1:
            raise UserError(f"--kv-prune-keys {prune_keys:g} would prune every key channel of a {head_dim}-dim head")
        self.keys = SlotStore((batch_size, n_kv_heads, max_len, self.key_dim), bits, device, dtype)
        self.values = SlotStore((batch_size, n_kv_heads, max_len, head_dim), bits, device, dtype)
        self.pruned = self.key_dim < head_dim
        if self.pruned:  # the kept key channels of each row and kv head, ascending
            channels = torch.arange(self.key_dim, device=device).expand(batch_size, n_kv_heads, -1).clone()
            self.register_buffer("channels", channels, persistent=False)

    def position_buffers(self) -> list[torch.Tensor] | None:
        """Slot = position, unless keys are pruned (each row keeps its own channels)."""
        if self.pruned:
            return None
        return [getattr(store, name) for store in (self.keys, self.values) for name in store.names]

    @property
    def batch_size(self) -> int:
        return self.values.data.shape[0]

    @property
    def max_len(self) -> int:
        return self.values.data.shape[2]

    @property
    def slots(self) -> int:
        return self.max_len

    def reset(self, start: int, stop: int) -> None:
        pass  # as KVState; pruned channels are chosen again at the row's first pass

    def move(self, src: int, dst: int, length: int) -> None:
        self.keys.move(src, dst, length)
        self.values.move(src, dst, length)
        if self.pruned:
            self.channels[dst] = self.channels[src]

    def crop(self, row: int, length: int) -> None:
        pass

    def pad_room(self) -> int:
        return self.max_len

    def rows(self, start: int, stop: int) -> CompactKVState:
        view = CompactKVState.__new__(CompactKVState)
        nn.Module.__init__(view)
        view.head_dim, view.key_dim, view.pruned = self.head_dim, self.key_dim, self.pruned
        view.keys, view.values = self.keys.view(start, stop), self.values.view(start, stop)
        if self.pruned:
            view.register_buffer("channels", self.channels[start:stop], persistent=False)
        return view

    def _choose_channels(self, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        b, n_kv, _, d = k.shape
        q_norm = q.float().square().sum(2).view(b, n_kv, -1, d).sum(2).sqrt()  # (B, K, D)
        importance = q_norm * k.float().square().sum(2).sqrt()  # (B, K, D)
        chosen = importance.topk(self.key_dim, dim=-1).indices.sort(dim=-1).values
        first = (pos[:, 0] == 0)[:, None, None]  # rows starting here choose; the others keep theirs
        self.channels.copy_(torch.where(first, chosen, self.channels))

    def attend_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """Store k, v (B, K, T, D) (rotated) at the call's positions; the queries, keys and values to attend with,
        the mask (B or 1, 1, T, S) and the softmax scale."""
        b, n_kv, t, d = k.shape
        rows, pos = _row_slots(ctx.pos, b, t)
        if self.pruned:
            self._choose_channels(pos, q, k)
            k = k.gather(-1, self.channels.unsqueeze(2).expand(b, n_kv, t, self.key_dim))
            group = q.shape[1] // n_kv
            index = self.channels[:, :, None, None, :].expand(b, n_kv, group, t, self.key_dim)
            q = q.view(b, n_kv, group, t, d).gather(-1, index).reshape(b, n_kv * group, t, self.key_dim)
        self.keys.write(rows, pos, k)
        self.values.write(rows, pos, v)
        keys, values = self.keys.read(q.dtype, ctx.upto), self.values.read(q.dtype, ctx.upto)
        n = keys.shape[2]
        key = ("compact", n, window)
        if t == 1 and not ctx.per_row and window is None and ctx.upto is not None:
            ctx.masks[key] = None  # one query at the newest slot: every slot in [0, upto) is visible
        if key not in ctx.masks:
            query = ctx.pos.unsqueeze(-1)  # (B or 1, T, 1)
            slots = torch.arange(n, device=q.device)
            mask = slots <= query
            if window is not None:
                mask = mask & (slots > query - window)
            ctx.masks[key] = mask.unsqueeze(1)
        return q, keys, values, ctx.masks[key], 1.0 / math.sqrt(d)


class SinkKVState(nn.Module):
    """Attention sinks + a sliding window (StreamingLLM): the first `sinks` positions and the last `window` ones,
    in ``sinks + window + slack`` slots whatever the sequence length (slot p for p < sinks, else
    ``sinks + (p - sinks) % (window + slack)``; the slack as in `RingKVState`).

    Positions are re-assigned inside the cache, so rotary angles stay bounded however long the stream runs: keys
    are stored before rotation and rotated when attended over, the window's at their position minus a per-call
    offset (distances within the window are exact), the sinks at their own position against a query rotated at
    ``min(q, sinks + window - 1)``: a sink is as far from the query as if it came right before the window, the
    distances the model saw in training. While the sequence fits the cache this is exactly full attention.
    A decode step (one query per row) rotates the sink keys at ``i + max(0, q - (sinks + window - 1))`` instead;
    a call of several queries sends the two rotations of each query through one attention call: queries
    [q_window, q_sink] over keys [k, 0] (window) or [0, k] (sinks), twice the head dim, same scale."""

    kind = "sinks"
    rotates_keys = True

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        sinks: int,
        window: int,
        slack: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
        bits: int | None = None,
    ) -> None:
        super().__init__()
        self.sinks, self.window, self.slack = sinks, window, slack
        size = sinks + window + slack
        self.keys = SlotStore((batch_size, n_kv_heads, size, head_dim), bits, device, dtype)
        self.values = SlotStore((batch_size, n_kv_heads, size, head_dim), bits, device, dtype)
        self.register_buffer("slot_pos", torch.full((batch_size, size), -1, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    @property
    def size(self) -> int:
        return self.slot_pos.shape[1]

    @property
    def slots(self) -> int:
        return self.size

    @property
    def ring(self) -> int:
        return self.window + self.slack

    def reset(self, start: int, stop: int) -> None:
        self.slot_pos[start:stop] = -1

    def move(self, src: int, dst: int, length: int) -> None:
        self.keys.move(src, dst)
        self.values.move(src, dst)
        self.slot_pos[dst] = self.slot_pos[src]

    def pad_room(self) -> int:
        return self.slack  # as RingKVState

    def crop(self, row: int, length: int) -> None:
        self.slot_pos[row].masked_fill_(self.slot_pos[row] >= length, -1)

    def rows(self, start: int, stop: int) -> SinkKVState:
        view = SinkKVState.__new__(SinkKVState)
        nn.Module.__init__(view)
        view.sinks, view.window, view.slack = self.sinks, self.window, self.slack
        view.keys, view.values = self.keys.view(start, stop), self.values.view(start, stop)
        view.register_buffer("slot_pos", self.slot_pos[start:stop], persistent=False)
        return view

    def _write(self, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions (B, T) in order; more than the ring holds are written a ring at a time (the last stay)."""
        ring = self.ring
        for i in range(0, pos.shape[1], ring):
            p = pos[:, i : i + ring]
            slots = torch.where(p < self.sinks, p, self.sinks + (p - self.sinks) % ring)
            self.keys.write(rows, slots, k[:, :, i : i + ring])
            self.values.write(rows, slots, v[:, :, i : i + ring])
            self.slot_pos[rows, slots] = p

    def _geometry(self, ctx, pos: torch.Tensor, key_pos: torch.Tensor, dtype: torch.dtype) -> tuple:
        """The mask (B, 1, T, S) and the rotations of keys, window queries, sink queries (and the sink keys as
        (B, 1, S, 1) floats), computed once per pass: every layer's cache holds the same positions in the same slots."""
        key = ("sinks", self.sinks, self.window, self.slack, pos.shape[1], key_pos.shape[1], dtype)
        if key in ctx.shared:
            return ctx.shared[key]
        sinks = self.sinks
        query = pos.unsqueeze(-1)  # (B, T, 1)
        kp = key_pos.unsqueeze(1)  # (B, 1, S)
        is_sink = key_pos < sinks  # (B, S), also true for empty slots (-1): masked
        mask = (kp >= 0) & (kp <= query) & (is_sink.unsqueeze(1) | (kp > query - self.window))
        geometry: tuple = (mask.unsqueeze(1),)
        if ctx.rotary is not None:
            offset = (pos[:, :1] - sinks - self.ring).clamp_min(0)  # (B, 1): keeps every angle below S + T
            if pos.shape[1] == 1:  # one query per row: the sinks move up to sit right before the window instead
                shift = (pos - (sinks + self.window - 1)).clamp_min(0)  # (B, 1)
                key_at = torch.where(is_sink, key_pos + shift - offset, key_pos - offset).clamp_min(0)
                sinks = 0  # no second query rotation
            else:
                key_at = torch.where(is_sink, key_pos, key_pos - offset).clamp_min(0)
            geometry += (ctx.rotation(key_at, dtype), ctx.rotation(pos - offset, dtype))
            if sinks:
                sink_query = ctx.rotation(pos.clamp_max(sinks + self.window - 1), dtype)
                geometry += (sink_query, is_sink[:, None, :, None].to(dtype))
        ctx.shared[key] = geometry
        return geometry

    def attend_inputs(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Store k, v (B, K, T, D) (not rotated); the queries, keys, values, mask and scale to attend with. A call
        of up to slack + 1 tokens writes first and attends over the cache; a longer one (a prefill) attends over the
        cache followed by its own tokens (as stored: quantized and back), then writes them."""
        b, _, t, d = k.shape
        rows, pos = _row_slots(ctx.pos, b, t)
        if t <= self.slack + 1:
            self._write(rows, pos, k, v)
            keys, values, key_pos = self.keys.read(q.dtype), self.values.read(q.dtype), self.slot_pos
        else:
            keys = torch.cat((self.keys.read(q.dtype), self.keys.roundtrip(k).to(q.dtype)), dim=2)  # (B, K, S+T, D)
            values = torch.cat((self.values.read(q.dtype), self.values.roundtrip(v).to(q.dtype)), dim=2)
            key_pos = torch.cat((self.slot_pos, pos), dim=1)  # (B, S + T)
            self._write(rows, pos, k, v)
        geometry = self._geometry(ctx, pos, key_pos, q.dtype)
        mask, rotations = geometry[0], geometry[1:]
        if rotations:
            keys = ctx.rotate(keys, rotations[0])
            q_window = ctx.rotate(q, rotations[1])
            if len(rotations) > 2:
                q_sink = ctx.rotate(q, rotations[2])
                sink = rotations[3]  # (B, 1, S, 1): 1.0 at sink keys
                keys = torch.cat((keys * (1 - sink), keys * sink), dim=-1)
                q = torch.cat((q_window, q_sink), dim=-1)
            else:
                q = q_window
        return q, keys, values, mask, 1.0 / math.sqrt(d)


class BlockMemoryKVState(nn.Module):
    """InfLLM-style block memory: sinks and a local window as in `SinkKVState`, and the positions that leave the
    window kept in blocks of `block` positions; each query also attends to the `topk` blocks whose representative
    keys score highest for it (per kv head, the scores of its query group summed).

    Position p >= sinks belongs to block ``(p - sinks) // block``. A block is closed (moved to the memory) once all
    its positions are out of the window of the newest query of a call; until then its positions stay local. So a
    query sees: the sinks, every position since the first open block (its window, and up to block - 1 + the call's
    length older ones), and its top-k closed blocks. Calls longer than ``slack + 1`` tokens are attended in parts of
    that size, each seeing the memory as the parts before it left it; a block closes between parts, not inside one.

    Representative keys: `reps` per block, each the mean key of one of `reps` equal runs of the block (InfLLM picks
    the keys that received the most attention instead; the means need no bookkeeping and do not depend on how a
    prompt is split into calls). A block's score for a query is the largest of its representative keys' dot
    products with the query.

    Positions (keys stored before rotation): a key within `distance` of its query is at its true distance, a farther
    one (memory, sinks, old local positions) at `distance`, InfLLM's cap when `distance` is the window. Memory: the
    sinks, ``window + block + slack`` local slots and `memory_blocks` blocks (the oldest block's slots are reused once
    they are full), whatever the sequence length. The read path scores every stored key and masks the blocks a query
    did not retrieve (exact, not faster than full attention over what is stored)."""

    kind = "memory"
    rotates_keys = True

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        sinks: int,
        window: int,
        slack: int,
        head_dim: int,
        block: int,
        topk: int,
        memory_blocks: int,
        reps: int,
        distance: int,
        device=None,
        dtype=torch.float32,
        bits: int | None = None,
    ) -> None:
        super().__init__()
        self.sinks, self.window, self.slack, self.block, self.topk = sinks, window, slack, block, topk
        self.reps, self.distance = min(reps, block), distance
        self.ring = window + block + slack
        b, h = batch_size, n_kv_heads
        local = sinks + self.ring
        self.keys = SlotStore((b, h, local, head_dim), bits, device, dtype)
        self.values = SlotStore((b, h, local, head_dim), bits, device, dtype)
        self.register_buffer("slot_pos", torch.full((b, local), -1, device=device), persistent=False)
        self.mem_keys = SlotStore((b, h, memory_blocks * block, head_dim), bits, device, dtype)
        self.mem_values = SlotStore((b, h, memory_blocks * block, head_dim), bits, device, dtype)
        rep_keys = torch.zeros((b, h, memory_blocks, self.reps, head_dim), device=device, dtype=dtype)
        self.register_buffer("rep_keys", rep_keys, persistent=False)
        # the block number each memory slot holds (-1: empty), and how many blocks each row has closed
        self.register_buffer("block_id", torch.full((b, memory_blocks), -1, device=device), persistent=False)
        self.register_buffer("closed", torch.zeros(b, dtype=torch.long, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    @property
    def memory_blocks(self) -> int:
        return self.block_id.shape[1]

    @property
    def slots(self) -> int:
        return self.slot_pos.shape[1] + self.memory_blocks * self.block

    def _buffers_of(self) -> list[tuple[nn.Module | None, str]]:
        stores = [(s, n) for s in (self.keys, self.values, self.mem_keys, self.mem_values) for n in s.names]
        return [*stores, *((None, n) for n in ("slot_pos", "rep_keys", "block_id", "closed"))]

    def reset(self, start: int, stop: int) -> None:
        self.slot_pos[start:stop] = -1
        self.block_id[start:stop] = -1
        self.closed[start:stop] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        for store, name in self._buffers_of():
            buf = getattr(store if store is not None else self, name)
            buf[dst] = buf[src]

    def pad_room(self) -> int:
        return self.slack  # as RingKVState

    def _open_target(self, newest: torch.Tensor) -> torch.Tensor:
        """Blocks closed once `newest` (B,) is the newest position: those wholly out of its window."""
        return torch.div(newest + 1 - self.window - self.sinks, self.block, rounding_mode="floor").clamp_min(0)

    def crop(self, row: int, length: int) -> None:
        self.slot_pos[row].masked_fill_(self.slot_pos[row] >= length, -1)
        # blocks closed by positions now taken back open again (their positions are still in the local slots)
        target = self._open_target(torch.tensor([length - 1], device=self.closed.device))[0]
        self.block_id[row].masked_fill_(self.block_id[row] >= target, -1)
        self.closed[row] = torch.minimum(self.closed[row], target)

    def rows(self, start: int, stop: int) -> BlockMemoryKVState:
        view = BlockMemoryKVState.__new__(BlockMemoryKVState)
        nn.Module.__init__(view)
        view.sinks, view.window, view.slack, view.block, view.topk = (
            self.sinks, self.window, self.slack, self.block, self.topk,
        )  # fmt: skip
        view.reps, view.distance, view.ring = self.reps, self.distance, self.ring
        view.keys, view.values = self.keys.view(start, stop), self.values.view(start, stop)
        view.mem_keys, view.mem_values = self.mem_keys.view(start, stop), self.mem_values.view(start, stop)
        for name in ("slot_pos", "rep_keys", "block_id", "closed"):
            view.register_buffer(name, getattr(self, name)[start:stop], persistent=False)
        return view

    def _local_slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.ring)

    def _close(self, rows: torch.Tensor, newest: torch.Tensor, t: int) -> None:
        """Move the blocks wholly out of the window of `newest` (B,) from the local slots to the memory."""
        target = self._open_target(newest)
        offsets = torch.arange(self.block, device=newest.device)
        segment = offsets * self.reps // self.block  # the representative each position of a block feeds
        average = torch.zeros(self.block, self.reps, device=newest.device)
        average[offsets, segment] = 1.0
        average /= average.sum(0, keepdim=True)
        for i in range(-(-t // self.block) + 1):
            j = self.closed + i  # (B,)
            take = j < target  # (B,)
            src = self._local_slots(self.sinks + j[:, None] * self.block + offsets)  # (B, block)
            dst = (j % self.memory_blocks)[:, None] * self.block + offsets  # (B, block)
            for store, memory in ((self.keys, self.mem_keys), (self.values, self.mem_values)):
                for name in store.names:
                    local, kept = getattr(store, name).transpose(1, 2), getattr(memory, name).transpose(1, 2)
                    kept[rows, dst] = torch.where(take[:, None, None, None], local[rows, src], kept[rows, dst])
            block_keys = self.keys.decode(
                tuple(getattr(self.keys, n).transpose(1, 2)[rows, src].transpose(1, 2) for n in self.keys.names),
                self.rep_keys.dtype,
            )  # (B, K, block, D)
            reps = torch.einsum("bksd,sr->bkrd", block_keys, average.to(block_keys.dtype))
            slot = (j % self.memory_blocks)[:, None]  # (B, 1)
            current = self.rep_keys.transpose(1, 2)[rows, slot]  # (B, 1, K, r, D)
            new = torch.where(take[:, None, None, None, None], reps.unsqueeze(1), current)
            self.rep_keys.transpose(1, 2)[rows, slot] = new
            self.block_id[rows, slot] = torch.where(take[:, None], j[:, None], self.block_id[rows, slot])
        self.closed.copy_(torch.maximum(self.closed, torch.minimum(target, self.closed + -(-t // self.block) + 1)))

    def _geometry(self, ctx, pos: torch.Tensor, part: int, dtype: torch.dtype) -> tuple:
        """What every layer shares for one part of a call: the local mask (B, 1, T, L), the memory slots' positions,
        which pairs are near (B, 1, T, S), and the rotations (near keys, near queries, far queries, far keys)."""
        key = ("memory", self.sinks, self.window, self.block, self.memory_blocks, part, pos.shape[1], dtype)
        if key in ctx.shared:
            return ctx.shared[key]
        sinks, block = self.sinks, self.block
        query = pos.unsqueeze(-1)  # (B, T, 1)
        kp = self.slot_pos.unsqueeze(1)  # (B, 1, L)
        first_open = (sinks + self.closed * block)[:, None, None]  # (B, 1, 1)
        local = (kp >= 0) & (kp <= query) & ((kp < sinks) | (kp >= first_open))
        offsets = torch.arange(block, device=pos.device)
        mem_pos = sinks + self.block_id[:, :, None] * block + offsets  # (B, M, block)
        mem_pos = torch.where(self.block_id[:, :, None] >= 0, mem_pos, -1).flatten(1)  # (B, M * block)
        key_pos = torch.cat((self.slot_pos, mem_pos), dim=1)  # (B, S)
        geometry: tuple = (local.unsqueeze(1),)
        if ctx.rotary is not None:
            cap = min(self.distance, self.slots)
            near = (query - key_pos.unsqueeze(1)) < cap  # (B, T, S)
            offset = (pos[:, :1] - cap).clamp_min(0)  # (B, 1): angles stay below cap + T
            geometry += (
                near.unsqueeze(1),
                ctx.rotation((key_pos - offset).clamp_min(0), dtype),
                ctx.rotation(pos - offset, dtype),
                ctx.rotation(torch.full_like(pos, cap), dtype),
                ctx.rotation(torch.zeros_like(pos[:, :1]), dtype),
            )
        ctx.shared[key] = geometry
        return geometry

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        """Store k, v (B, K, T, D) (not rotated) and return the attention output (B, H, T, D) of queries q
        (B, H, T, D) (not rotated); a call longer than slack + 1 tokens goes in parts of that size."""
        b, _, t, _ = k.shape
        rows, pos = _row_slots(ctx.pos, b, t)
        step = self.slack + 1
        parts = []
        for part, i in enumerate(range(0, t, step)):
            s = slice(i, i + step)
            parts.append(self._attend_part(q[:, :, s], k[:, :, s], v[:, :, s], rows, pos[:, s], ctx, part))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _attend_part(self, q, k, v, rows, pos, ctx, part: int) -> torch.Tensor:
        b, n_kv, t, d = k.shape
        group = q.shape[1] // n_kv
        ring_slots = self._local_slots(pos)
        self.keys.write(rows, ring_slots, k)
        self.values.write(rows, ring_slots, v)
        self.slot_pos[rows, ring_slots] = pos
        geometry = self._geometry(ctx, pos, part, q.dtype)
        keys = torch.cat((self.keys.read(q.dtype), self.mem_keys.read(q.dtype)), dim=2)  # (B, K, S, D)
        values = torch.cat((self.values.read(q.dtype), self.mem_values.read(q.dtype)), dim=2)
        # retrieval: each query's (summed over its kv head's group) score of each block, the top-k kept
        q_score = q if ctx.rotary is None else ctx.rotate(q, geometry[4])  # as a far key sees it
        q_group = q_score.view(b, n_kv, group, t, d).sum(2)  # (B, K, T, D)
        scores = torch.einsum("bktd,bkmrd->bktmr", q_group, self.rep_keys.to(q.dtype)).amax(-1)  # (B, K, T, M)
        filled = (self.block_id >= 0)[:, None, None, :]  # (B, 1, 1, M)
        scores = scores.masked_fill(~filled, float("-inf"))
        top = scores.topk(min(self.topk, self.memory_blocks), dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & filled
        self.last_retrieved = chosen  # (B, K, T, M): which memory slots each query attended (for tests)
        memory = chosen.unsqueeze(-1).expand(-1, -1, -1, -1, self.block).flatten(3)  # (B, K, T, M * block)
        mask = torch.cat((geometry[0].expand(b, n_kv, t, -1), memory), dim=-1)  # (B, K, T, S)
        mask = mask.repeat_interleave(group, dim=1) if group > 1 else mask  # (B, H, T, S)
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scale = 1.0 / math.sqrt(d)
        if ctx.rotary is None:
            logits = q @ keys.transpose(-1, -2)
        else:
            near, key_near, query_near, query_far, key_far = geometry[1:]
            logits_near = ctx.rotate(q, query_near) @ ctx.rotate(keys, key_near).transpose(-1, -2)
            logits_far = ctx.rotate(q, query_far) @ ctx.rotate(keys, key_far).transpose(-1, -2)
            logits = torch.where(near, logits_near, logits_far)
        logits = (logits.float() * scale).masked_fill(~mask, float("-inf"))
        y = torch.softmax(logits, dim=-1).to(values.dtype) @ values  # (B, H, T, D)
        self._close(rows, pos[:, -1], t)
        return y
