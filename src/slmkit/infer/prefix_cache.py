"""Prefix caching for the continuous batcher: prompts that start like earlier ones reuse their keys and values.

The cache keeps blocks of `block` tokens. A block is known by its parent block and its own token ids (a chain
from the sequence's start, so a block matches only after the same whole prefix; the key is compared exactly, not
by a hash alone), together with the adapter its row ran with. Each block holds the keys and values of its
positions for every layer, copied out of a row of the model state into one pool tensor per state buffer
(blocks, kv heads, block, channels); the pool grows up to a byte cap, and past it the least recently used block
goes first. A parent is always more recent than its children (a chain is touched from its end back to its
start), so eviction takes leaves first and a reachable chain never loses its middle.

When a sequence is admitted, the longest cached chain of full blocks that its prompt starts with (leaving at
least one prompt token to prefill: its logits give the first new token) is copied into the sequence's row and
the sequence starts prefilling after it. Every step, and when a sequence finishes, the row's full blocks not
cached yet (prompt and generated tokens alike, so a chat's next turn finds its history) are copied into the
pool.

What a layer keeps must be addressable by position for a block to be moved: a plain KV cache (slot = position)
and a quantized one (``--kv-dtype``) are; a sliding-window or sink cache (positions reuse slots), a key-pruned
one (channels chosen per row from its first pass) and a recurrent state (state-space, linear attention: its
state at a block boundary is not kept) are not, and the cache is then off, with the reason logged
(`PrefixCache.unsupported`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = 16
DEFAULT_MAX_BYTES = 256 << 20


@dataclass
class PrefixCacheStats:
    prompt_tokens: int = 0  # prompt tokens of admitted sequences
    hit_tokens: int = 0  # of them, taken from the cache instead of prefilled
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def slot_buffers(layer: Any) -> list[torch.Tensor] | None:
    """The tensors (B, H, S, X) of a layer state with slot = position (its `position_buffers`), or None when its
    slots cannot be moved between rows by position (see the module docstring)."""
    method = getattr(layer, "position_buffers", None)
    return method() if method is not None else None


def _layers(state: Any) -> list[Any]:
    return [state.layer(i) for i in range(len(state.layers))]


def unsupported(state: Any) -> str | None:
    """Why a model state cannot take cached prefixes (None: it can)."""
    for i, layer in enumerate(_layers(state)):
        if layer is not None and slot_buffers(layer) is None:
            kind = getattr(layer, "kind", type(layer).__name__)
            return f"layer {i} keeps a {kind} state whose positions cannot be copied between rows"
    return None


class PrefixCache:
    """Blocks of cached keys and values over one model state's layout (see the module docstring)."""

    def __init__(self, state: Any, *, block: int = DEFAULT_BLOCK, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.block = block
        self.buffers = [b for layer in _layers(state) if layer is not None for b in (slot_buffers(layer) or [])]
        self.block_bytes = sum(b[0, :, :block].numel() * b.element_size() for b in self.buffers)
        self.capacity = max_bytes // self.block_bytes if self.block_bytes else 0
        self.pools: list[torch.Tensor] = []
        self.keys: OrderedDict[tuple, int] = OrderedDict()  # (adapter, parent id, tokens) -> block id; LRU first
        self.slot_of: dict[int, int] = {}  # block id -> pool slot
        self.key_of: dict[int, tuple] = {}
        self.free: list[int] = []
        self.next_id = 0
        self.stats = PrefixCacheStats()

    @property
    def cached_blocks(self) -> int:
        return len(self.keys)

    @property
    def cached_bytes(self) -> int:
        return self.cached_blocks * self.block_bytes

    # ---- lookups -------------------------------------------------------------------------------------------
    def match(self, tokens: list[int], adapter: int | None, limit: int) -> list[int]:
        """Ids of the longest cached chain of full blocks `tokens` starts with, covering at most `limit` tokens."""
        chain: list[int] = []
        parent = -1
        for start in range(0, limit - self.block + 1, self.block):
            key = (adapter, parent, tuple(tokens[start : start + self.block]))
            block_id = self.keys.get(key)
            if block_id is None:
                break
            chain.append(block_id)
            parent = block_id
        self._touch(chain)
        return chain

    def restore(self, state: Any, row: int, chain: list[int]) -> int:
        """Copy a chain's blocks into positions [0, len(chain) * block) of `row`; the tokens restored."""
        if not chain:
            return 0
        n = len(chain) * self.block
        slots = torch.tensor([self.slot_of[b] for b in chain], device=self.pools[0].device)
        for buf, pool in zip(self.buffers, self.pools, strict=True):
            blocks = pool.index_select(0, slots)  # (m, H, block, X)
            buf[row, :, :n] = blocks.transpose(0, 1).reshape(buf.shape[1], n, buf.shape[3])
        return n

    # ---- storing ---------------------------------------------------------------------------------------------
    def store(self, state_row: int, tokens: list[int], adapter: int | None, chain: list[int]) -> None:
        """Cache the full blocks of `tokens` (what `state_row` holds, from position 0) past those in `chain`
        (the sequence's blocks cached so far; extended in place)."""
        if not self.capacity:
            return
        parent = chain[-1] if chain else -1
        for start in range(len(chain) * self.block, len(tokens) - self.block + 1, self.block):
            key = (adapter, parent, tuple(tokens[start : start + self.block]))
            block_id = self.keys.get(key)
            if block_id is None:
                slot = self._take_slot(protect=chain)
                if slot is None:
                    break
                for buf, pool in zip(self.buffers, self.pools, strict=True):
                    pool[slot] = buf[state_row, :, start : start + self.block]
                block_id = self.next_id
                self.next_id += 1
                self.keys[key] = block_id
                self.slot_of[block_id], self.key_of[block_id] = slot, key
                self.stats.stored_blocks += 1
            chain.append(block_id)
            parent = block_id
        self._touch(chain)

    def _touch(self, chain: list[int]) -> None:
        """Most recently used: the chain, its start last (parents stay more recent than their children)."""
        for block_id in reversed(chain):
            key = self.key_of.get(block_id)
            if key is not None:
                self.keys.move_to_end(key)

    def _take_slot(self, protect: list[int]) -> int | None:
        if self.free:
            return self.free.pop()
        used = len(self.slot_of)
        if used < self.capacity:
            self._grow(used + 1)
            if self.free:
                return self.free.pop()
        protected = set(protect)
        for key, block_id in self.keys.items():  # least recently used first
            if block_id not in protected:
                self._evict(key, block_id)
                return self.free.pop()
        return None

    def _evict(self, key: tuple, block_id: int) -> None:
        del self.keys[key], self.key_of[block_id]
        self.free.append(self.slot_of.pop(block_id))
        self.stats.evicted_blocks += 1

    def _grow(self, needed: int) -> None:
        """Pools of at least `needed` blocks (doubling, up to the capacity)."""
        have = self.pools[0].shape[0] if self.pools else 0
        if needed <= have:
            return
        size = min(self.capacity, max(needed, 2 * have, 8))
        grown = []
        for i, buf in enumerate(self.buffers):
            pool = buf.new_zeros((size, buf.shape[1], self.block, buf.shape[3]))
            if have:
                pool[:have] = self.pools[i]
            grown.append(pool)
        self.pools = grown
        self.free.extend(range(size - 1, have - 1, -1))
