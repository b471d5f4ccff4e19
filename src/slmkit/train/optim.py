"""Optimizer and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from slmkit.train.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only: no decay on norms, biases or embeddings (tied head too)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused
    )


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Learning rate for optimizer step `step` (0-based) at run progress in [0, 1].

    Progress is the share of the budget spent (steps, tokens, FLOPs or time), so the same schedule
    serves every budget kind: linear warmup over `warmup_steps`, then cosine to `min_lr_ratio * lr`,
    or warmup-stable-decay (constant, then linear decay over the last `decay_fraction`), or constant.
    """
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_fraction
        if p <= start:
            return cfg.lr
        return floor + (cfg.lr - floor) * (1.0 - (p - start) / cfg.decay_fraction)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
