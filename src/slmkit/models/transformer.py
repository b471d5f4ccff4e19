"""A Llama-style decoder in one file: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module and parameter names follow Hugging Face `LlamaForCausalLM` (without its `model.` prefix), so a
state dict maps onto theirs by a prefix alone (see `slmkit.checkpoint`).

Two ways to run it:
- training / scoring: ``model(idx)`` runs causal attention over the whole sequence (no cache);
- inference: ``model(idx, cache=cache, cache_pos=...)`` writes keys and values into a preallocated
  :class:`KVCache` at slots ``cache_pos`` and attends to every filled slot. Prefill and decode are the
  same call with T = prompt length or T = 1. Batched prompts of different lengths are left-padded:
  ``positions`` gives each sequence its own rotary positions and ``key_mask`` hides the padding slots.

Shapes: B batch, T query tokens, S cache slots, C d_model, H heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (as transformers does) so bf16 runs match fp32 runs closely
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (..., T) -> (..., T, D), in the "rotate half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (B, 1, T, D) or (1, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: (L, B, K, S, D) each, S = max slots."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_slots: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        slots = max_slots or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, slots, config.dim_per_head)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_slots(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upto: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at slots cache_pos (T,); return the layer's slots [0, upto)."""
        self.k[layer].index_copy_(2, cache_pos, k)
        self.v[layer].index_copy_(2, cache_pos, v)
        if upto is None:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :upto], self.v[layer, :, :, :upto]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.dim_per_head
        c, hd = config.d_model, config.dim_per_head
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        cache_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
        upto: int | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            assert cache_pos is not None
            k, v = cache.update(self.layer_idx, cache_pos, k.to(cache.k.dtype), v.to(cache.v.dtype), upto)
            k, v = k.to(q.dtype), v.to(q.dtype)  # (B, K, S, D)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        cache_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
        upto: int | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cache_pos, mask, upto)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation --------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range); residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        cache_pos: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        upto: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for tokens idx (B, T); (B, 1, V) with last_only.

        cache_pos (T,): cache slots to write (required with a cache). positions (B, T): rotary
        positions, default cache_pos (or 0..T-1). key_mask (B, S): False hides a slot (padding).
        upto: attend to slots [0, upto) only (an optimisation; must cover every written slot).
        """
        b, t = idx.shape
        if cache is not None and cache_pos is None:
            raise ValueError("cache_pos is required when a cache is given")
        if positions is None:
            base = cache_pos if cache_pos is not None else torch.arange(t, device=idx.device)
            positions = base.unsqueeze(0)  # (1, T)
        cos, sin = rope_cos_sin(positions, self.config.dim_per_head, self.config.rope_theta)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B or 1, 1, T, D)

        mask = None
        if cache is not None:
            assert cache_pos is not None
            slots = torch.arange(upto or cache.max_slots, device=idx.device)
            mask = slots.unsqueeze(0) <= cache_pos.unsqueeze(1)  # (T, S) causal over slots
            mask = mask.unsqueeze(0).unsqueeze(0)  # (1, 1, T, S)
            if key_mask is not None:
                # a query always sees its own slot, so padding rows stay finite (no NaN to leak)
                own = slots.unsqueeze(0) == cache_pos.unsqueeze(1)
                mask = (mask & key_mask[:, None, None, : slots.numel()]) | own  # (B, 1, T, S)
        elif key_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
            own = torch.eye(t, dtype=torch.bool, device=idx.device)
            mask = (causal[None, None] & key_mask[:, None, None, :t]) | own

        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, cache_pos, mask, upto)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))  # (B, T, V)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of targets (B, T) given idx (B, T)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def new_cache(self, batch_size: int, max_slots: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        param = next(self.parameters())
        return KVCache(self.config, batch_size, max_slots, device=param.device, dtype=dtype or param.dtype)
