"""The attention mixer: grouped-query attention with rotary (or no) positions, q/k norm, a sliding window, and
its inference state (`KVState`, or a `RingKVState` that bounds a sliding window's memory; with a `KVCacheSpec`, a
`CompactKVState` (quantized and/or key-pruned) or a `SinkKVState` (sinks + window, keys rotated inside the cache),
which prepare the queries, keys, values and mask attention runs on: `attend_inputs`; or a `BlockMemoryKVState`
(sinks + window + InfLLM block memory), which attends itself: `attend`).

Masks: a query at position q sees key positions in (q - window, q] (window = infinity without one). Training and
scoring run causal attention over the sequence; with a state, the keys are the state's slots and their positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig, RopeScaling
from slmkit.models.decode_layout import decode_linear, decode_product, fused_call, fused_weight
from slmkit.models.state import (
    BlockMemoryKVState,
    CompactKVState,
    KVCacheSpec,
    KVState,
    RingKVState,
    SinkKVState,
)

# Extra ring slots beyond the window: a call of up to RING_SLACK + 1 tokens (a decode step, a speculative
# verification) writes before it attends without overwriting a key one of its own queries still needs.
RING_SLACK = 32
QKV = ("q_proj", "k_proj", "v_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel (about 15% of a CPU training step is norms otherwise); in fp32 as transformers
        # does, so bf16 runs match fp32 runs closely
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.size(-1),), None, self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) with the config's rope scaling; seq_len matters for `dynamic` (the NTK base grows
    past max_seq_len) and `longrope` (long factors once seq_len passes the original context) only."""
    d, theta, scaling = config.rope_dim, config.rope_theta, config.rope_scaling
    if scaling is not None and scaling.type == "dynamic" and seq_len > config.max_seq_len:
        # NTK-aware: grow the base with the sequence past the trained context (as transformers does)
        theta = theta * ((scaling.factor * seq_len / config.max_seq_len) - (scaling.factor - 1)) ** (d / (d - 2))
    exponents = torch.arange(0, d, 2, device=device).float() / d
    if scaling is not None and scaling.type == "longrope":
        assert scaling.original_max_seq_len is not None
        factors = scaling.long_factor if seq_len > scaling.original_max_seq_len else scaling.short_factor
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.type == "dynamic":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type == "yarn":
        return _yarn_inv_freq(inv_freq, d, theta, scaling)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
    assert scaling.original_max_seq_len is not None
    assert scaling.low_freq_factor is not None and scaling.high_freq_factor is not None
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, d: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN ("NTK-by-parts"): a frequency that turns more than beta_fast times over the original context keeps its
    value (it never saw positions it cannot tell apart), one that turns fewer than beta_slow times is interpolated
    (divided by factor), and the dimensions between move linearly from one to the other."""
    original = scaling.original_max_seq_len
    assert original is not None
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1

    def dim_at(rotations: float) -> float:
        # the dimension whose frequency turns `rotations` times over `original` positions
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_at(beta_fast), dim_at(beta_slow)
    if scaling.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(inv_freq.device)
    keep = 1 - ramp  # 1: extrapolate (the base frequency), 0: interpolate (divided by factor)
    return (inv_freq / scaling.factor) * (1 - keep) + inv_freq * keep


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    inv_freq: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (..., T) -> (..., T, D), in the "rotate half" layout; `scale` multiplies
    both (yarn's and longrope's attention factor: it scales q.k by scale^2, as transformers does)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
    if scale != 1.0:
        return emb.cos() * scale, emb.sin() * scale
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (B, 1, T, R) or (1, 1, T, R), R <= D: the first R channels turn (partial rotary),
    the rest pass through."""
    if cos.shape[-1] < x.shape[-1]:
        r = cos.shape[-1]
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class Context:
    """What every layer of one forward pass shares: token positions, rotary tables, and masks built once."""

    pos: torch.Tensor  # (1, T) shared by every row, or (B, T) per row
    cos: torch.Tensor | None = None  # (B or 1, 1, T, D)
    sin: torch.Tensor | None = None
    upto: int | None = None  # with a state: attend to its slots [0, upto) only (an optimisation)
    active: torch.Tensor | None = None  # (B,) rows whose state may change (None: all); KV states ignore it
    # (B, T) without a state: each token attends only to earlier tokens of its own segment (packed documents)
    segments: torch.Tensor | None = None
    masks: dict[tuple, torch.Tensor | None] = field(default_factory=dict)
    # positions (B, S) -> cos, sin (B, S, D): rotary tables for a state that rotates keys itself (`SinkKVState`)
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    # what a state computes once per pass and every layer's state reuses (a sink cache's mask and rotations)
    shared: dict[tuple, Any] = field(default_factory=dict)
    # (1, 1, T, S) a tree verification's mask over a plain KV cache (each node: the prefix and its ancestors)
    tree_mask: torch.Tensor | None = None
    # value embeddings (`value_embeds`): the current layer's table rows of the pass's tokens (B, T, K D), or None
    value_embed: torch.Tensor | None = None

    def rotation(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, S, D) for positions (B, S) (through `rotary`), for `rotate`."""
        assert self.rotary is not None
        cos, sin = self.rotary(positions)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, H, S, D) rotated by a `rotation`."""
        return apply_rope(x, *rotation)

    @property
    def per_row(self) -> bool:
        return self.pos.shape[0] > 1


def causal_mask(ctx: Context, key_pos: torch.Tensor | None, n_keys: int, window: int | None) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) for queries at ctx.pos over keys at key_pos (B, S), or slots 0..S-1 when
    key_pos is None; None when every key is visible (one query at the newest slot of a plain cache)."""
    t = ctx.pos.shape[1]
    key = ("ring" if key_pos is not None else "kv", n_keys, window)
    if key in ctx.masks:
        return ctx.masks[key]
    query = ctx.pos.unsqueeze(-1)  # (B or 1, T, 1)
    if key_pos is None:
        if t == 1 and not ctx.per_row and window is None and ctx.upto is not None:
            mask = None  # one query at the newest slot: every slot in [0, upto) is visible
        else:
            slots = torch.arange(n_keys, device=query.device)
            mask = slots <= query  # (B or 1, T, S)
            if window is not None:
                mask = mask & (slots > query - window)
            mask = mask.unsqueeze(1)
    else:
        keys = key_pos.unsqueeze(1)  # (B, 1, S)
        mask = (keys >= 0) & (keys <= query)
        if window is not None:
            mask = mask & (keys > query - window)
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
    ctx.masks[key] = mask
    return mask


def segment_mask(ctx: Context, window: int | None) -> torch.Tensor:
    """Boolean mask (B, 1, T, T) of a stateless forward over packed documents: causal, within one segment."""
    key = ("segments", window)
    mask = ctx.masks.get(key)
    if mask is None:
        assert ctx.segments is not None
        seg = ctx.segments
        t = seg.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        if window is not None:
            causal = causal & ~torch.ones_like(causal).tril(-window)
        mask = ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)
        ctx.masks[key] = mask
    return mask


class Attention(nn.Module):
    # a stateless forward can keep packed documents apart (Context.segments); see Transformer.forward
    packs_documents = True
    # new_state takes a KVCacheSpec (bounded, quantized, pruned caches); Transformer.new_state passes it to such mixers
    accepts_kv_cache = True
    # forward runs these through decode_linear (slmkit.models.decode_layout): q/k/v when they are not fused
    DECODE_ROUTED = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = config.sliding_window
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.dim_per_head
        c, hd = config.d_model, config.dim_per_head
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=config.out_bias)
        self.qk_norm_heads = config.qk_norm and config.qk_norm_over == "projection"
        if self.qk_norm_heads:  # one RMSNorm over all heads' q, one over k (OLMoE)
            self.q_norm = RMSNorm(self.n_heads * hd, config.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * hd, config.norm_eps)
        elif config.qk_norm:  # per-head RMSNorm of q and k (Qwen3)
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        if layer_idx in config.value_embed_layers():  # weights of its values and of the value embedding
            self.value_lambdas = nn.Parameter(torch.full((2,), 0.5))

    def new_state(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        cache: KVCacheSpec | None = None,
    ) -> nn.Module:
        kv = (batch_size, self.n_kv_heads)
        if cache is not None and cache.window is not None:  # the model's own window bounds the cache's
            window = cache.window if self.window is None else min(cache.window, self.window)
            if cache.topk is not None:  # InfLLM-style block memory besides the sinks and the window
                blocks = cache.memory_blocks or max(1, -(-max_len // cache.block))
                return BlockMemoryKVState(
                    *kv, cache.sinks, window, RING_SLACK, self.head_dim, cache.block, cache.topk, blocks, cache.reps,
                    cache.distance_cap or window, device, dtype, cache.bits,
                )  # fmt: skip
            return SinkKVState(*kv, cache.sinks, window, RING_SLACK, self.head_dim, device, dtype, cache.bits)
        if cache is not None and not cache.is_default:
            return CompactKVState(*kv, max_len, self.head_dim, device, dtype, cache.bits, cache.prune_keys)
        if self.window is not None and self.window + RING_SLACK < max_len:
            return RingKVState(batch_size, self.n_kv_heads, self.window, RING_SLACK, self.head_dim, device, dtype)
        return KVState(batch_size, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, ctx: Context | None, state: nn.Module | None) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        # CPU decoding: q, k, v as one product (slmkit.models.decode_layout; quantized layers register theirs)
        fused = fused_weight(self, QKV)
        qkv = decode_product(x, fused) if fused is not None else fused_call(self, x)
        if qkv is not None:
            q, k, v = qkv.split((self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2), -1)
        else:
            # (B, T, H D), (B, T, K D), (B, T, K D); decode_linear: the native kernel in a compiled decode step
            q, k, v = decode_linear(self.q_proj, x), decode_linear(self.k_proj, x), decode_linear(self.v_proj, x)
        if self.qk_norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        if ctx is not None and ctx.value_embed is not None:  # modded-nanogpt's value embeddings
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * ctx.value_embed
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if hasattr(self, "q_norm") and not self.qk_norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        if ctx is not None and ctx.cos is not None and ctx.sin is not None:  # rotary; learned positions are added
            q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        gqa = self.n_kv_heads != self.n_heads
        if state is None:  # training / scoring: causal over the sequence
            if ctx is not None and ctx.segments is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask(ctx, self.window), enable_gqa=gqa)
            elif self.window is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                mask = causal & ~torch.ones_like(causal).tril(-self.window)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif hasattr(state, "attend"):  # a block memory attends itself (each query its own retrieved blocks)
            y = state.attend(q, k, v, ctx)
        elif hasattr(state, "attend_inputs"):  # a compressed or sink cache prepares what to attend over
            q, k, v, mask, scale = state.attend_inputs(q, k, v, ctx, self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
        else:
            assert ctx is not None
            k, v, key_pos = state.update(ctx.pos, k.to(state.k.dtype), v.to(state.v.dtype), ctx.upto)
            k, v = k.to(q.dtype), v.to(q.dtype)  # (B, K, S, D)
            if ctx.tree_mask is not None:
                mask = ctx.tree_mask
            else:
                mask = causal_mask(ctx, key_pos, k.shape[2], self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return decode_linear(self.o_proj, y)
