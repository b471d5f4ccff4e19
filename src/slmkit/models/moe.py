"""Mixture-of-experts MLP: a router picks `moe_top_k` of `moe_experts` gated MLPs per token (Mixtral, OLMoE,
Qwen2-MoE), optionally plus a shared expert every token passes through (Qwen2-MoE's, with its sigmoid gate).

Routing is dropless: every token reaches its k experts, however unbalanced the batch (no capacity factor, no
dropped tokens), so a token's output never depends on what else is in the batch and cached decoding equals the
full forward. The experts run one after another on the tokens routed to them (a gather, a small MLP, a weighted
scatter-add): on a CPU, and at the expert counts small models use, that beats padding every expert to the
largest load. Each expert is an ordinary `MLP` of `nn.Linear`s, so quantization and LoRA see them like any
other linear layer.

Training signals, through the loop's auxiliary-loss channel (`slmkit.train.objectives.AuxLosses`):
- load balancing (Switch Transformer): E x sum_e f_e P_e, with f_e the fraction of the N x k assignments that
  went to expert e and P_e its mean router probability. It is 1 whenever either is uniform, and grows as the
  router concentrates its probability where it sends the tokens;
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, weighted by `moe_z_loss_weight`
  relative to the balance term, which keeps router logits small (bf16 round-off).
Per-layer routing statistics ride along as metrics: `moe_load/L{i}` is the busiest expert's share of the
assignments times E (1.0: perfectly balanced; E/k: every token to the same k experts).
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.models.mlp import MLP


def route(
    logits: torch.Tensor, top_k: int, normalize: bool, unit: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router probabilities (N, E), top-k weights (N, k), top-k expert indices (N, k)) from logits (N, E).

    Ties between equal probabilities go to the lower expert index (torch.topk's order), as in transformers.
    `unit` (moe_weighting: unit): every weight is exactly 1 (w - w.detach() is exactly 0), while the gradient
    is the (normalised) softmax weight's, so the router still learns in training."""
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if unit:
        weights = weights - weights.detach() + 1.0
    return probs, weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's balance loss E x sum_e f_e P_e (1 under uniform routing; see the module docstring).

    probs (N, E) router probabilities; experts (N, k) the chosen experts. f_e counts assignments, not tokens, so
    the loss does not grow with k."""
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / experts.numel()
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean of logsumexp(logits)^2 over tokens."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """`moe_experts` gated MLPs of width d_ff, `moe_top_k` per token, dropless; plus an optional shared expert.

    Names follow transformers (Mixtral/OLMoE/Qwen2-MoE without the prefix): `gate` is the router,
    `experts.{e}.{gate,up,down}_proj` the experts, `shared_expert` and `shared_expert_gate` Qwen2-MoE's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = config.moe_experts, config.moe_top_k
        self.normalize = config.moe_norm_topk
        self.unit = config.moe_weighting == "unit"
        self.z_loss_weight = config.moe_z_loss_weight
        self.gate = nn.Linear(config.d_model, self.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(self.n_experts))
        if config.moe_shared_d_ff:
            self.shared_expert = MLP(config, d_ff=config.moe_shared_d_ff)
            if config.moe_shared_gate:
                self.shared_expert_gate = nn.Linear(config.d_model, 1, bias=False)
        self.aux_loss: torch.Tensor | None = None  # set by a training forward (see the module docstring)
        self.aux_metrics: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        logits = self.gate(flat).float()  # (N, E): routing in fp32 whatever the model's dtype
        probs, weights, experts = route(logits, self.top_k, self.normalize, self.unit)
        out = self._experts(flat, weights.to(flat.dtype), experts)
        modules = self._modules
        if "shared_expert" in modules:
            shared = modules["shared_expert"](flat)
            if "shared_expert_gate" in modules:
                shared = torch.sigmoid(modules["shared_expert_gate"](flat)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():
            self.aux_loss = load_balancing_loss(probs, experts, self.n_experts) + self.z_loss_weight * router_z_loss(
                logits
            )
            counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
            self.aux_metrics = {"moe_load": (counts.max() * self.n_experts / experts.numel()).detach().float()}
        return out.reshape(shape)

    def _experts(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum over each token's k experts of weight x expert(token), expert by expert over its own tokens."""
        out = torch.zeros_like(flat)
        if flat.shape[0] == 1:  # one token (batch-1 decode): no sorting, just its k experts
            for j, e in enumerate(experts[0].tolist()):
                out = out + weights[0, j] * self.experts[e](flat)
            return out
        assignment = experts.reshape(-1)  # (N k,): token n's j-th choice at n k + j
        order = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=self.n_experts).tolist()  # one sync for the whole layer
        tokens = order // self.top_k
        # one gather of every (token, choice) in expert order, contiguous slices per expert, one scatter-add back:
        # per-expert gathers would each cost a full-size zero gradient in the backward pass
        grouped = flat[tokens].split(counts)
        outs = [self.experts[e](rows) for e, rows in enumerate(grouped) if rows.shape[0]]
        weighted = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(-1)
        out.index_add_(0, tokens, weighted)
        return out
