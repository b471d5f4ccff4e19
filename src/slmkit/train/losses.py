"""The loss functions: next-token cross-entropy (the one helper every caller uses) and distillation.

Training, distillation, evaluation (`slmkit.eval.perplexity`) and the scaling ladder all score next-token
predictions with `next_token_cross_entropy`, so a change of reduction or precision happens in one place.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def next_token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Cross-entropy (nats) of targets (B, T) under logits (B, T, V): mean over tokens, or their sum.

    The logits go to fp32 first: under bf16 autocast the log-sum-exp over a large vocabulary loses
    too many digits for the loss (and its gradient) to be trusted.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def distill_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distillation loss and its terms: `distill_kl` (KL at temperature T, unscaled) and `lm_loss`.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy,
    averaged over tokens (Hinton et al. 2015; the T^2 keeps the KL gradient's scale independent of T).
    A term whose weight is 0 is neither computed nor reported.
    """
    v = student_logits.size(-1)
    s = student_logits.float().reshape(-1, v)
    t = teacher_logits.float().reshape(-1, v)
    loss = student_logits.new_zeros((), dtype=torch.float32)
    terms: dict[str, torch.Tensor] = {}
    if alpha > 0:
        kl = F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + alpha * temperature**2 * kl
        terms["distill_kl"] = kl.detach()
    if alpha < 1:
        ce = next_token_cross_entropy(s, targets)
        loss = loss + (1 - alpha) * ce
        terms["lm_loss"] = ce.detach()
    return loss, terms


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, averaged over tokens."""
    return distill_terms(student_logits, teacher_logits, targets, temperature, alpha)[0]
