"""Training on more than one process, on PyTorch's own engine: `torch.distributed` launched by `torchrun`.

Strategies (`TrainConfig.strategy`, `slm train --strategy`):

- ``single``: one process, no process group (the plain loop).
- ``ddp``: `DistributedDataParallel`; every rank holds the whole model and optimizer, gradients are
  all-reduced once per optimizer step (`no_sync` on all but the last micro-step).
- ``fsdp``: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block and then on the root,
  so parameters, gradients and optimizer state are sharded across ranks; bf16 mixed precision on GPUs.
- ``auto``: ``single`` when `WORLD_SIZE` is unset (not launched by torchrun), else ``ddp``.

The backend is nccl on GPUs (rank r uses `cuda:LOCAL_RANK`) and gloo on CPUs. Collectives run under a
timeout (`TrainConfig.dist_timeout_seconds`), so a rank that dies or stops answering makes the others
stop with :class:`RankFailure` instead of hanging.

Checkpoints stay one model directory whatever the strategy: the model and optimizer states are gathered
into full, unsharded tensors and rank 0 writes them (see `slmkit.train.loop`). Optimizer state is stored
keyed by parameter name, not by position or shard, so a run resumes under another strategy or world size.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slmkit.errors import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "single", "ddp", "fsdp")


class RankFailure(UserError):
    """Another rank crashed or stopped answering: this rank stops too (the CLI prints it, exit code 2)."""


@dataclass
class DistContext:
    """Where this process stands: its strategy, rank and world, and whether it owns the process group."""

    strategy: str  # single | ddp | fsdp (resolved)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_seconds: float = 600.0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.strategy != "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def resolve_strategy(name: str, env: Mapping[str, str] | None = None) -> str:
    """`auto` -> single or ddp from the launch; refuse strategies that do not fit the launch."""
    env = os.environ if env is None else env
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    world_size = _env_int(env, "WORLD_SIZE")
    if name == "auto":
        return "single" if world_size is None else "ddp"
    if name == "single":
        if world_size is not None and world_size > 1:
            raise UserError(
                f"--strategy single, but this process is one of WORLD_SIZE={world_size} launched by torchrun; "
                "use --strategy ddp or fsdp (or auto), or launch one process with `slm train`"
            )
        return "single"
    if world_size is None:
        raise UserError(
            f"--strategy {name} needs processes launched by torchrun (WORLD_SIZE is not set), e.g. "
            f"`torchrun --nproc-per-node 2 -m slmkit train ... --strategy {name}`; "
            "or use --strategy single for one process"
        )
    return name


def start(strategy: str, device: torch.device, timeout_seconds: float) -> tuple[DistContext, torch.device]:
    """Join the process group for a distributed strategy; returns the context and this rank's device."""
    if strategy == "single":
        return DistContext("single", timeout_seconds=timeout_seconds), device
    import torch.distributed as dist

    rank = _env_int(os.environ, "RANK")
    world_size = _env_int(os.environ, "WORLD_SIZE")
    local_rank = _env_int(os.environ, "LOCAL_RANK")
    if rank is None or world_size is None:
        raise UserError("RANK and WORLD_SIZE must be set for a distributed run; launch it with torchrun")
    if local_rank is None:
        local_rank = rank
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                "lower --nproc-per-node to the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        try:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_seconds)
            )
        except (RuntimeError, ValueError) as exc:
            raise UserError(
                f"rank {rank}: could not join the process group of {world_size} ({exc}); check MASTER_ADDR, "
                "MASTER_PORT and that every rank was launched"
            ) from None
    else:
        backend = dist.get_backend()
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(strategy, rank, world_size, local_rank, backend, timeout_seconds, owns_group), device


def stop(ctx: DistContext) -> None:
    """Leave the process group we created (also after a failed collective, so the process exits cleanly)."""
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        ctx.owns_group = False


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (gloo, nccl), as opposed to a bug or a user error."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(
        marker in text
        for marker in (
            "gloo",
            "Gloo",
            "NCCL",
            "nccl",
            "Connection closed",
            "Connection reset",
            "Timed out",
            "timed out",
        )
    )


def wrap_model(
    model: torch.nn.Module, ctx: DistContext, device: torch.device, amp_dtype: torch.dtype | None
) -> torch.nn.Module:
    """The module to run forward and backward on. For fsdp, `model` itself is sharded in place."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if device.type == "cuda" and amp_dtype is not None:
            # compute in bf16, reduce gradients and keep the sharded master weights in fp32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        for block in model.layers:  # type: ignore[union-attr]
            fully_shard(block, **kwargs)
        # embed_tokens, the final norm and lm_head stay in the root group: with tied embeddings
        # lm_head.weight *is* embed_tokens.weight, and one group keeps that one sharded parameter
        fully_shard(model, **kwargs)
        return model
    return model


def sync_gradients(
    wrapped: torch.nn.Module, ctx: DistContext, last_micro_step: bool
) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on all micro-steps but the last one."""
    if ctx.strategy == "ddp" and not last_micro_step:
        return wrapped.no_sync()  # type: ignore[operator]
    if ctx.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(last_micro_step)  # type: ignore[operator]
    return contextlib.nullcontext()


def step_stats(
    ctx: DistContext, values: Sequence[torch.Tensor], seconds: float, interrupted: bool
) -> tuple[list[float], float, bool]:
    """One device sync (one collective when distributed) per step: the step's loss and the objective's
    metrics (`values`, scalars; means over ranks), the slowest rank's time, and whether any rank was
    asked to stop (Ctrl-C), so every rank takes the same budget and stop decisions."""
    if not ctx.distributed:
        if len(values) == 1:
            return [float(values[0])], seconds, interrupted
        return torch.stack(list(values)).tolist(), seconds, interrupted
    import torch.distributed as dist

    mine = torch.stack([v.detach().double() for v in values]).cpu()  # one copy from the device
    mine = torch.cat([mine, torch.tensor([seconds, float(interrupted)], dtype=torch.float64)])
    if ctx.backend == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).cpu()
    n = len(values)
    return table[:, :n].mean(dim=0).tolist(), float(table[:, n].max()), bool(table[:, n + 1].max() > 0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """An unsharded CPU copy (a collective for DTensors: every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.detach().full_tensor()
    return tensor.detach().cpu()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on every rank (names as in the unwrapped model)."""
    return {name: _full(tensor) for name, tensor in model.state_dict().items()}


def grad_norm_value(norm: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _names(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    # named_parameters() yields a tied parameter once, under its first name (embed_tokens.weight)
    return {param: name for name, param in model.named_parameters()}


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, full (unsharded) CPU tensors: the same for every strategy
    and world size. A collective under fsdp: every rank calls it."""
    names = _names(model)
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state:
                state[names[param]] = {
                    key: _full(value) if isinstance(value, torch.Tensor) else value
                    for key, value in optimizer.state[param].items()
                }
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]}
        )
    return {"format": "by-name", "state": state, "param_groups": groups}


def load_named_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: str
) -> None:
    """Load `named_optimizer_state` output into an optimizer of a (possibly sharded) model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if saved.get("format") != "by-name":  # a checkpoint from before named state: positional, one process
        optimizer.load_state_dict(saved)
        return
    names = _names(model)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise UserError(
            f"{source}: optimizer state has {len(saved['param_groups'])} parameter groups, this run has "
            f"{len(optimizer.param_groups)}"
        )
    by_index: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        ours = [names[p] for p in group["params"]]
        if ours != saved_group["params"]:
            raise UserError(f"{source}: optimizer state is for other parameters than this run's model")
        first = index
        for param in group["params"]:
            entry = saved["state"].get(names[param])
            if entry is not None:
                loaded = {}
                for key, value in entry.items():
                    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
                        # every rank read the full tensor from disk: keep this rank's shard, no communication
                        value = distribute_tensor(
                            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                        )
                    loaded[key] = value
                by_index[index] = loaded
            index += 1
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": list(range(first, index))})
    optimizer.load_state_dict({"state": by_index, "param_groups": groups})


@contextlib.contextmanager
def quiet_unless_main(ctx: DistContext) -> Iterator[None]:
    """Silence slmkit's logging on ranks other than 0 (only rank 0 logs)."""
    if ctx.is_main:
        yield
        return
    logger = logging.getLogger("slmkit")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)
