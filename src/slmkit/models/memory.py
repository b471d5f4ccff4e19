"""Product-key memory: an MLP kind (`mlp: memory`, or one entry of `mlp_pattern`) that reads a few rows of a large
value table per token (Lample et al. 2019, "Large Memory Layers with Product Keys"; Berges et al. 2024, "Memory
Layers at Scale").

A token's query (per head, width `memory_key_dim`) is split into two halves, each scored against its own table
of n sub-keys. A key of the memory is a pair (a, b) of sub-keys, and its score is the sum of the two halves'
scores, so the memory has N = n^2 keys while a token computes only 2n scores. The exact top-k of those N sums lies
among the k x k pairs of each half's own top k (a pair outside it has k pairs above it already), so the lookup
takes both halves' top k, adds the k x k candidate sums and keeps their top k: exact, not approximate.
The k scores are softmaxed and weight their value rows, and every head's k rows are summed (the heads share one
value table). Only those H k rows take part in the forward pass, so only they receive gradient: the rest of the
table has an exact zero gradient (one fused `embedding_bag`, no (tokens, H k, width) intermediate).

Memory+ (Berges et al., the default, `memory_gated`): the memory's read-out is gated like a SwiGLU, down(silu(gate(x))
* memory(x)); without it the read-out is added to the residual as it is (Lample et al.). `memory_query_batchnorm`
normalises the queries with BatchNorm (Lample et al.: it spreads the reads over more keys); it uses batch statistics
in training and its running averages at inference, so a token's output depends on its batch only when training.

An MLP keeps no inference state; a memory layer is no exception. The value table is an `nn.Embedding` (the
optimiser's no-decay group, like the token embeddings); the gate and down projections are `nn.Linear`s that
quantization and LoRA see like any MLP's, while the query, sub-keys and values stay in float.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.config import ModelConfig


def product_key_topk(scores_a: torch.Tensor, scores_b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (..., k), indices (..., k) into the n^2 keys, a * n + b) of the exact top-k of scores_a[a] + scores_b[b]
    over all pairs, from the two halves' scores (..., n) each; scores in descending order."""
    n = scores_a.shape[-1]
    top_a, idx_a = scores_a.topk(k, dim=-1)  # (..., k)
    top_b, idx_b = scores_b.topk(k, dim=-1)
    candidates = (top_a.unsqueeze(-1) + top_b.unsqueeze(-2)).flatten(-2)  # (..., k k): pair (i, j) at i k + j
    scores, best = candidates.topk(k, dim=-1)  # (..., k)
    rows = idx_a.gather(-1, torch.div(best, k, rounding_mode="floor")) * n + idx_b.gather(-1, best % k)
    return scores, rows


class QueryBatchNorm(nn.Module):
    """BatchNorm over query channels (x: (N, F)): batch statistics in training, running averages otherwise.

    `nn.BatchNorm1d` without its integer step counter (`num_batches_tracked`): a model directory holds float
    tensors only, and a fixed momentum never reads the counter."""

    def __init__(self, features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )


class ProductKeyMemory(nn.Module):
    """H heads of product-key lookups into one shared table of n^2 value rows (see the module docstring).

    Shapes: N tokens, C d_model, H heads, D memory_key_dim (two halves of D / 2), n sub-keys per half, k top-k,
    V value width (memory_value_dim or C)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads, self.n_keys, self.top_k = config.memory_heads, config.memory_keys, config.memory_topk
        self.key_dim, width = config.memory_key_dim, config.memory_width
        self.query_proj = nn.Linear(config.d_model, self.heads * self.key_dim, bias=False)
        if config.memory_query_batchnorm:
            self.query_norm = QueryBatchNorm(self.heads * self.key_dim)
        self.sub_keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.key_dim // 2))  # (H, 2, n, D/2)
        self.values = nn.Embedding(self.n_keys**2, width)  # (n^2, V)
        if config.memory_gated:
            self.gate_proj = nn.Linear(config.d_model, width, bias=False)
            self.down_proj = nn.Linear(width, config.d_model, bias=False)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self, generator: torch.Generator | None = None) -> None:
        """Sub-keys ~ N(0, 2 / D) so a half's scores have the spread of its query; values ~ N(0, 1 / V) (Lample
        et al.). Called by `Transformer.init_weights` after its generic start."""
        if self.sub_keys.is_meta:
            return
        with torch.no_grad():
            half, width = self.key_dim // 2, self.values.weight.shape[1]
            keys = torch.randn(self.sub_keys.shape, generator=generator) / math.sqrt(half)
            self.sub_keys.copy_(keys)
            self.values.weight.copy_(torch.randn(self.values.weight.shape, generator=generator) / math.sqrt(width))

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, H, k) summing to 1 per head, value rows (N, H, k)) for tokens x (N, C)."""
        query = self.query_proj(x)  # (N, H D)
        if "query_norm" in self._modules:
            query = self._modules["query_norm"](query)
        query = query.view(x.shape[0], self.heads, 2, self.key_dim // 2)  # (N, H, 2, D/2)
        scores = torch.einsum("thsd,hsnd->thsn", query, self.sub_keys)  # (N, H, 2, n)
        top, rows = product_key_topk(scores[:, :, 0], scores[:, :, 1], self.top_k)  # (N, H, k) each
        return torch.softmax(top.float(), dim=-1).to(x.dtype), rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        weights, rows = self.lookup(flat)
        n = flat.shape[0]
        # one bag per token: its H k rows, weighted and summed (heads summed too); gradient only to those rows
        out = F.embedding_bag(
            rows.reshape(n, -1), self.values.weight, per_sample_weights=weights.reshape(n, -1), mode="sum"
        )  # (N, V)
        modules = self._modules
        if "gate_proj" in modules:
            out = modules["down_proj"](F.silu(modules["gate_proj"](flat)) * out)  # (N, C)
        return out.reshape(shape)
