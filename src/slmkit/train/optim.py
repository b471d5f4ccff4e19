"""Optimizers (AdamW; Muon for hidden matrices with AdamW for the rest) and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig


def _head_and_tables(model: torch.nn.Module) -> set[int]:
    """ids of embedding tables and the output head (tied or not): the parameters whose rows are looked up or
    scored one token at a time, which orthogonalised updates do not suit and weight decay should not shrink."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Linear):
        ids.add(id(head.weight))
    return ids


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only: no decay on norms, biases or embeddings (tied head too)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters Muon updates: the weight of every `nn.Linear` inside the blocks (attention and MLP
    projections, experts, other mixers' projections, adapters), 2-D by construction. Not the embeddings, the
    output head, norms, biases, convolutions, or other tensors that are not a linear map of the hidden state (an
    SSM's A_log, a memory's sub-keys): those stay with AdamW."""
    skip = _head_and_tables(model)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and id(p) in linear and id(p) not in skip
    ]


class _States(Mapping):
    """Both optimizers' per-parameter states as one read-only mapping. (A ChainMap would not do: torch's states
    are defaultdicts, so looking a parameter up in the wrong one would add an empty entry there.)"""

    def __init__(self, states: tuple[Mapping, ...]) -> None:
        self.states = states

    def __getitem__(self, param: Any) -> Any:
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator:
        return (param for state in self.states for param in state)

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class MuonWithAdamW:
    """Muon for the hidden matrices, AdamW for every other parameter, stepped together: the training loop sees
    one optimizer (its `param_groups` are both optimizers' groups, Muon's first, so setting each group's lr from
    the schedule reaches both; `state` is both states, so the state saved by parameter name covers both)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> _States:
        return _States(tuple(opt.state for opt in self.optimizers))

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One positional state dict over both optimizers' groups in order (the layout torch's have)."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        index = 0
        for opt in self.optimizers:
            own = opt.state_dict()
            for group in own["param_groups"]:
                groups.append({**group, "params": [index + i for i in group["params"]]})
            state.update({index + i: value for i, value in own["state"].items()})
            index += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a `state_dict` layout (both optimizers' groups in order, parameters numbered across them)."""
        groups = saved["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this one {len(self.param_groups)}")
        start = 0
        for opt in self.optimizers:
            own = groups[start : start + len(opt.param_groups)]
            start += len(own)
            indices = [i for g in own for i in g["params"]]
            renumber = {i: n for n, i in enumerate(indices)}
            opt.load_state_dict(
                {
                    "state": {renumber[i]: saved["state"][i] for i in indices if i in saved["state"]},
                    "param_groups": [{**g, "params": [renumber[i] for i in g["params"]]} for g in own],
                }
            )


def late_head(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Parameter | None:
    """The output head of a run that unties it late (`untie_head_at`), once it is untied, else None. It trains
    in an AdamW group of its own appended last, as when the loop unties it mid-run (`add_head_group`), so a run
    resumed after the untying has the uninterrupted run's parameter groups."""
    if cfg.untie_head_at is None or model.config.tie_embeddings:  # type: ignore[attr-defined]
        return None
    return model.lm_head.weight  # type: ignore[return-value]


def add_head_group(optimizer: Any, head: torch.nn.Parameter, lr_scale: float = 1.0) -> None:
    """Train `head` (a late-untied output head) with AdamW, no weight decay, in a group of its own (at the
    tables' `embed_lr_scale`)."""
    target = optimizer.optimizers[-1] if isinstance(optimizer, MuonWithAdamW) else optimizer
    extra = {"lr_scale": lr_scale} if lr_scale != 1.0 else {}  # the loop sets every group's lr before each step
    target.add_param_group({"params": [head], "weight_decay": 0.0, **extra})


def _tables_apart(model: torch.nn.Module, groups: list[dict], scale: float) -> list[dict]:
    """`groups` with the embedding tables and the output head moved into a group of their own at lr x `scale`
    (no weight decay); unchanged at scale 1.0, so runs and checkpoints without the knob keep their groups."""
    if scale == 1.0:
        return groups
    tables = _head_and_tables(model)
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in tables]} for g in groups]
    moved = [p for g in groups for p in g["params"] if id(p) in tables]
    own = [{"params": moved, "weight_decay": 0.0, "lr_scale": scale}] if moved else []  # lr: set by the loop
    return [g for g in rest if g["params"]] + own


def resolve_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """The optimizer a run uses: `cfg.optimizer`, with `auto` as muon where Muon can run (whole matrices, at
    least one hidden matrix trainable) and adamw elsewhere (fsdp, or only embeddings, norms or biases training)."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return "muon" if not sharded and muon_param_names(model) else "adamw"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Any:
    """AdamW over every trainable parameter, or (optimizer: muon) Muon over `muon_param_names` and AdamW over the
    rest. Muon scales its step by 0.2 sqrt(max(rows, cols)) (torch's "match_rms_adamw"), so its updates have the
    RMS of AdamW's and the same `lr` and `weight_decay` serve both groups and every preset; `muon_lr_scale`
    multiplies Muon's lr if a run wants it apart (the loop keeps the ratio through the schedule)."""
    fused = device.type == "cuda"
    head = late_head(model, cfg)
    if resolve_optimizer(model, cfg) == "adamw":
        groups = param_groups(model, cfg.weight_decay)
        if head is not None:
            groups = [{**g, "params": [p for p in g["params"] if p is not head]} for g in groups]
        groups = _tables_apart(model, groups, cfg.embed_lr_scale)
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
        if head is not None:
            add_head_group(opt, head, cfg.embed_lr_scale)
        return opt
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        # Newton-Schulz needs each whole matrix; fsdp holds row shards (torch's Muon has no sharded path)
        raise UserError("--optimizer muon does not work under --strategy fsdp (sharded matrices); use ddp or adamw")
    names = set(muon_param_names(model))
    named = dict(model.named_parameters())
    matrices = [named[n] for n in named if n in names]
    if not matrices:
        raise UserError("--optimizer muon: the trainable parameters hold no hidden matrices; use --optimizer adamw")
    rest = [p for n, p in named.items() if p.requires_grad and n not in names and p is not head]
    lr = cfg.lr * cfg.muon_lr_scale
    muon = torch.optim.Muon(
        [{"params": matrices, "lr_scale": cfg.muon_lr_scale}],
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )
    # the rest as AdamW does it: no decay on embeddings, head, norms or biases (a non-linear 2-D tensor decays)
    skip = _head_and_tables(model)
    decay = [p for p in rest if p.dim() >= 2 and id(p) not in skip]
    no_decay = [p for p in rest if not (p.dim() >= 2 and id(p) not in skip)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = _tables_apart(model, groups, cfg.embed_lr_scale)
    adamw = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused
    )
    if head is not None:
        add_head_group(adamw, head, cfg.embed_lr_scale)
    return MuonWithAdamW(muon, adamw)


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


def seq_len_at(cfg: TrainConfig, step: int) -> int:
    """Tokens per sequence at optimizer step `step` (0-based): with `seq_len_warmup_steps`, a linear ramp from
    `seq_len_warmup_start` to `seq_len`, in multiples of the start length (few distinct shapes for compile);
    the full `seq_len` otherwise and afterwards. Short early sequences give more optimizer steps per second while
    the model learns what needs little context."""
    return _ramp(cfg.seq_len, cfg.seq_len_warmup_start, cfg.seq_len_warmup_steps, step)


def rows_at(cfg: TrainConfig, step: int) -> int:
    """Rows per micro-batch at optimizer step `step` (0-based): with `batch_warmup_steps`, a linear ramp from
    `batch_warmup_start` to `batch_size` in multiples of the start (batch-size warm-up: small, cheap, noisy steps
    while the gradient is large and agrees across examples); `batch_size` otherwise and afterwards."""
    return _ramp(cfg.batch_size, cfg.batch_warmup_start, cfg.batch_warmup_steps, step)


def _ramp(full: int, start: int, steps: int, step: int) -> int:
    if not steps or step >= steps:
        return full
    value = start + (full - start) * step / steps
    return min(full, max(start, int(value) // start * start))
