"""A decoder-only transformer in one file: Llama by default (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU), with the few switches of `ModelConfig` that cover Mistral (sliding window), Qwen2
(q/k/v biases), Qwen3 (q/k norm) and GPT-2 (LayerNorm, learned positions, plain GELU MLP, biases).
Each variant is a small module picked by a config field.

Module and parameter names follow Hugging Face `LlamaForCausalLM` (without its `model.` prefix), so a
Llama-family state dict maps onto theirs by a prefix alone (other families: `slmkit.interop.hf`).

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
from functools import partial

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
        # one fused kernel (about 15% of a CPU training step is norms otherwise); in fp32 as transformers
        # does, so bf16 runs match fp32 runs closely
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.size(-1),), None, self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, config.norm_eps) if config.norm == "rmsnorm" else nn.LayerNorm(dim, eps=config.norm_eps)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def rope_inv_freq(config: ModelConfig, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies (D/2,) with the config's rope scaling; seq_len matters for `dynamic` only."""
    d, theta, scaling = config.dim_per_head, config.rope_theta, config.rope_scaling
    if scaling is not None and scaling.type == "dynamic" and seq_len > config.max_seq_len:
        # NTK-aware: grow the base with the sequence past the trained context (as transformers does)
        theta = theta * ((scaling.factor * seq_len / config.max_seq_len) - (scaling.factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=device).float() / d))
    if scaling is None or scaling.type == "dynamic":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
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


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions (..., T) -> (..., T, D), in the "rotate half" layout."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)  # (..., T, D/2)
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

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache of their own: views, so what a forward pass writes lands in this cache."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[:, start:stop], persistent=False)
        view.register_buffer("v", self.v[:, start:stop], persistent=False)
        return view

    @property
    def max_slots(self) -> int:
        return self.k.shape[3]

    def update(
        self, layer: int, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upto: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at slots cache_pos (T,) or, per row, (B, T); return the layer's slots [0, upto)."""
        if cache_pos.dim() == 1:
            self.k[layer].index_copy_(2, cache_pos, k)
            self.v[layer].index_copy_(2, cache_pos, v)
        else:  # each row writes its own slots (continuous batching: rows at different lengths)
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
            self.k[layer].transpose(1, 2)[rows, cache_pos] = k.transpose(1, 2)  # (B, T, K, D) into (B, S, K, D)
            self.v[layer].transpose(1, 2)[rows, cache_pos] = v.transpose(1, 2)
        if upto is None:
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :upto], self.v[layer, :, :, :upto]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.dim_per_head
        c, hd = config.d_model, config.dim_per_head
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=config.out_bias)
        if config.qk_norm:  # per-head RMSNorm of q and k (Qwen3)
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        cache: KVCache | None,
        cache_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
        upto: int | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, C)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        if cos is not None and sin is not None:  # rotary; learned positions were added to the input
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            assert cache_pos is not None
            k, v = cache.update(self.layer_idx, cache_pos, k.to(cache.k.dtype), v.to(cache.v.dtype), upto)
            k, v = k.to(q.dtype), v.to(q.dtype)  # (B, K, S, D)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:  # causal over the sequence; with a cache, one query that sees every slot given
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gated (SwiGLU with silu): down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """Ungated (GPT-2): down(act(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, config.d_model)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.d_model)
        self.mlp = MLP(config) if config.mlp == "gated" else PlainMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
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
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- initialisation --------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range); residual output projections scaled by 1/sqrt(2 * n_layers).

        Norm weights start at one, biases at zero.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
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

        cache_pos (T,): cache slots to write (required with a cache), the same for every row; or (B, T): each
        row's own slots (rows at different lengths, as in continuous batching; a row then attends to its slots
        up to its query's slot). positions (B, T): rotary (or learned) positions, default cache_pos (or 0..T-1).
        key_mask (B, S): False hides a slot (padding).
        upto: attend to slots [0, upto) only (an optimisation; must cover every written slot).
        With a sliding window, a query at slot i sees slots (i - window, i] only.
        """
        b, t = idx.shape
        if cache is not None and cache_pos is None:
            raise ValueError("cache_pos is required when a cache is given")
        per_row = cache_pos is not None and cache_pos.dim() == 2
        if positions is None:
            if per_row:
                positions = cache_pos  # (B, T)
            else:
                base = cache_pos if cache_pos is not None else torch.arange(t, device=idx.device)
                positions = base.unsqueeze(0)  # (1, T)
        cfg = self.config
        cos = sin = None
        if cfg.positions == "rope":
            if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic":
                seq_len = int(positions.max()) + 1  # a device sync, so only here
                inv_freq = rope_inv_freq(cfg, seq_len, idx.device)
                cos, sin = rope_cos_sin(positions, cfg.dim_per_head, cfg.rope_theta, inv_freq)
            else:  # a lookup in a table of every position (fewer kernels per decode step)
                cos_table, sin_table = self.rope_table(max(t, cache.max_slots if cache is not None else 0), idx.device)
                cos, sin = cos_table[positions], sin_table[positions]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B or 1, 1, T, D)

        mask = None
        window = cfg.sliding_window
        if cache is not None and t == 1 and not per_row and key_mask is None and window is None:
            pass  # one query at the newest slot: every slot in [0, upto) is visible, no mask needed
        elif cache is not None:
            assert cache_pos is not None
            slots = torch.arange(upto or cache.max_slots, device=idx.device)
            query = cache_pos.unsqueeze(-1)  # (T, 1) or (B, T, 1)
            mask = slots <= query  # (T, S) or (B, T, S): causal over slots
            if window is not None:  # slot distance = position distance, left padding or not
                mask = mask & (slots > query - window)
            mask = mask.unsqueeze(1) if per_row else mask.unsqueeze(0).unsqueeze(0)  # (B or 1, 1, T, S)
            if key_mask is not None:
                # a query always sees its own slot, so padding rows stay finite (no NaN to leak)
                own = slots == query
                own = own.unsqueeze(1) if per_row else own
                mask = (mask & key_mask[:, None, None, : slots.numel()]) | own  # (B, 1, T, S)
        elif key_mask is not None or window is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
            if window is not None:
                causal = causal & ~torch.ones_like(causal).tril(-window)
            mask = causal[None, None]  # (1, 1, T, T)
            if key_mask is not None:
                own = torch.eye(t, dtype=torch.bool, device=idx.device)
                mask = (mask & key_mask[:, None, None, :t]) | own  # (B, 1, T, T)

        x = self.embed_tokens(idx)  # (B, T, C)
        if cfg.positions == "learned":
            x = x + self.embed_positions(positions)  # (B or 1, T, C) broadcast
        if cos is not None and sin is not None:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, cache_pos, mask, upto)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))  # (B, T, V)

    def rope_table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (L, D) for positions 0..L-1 (L >= length), computed once per device (not for dynamic scaling)."""
        cached = self.__dict__.get("_rope_tables", {}).get(str(device))
        if cached is None or cached[0].shape[0] < length:
            size = max(length, self.config.max_seq_len)
            inv_freq = rope_inv_freq(self.config, 0, device)
            cached = rope_cos_sin(torch.arange(size, device=device), self.config.dim_per_head, 0.0, inv_freq)
            self.__dict__.setdefault("_rope_tables", {})[str(device)] = cached
        return cached

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) of targets (B, T) given idx (B, T)."""
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def new_cache(self, batch_size: int, max_slots: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        param = next(self.parameters())
        return KVCache(self.config, batch_size, max_slots, device=param.device, dtype=dtype or param.dtype)
