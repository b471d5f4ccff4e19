"""The training loop: budgets, evaluation, metrics, atomic checkpoints and exact resume, for any objective.

`train(cfg, data_dir, run_dir)` pre-trains a model with the language-modeling objective; the CLI, the
quickstart and the ladder call it. `run(cfg, data, run_dir, spec)` is the one loop underneath: it
trains `spec.model` on `spec.objective` (see `slmkit.train.objectives`), and `slm distill` calls it
with the distillation objective. Either reports through a `Reporter` (the CLI draws a progress line;
the default logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from slmkit.errors import UserError
from slmkit.interop.checkpoint import latest_checkpoint, save_model
from slmkit.train import distributed
from slmkit.train.batches import WindowSampler
from slmkit.train.budget import Budget
from slmkit.train.checkpoints import (
    STATE_JSON,
    STATE_PT,
    check_resume_data,
    data_identity,
    latest_resumable,
    load_checkpoint,
    load_trainer_state,
    prune_checkpoints,
    refuse_existing_run,
    rng_state,
    set_rng_state,
    trainer_state_writer,
    truncate_metrics,
)
from slmkit.train.config import TrainConfig
from slmkit.train.objectives import LanguageModeling, Metrics, Objective
from slmkit.train.optim import add_head_group, lr_at, make_optimizer, resolve_optimizer, rows_at, seq_len_at
from slmkit.train.validation import token_nats

log = logging.getLogger(__name__)

__all__ = [
    "STATE_JSON",
    "CheckpointFormat",
    "STATE_PT",
    "LogReporter",
    "Reporter",
    "RunSpec",
    "TrainResult",
    "autocast_dtype",
    "measure_peak_flops",
    "peak_flops",
    "resolve_device",
    "run",
    "train",
    "truncate_metrics",
]

TRAIN_CONFIG = "train_config.json"


class Reporter(Protocol):
    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def eval(self, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: TrainResult) -> None: ...


class LogReporter:
    """Reports through `logging` (library default)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def start(self, info: dict[str, Any]) -> None:
        log.info(
            "training %s parameters on %s (%s), %s; MFU against %s",
            f"{info['params']:,}",
            info["device"],
            info["dtype"],
            info.get("optimizer", "adamw"),
            info.get("mfu_peak", "the measured peak"),
        )

    def step(self, m: dict[str, Any]) -> None:
        if m["step"] % self.every == 0:
            log.info("step %d loss %.4f lr %.2e %.0f tok/s", m["step"], m["loss"], m["lr"], m["tokens_per_second"])

    def eval(self, m: dict[str, Any]) -> None:
        log.info("step %d val_loss %.4f val_bpb %.4f", m["step"], m["val_loss"], m["val_bits_per_byte"])

    def message(self, text: str) -> None:
        log.info(text)

    def end(self, result: TrainResult) -> None:
        log.info("done: %s after %d steps", result.stop_reason, result.step)


class _SilentReporter:
    """Ranks other than 0 report nothing."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def eval(self, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    tokens: int
    flops: float
    seconds: float
    stop_reason: str  # a budget name, "interrupted"
    train_loss: float | None = None
    val_loss: float | None = None
    val_bits_per_byte: float | None = None
    losses: list[float] = field(default_factory=list)  # per step, this invocation only
    val: dict[str, float] = field(default_factory=dict)  # the last evaluation (objectives may add entries)


@dataclass
class RunSpec:
    """What a run trains and how its directory is kept: the parts training and distillation do not share."""

    kind: str  # "training", "distillation": named in messages and in trainer_state.json
    model: torch.nn.Module  # to train, initialised, on the CPU; a resumed run loads its checkpoint into it
    objective: Objective
    tokenizer_dir: Path  # copied into every checkpoint
    config_file: str  # in the run dir, written at each start; what `--resume` reads back
    config_record: Callable[[TrainConfig], dict[str, Any]]  # what config_file holds (given the final config)
    # the training batches (default: shuffled token windows of the data dir's train split); a sampler's
    # next_batch(n) returns (x, y) or (x, y, extra forward arguments, e.g. segments and positions of packed samples)
    sampler: Callable[[TrainConfig, int, int], Any] | None = None  # (config, rank, world size) -> sampler
    # the validation loss as (nats, predicted tokens) of a module (default: windows of the data dir's val split)
    val_nats: Callable[[torch.nn.Module, TrainConfig, Any], tuple[float, int]] | None = None
    # more validation entries (name -> value) of a module, e.g. the loss on replayed data
    more_val: Callable[[torch.nn.Module, TrainConfig, Any], dict[str, float]] | None = None
    # how checkpoints hold the model (default: a full model directory); see `CheckpointFormat`
    checkpoint_format: CheckpointFormat | None = None
    # adds files to each checkpoint being written (e.g. the chat template into tokenizer_config.json)
    add_files: Callable[[Path], None] | None = None


class CheckpointFormat(Protocol):
    """What a checkpoint of a run holds of its model when that is not the whole model (an adapter)."""

    def save(self, model: torch.nn.Module, target: Path, tokenizer_dir: Path, extra: Callable[[Path], None]) -> Path:
        """Write the model's part atomically into `target`; `extra(tmp_dir)` adds the trainer state."""
        ...

    def load(self, directory: Path, model: torch.nn.Module) -> None:
        """Load what `save` wrote into the (unwrapped) model of a resumed run."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


# x86 CPU flags of native bf16 dot products: with them torch's bf16 matmuls (oneDNN) run at 2-3.5x the fp32 rate
# (AMD EPYC with AVX512-BF16, docs/training.md); without them bf16 is emulated and slower than fp32
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# below this width a step's matmuls are too small for bf16 to pay on such a CPU (measured: 0.91-1.09x at width
# 32-64, 1.17-1.21x at 128, 1.5x at 256; docs/training.md)
CPU_BF16_MIN_WIDTH = 128


def has_bf16_flags(cpuinfo: str) -> bool:
    """Whether the first `flags` line of a /proc/cpuinfo text names one of `CPU_BF16_FLAGS`."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.split(":", 1)[1].split()) & set(CPU_BF16_FLAGS))
    return False


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (Linux: /proc/cpuinfo's flags; False where it cannot be read)."""
    try:
        return has_bf16_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def autocast_dtype(cfg: TrainConfig, device: torch.device, width: int | None = None) -> torch.dtype | None:
    """The autocast dtype of `dtype: auto`: bf16 on CUDA with bf16, and on a CPU with native bf16 (`cpu_native_bf16`)
    for models at least `CPU_BF16_MIN_WIDTH` wide (`width`: the model's d_model); fp32 (None) otherwise."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and width is not None and width >= CPU_BF16_MIN_WIDTH and cpu_native_bf16():
        return torch.bfloat16
    return None


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved dense matmul FLOP/s on this device: the denominator of our MFU estimate."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.15:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s from the vendors' data sheets, matched on torch's device
# name in order (the SXM H100 reports itself as "H100 80GB HBM3"); other GPUs and other dtypes use the measured peak.
GPU_PEAK_FLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H200", "H200 SXM", 989.4e12),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 989.4e12),
    (r"H100 PCIe", "H100 PCIe", 756.5e12),
    (r"A100", "A100", 312e12),
    (r"L40S", "L40S", 362.05e12),
    (r"\bL4\b", "L4", 121e12),
    (r"RTX 4090", "RTX 4090", 165.2e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, what it is): the denominator of MFU. A GPU in `GPU_PEAK_FLOPS` training in bf16/fp16 uses its data
    sheet's dense peak (what MFU figures in papers divide by); anything else (CPUs, other GPUs, fp32) the measured
    dense matmul rate of `measure_peak_flops`, which is below the data sheet's, so MFU reads higher there."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        import re

        name = torch.cuda.get_device_name(device)
        for pattern, label, flops in GPU_PEAK_FLOPS:
            if re.search(pattern, name):
                kind = str(dtype).removeprefix("torch.")
                return flops, f"{label} {kind} peak {flops / 1e12:.0f} TFLOP/s (data sheet)"
    measured = measure_peak_flops(device, dtype)
    return measured, f"measured matmul peak {measured / 1e12:.3g} TFLOP/s"


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    budget_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a model on a prepared data dir into run_dir with the language-modeling objective.

    A new run refuses a run_dir that holds anything (an earlier run, other files) unless `overwrite`, which
    replaces the earlier run's files (see `checkpoints.refuse_existing_run`).

    Under torchrun every rank calls this; `cfg.strategy` picks one process, DDP or FSDP (see
    `slmkit.train.distributed`), and only rank 0 reports, writes metrics and checkpoints.
    """
    from slmkit.data.shards import load_data_dir
    from slmkit.models import build_model

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    if resume:
        resume_from = latest_resumable(run_dir, TRAIN_CONFIG, "training")
        cfg = TrainConfig.load(run_dir / TRAIN_CONFIG, budget_overrides)
    else:
        refuse_existing_run(run_dir, TRAIN_CONFIG, overwrite)
    if not cfg.has_budget:
        raise UserError("no training budget: give --max-steps, --max-tokens, --max-minutes or --max-flops")
    distributed.resolve_strategy(cfg.strategy)  # refuse a strategy that does not fit the launch before any work

    data = load_data_dir(data_dir)
    check_enough_data(data, data_dir, cfg.seq_len)
    if cfg.init is not None:
        model = initial_model(cfg.init, data, data_dir, cfg.seq_len, cfg.context, cfg.rope)
    else:
        model_cfg = cfg.model_config(vocab_size=data.vocab_size)
        model_cfg = model_cfg.replace(bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id)
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
        model.init_weights(seed=cfg.seed)
    spec = RunSpec(
        kind="training",
        model=model,
        objective=LanguageModeling(
            cfg.trainable, cfg.aux_loss_weight, cfg.reweight_temperature if cfg.reweight == "loss" else None
        ),
        tokenizer_dir=Path(data.path),
        config_file=TRAIN_CONFIG,
        config_record=TrainConfig.to_dict,
    )
    if cfg.replay is not None:
        _add_replay(spec, cfg.replay, data, data_dir, cfg.seq_len)
    if cfg.curriculum == "decomposition":
        from slmkit.train.curriculum import DecompositionSampler

        spec.sampler = lambda c, rank, world: DecompositionSampler(
            data.train, data.eot_token_id, c.seq_len, c.batch_size, c.seed, rank, world
        )
    if cfg.mix is not None:
        _add_mix(spec, cfg.mix, data, data_dir, cfg.seq_len)
    return run(cfg, data, run_dir, spec, resume_from, reporter)


def mixture_domains(data: Any, data_dir: str | Path, mix: dict[str, float], seq_len: int) -> list[Any]:
    """The domains `mix` names, checked: the data dir records domains, each named one exists and holds a
    training window."""
    if not data.has_domains:
        raise UserError(
            f"{data_dir} records no domains (prepared before domains existed); re-run `slm data prepare` with one "
            "source per domain to train with --mix"
        )
    known = {d.name: d for d in data.domains}
    unknown = [name for name in mix if name not in known]
    if unknown:
        raise UserError(f"--mix names unknown domain(s) {', '.join(unknown)}; {data_dir} has: {', '.join(known)}")
    domains = [known[name] for name in mix]
    for domain in domains:
        if domain.ranges["train"][1] < seq_len + 1:
            raise UserError(
                f"--mix: domain {domain.name!r} of {data_dir} has {domain.ranges['train'][1]} train tokens, fewer "
                f"than one sequence of {seq_len + 1}; leave it out of --mix or use a smaller --seq-len"
            )
    return domains


def _add_mix(spec: RunSpec, mix: dict[str, float], data: Any, data_dir: str | Path, seq_len: int) -> None:
    """Draw batches from the data dir's domains at the shares `mix` gives; log each domain's val loss."""
    from slmkit.train.batches import MixtureSampler

    domains = mixture_domains(data, data_dir, mix, seq_len)

    def sampler(cfg: TrainConfig, rank: int, world: int) -> MixtureSampler:
        # each domain its own order: seeds seed, seed + 1, ... in the order of `mix`
        samplers = {
            d.name: WindowSampler(d.tokens(data, "train"), cfg.seq_len, cfg.seed + i, rank=rank, world_size=world)
            for i, d in enumerate(domains)
        }
        return MixtureSampler(samplers, mix)

    def domain_val(model: torch.nn.Module, cfg: TrainConfig, autocast: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        windows = cfg.eval_batches * cfg.batch_size
        for domain in data.domains:
            tokens = domain.tokens(data, "val")
            bytes_per_token = domain.bytes_per_token("val")
            if len(tokens) < 2 or not bytes_per_token:
                continue
            nats, count = token_nats(model, tokens, cfg.seq_len, cfg.batch_size, windows, autocast=autocast)
            out[f"val_loss/{domain.name}"] = nats / count
            out[f"val_bits_per_byte/{domain.name}"] = nats / count / math.log(2) / bytes_per_token
        return out

    spec.sampler, spec.more_val = sampler, domain_val


def _add_replay(spec: RunSpec, replay_dir: str, data: Any, data_dir: str | Path, seq_len: int) -> None:
    """Draw `replay_fraction` of every batch from the data dir `replay_dir` and log its validation loss."""
    from slmkit.data.shards import load_data_dir
    from slmkit.train.batches import ReplaySampler

    replay = load_data_dir(replay_dir)
    if replay.meta.get("tokenizer_sha256") != data.meta.get("tokenizer_sha256"):
        raise UserError(
            f"replay data {replay_dir} was not tokenized with {data_dir}'s tokenizer; prepare it with --tokenizer"
        )
    check_enough_data(replay, replay_dir, seq_len)

    def sampler(cfg: TrainConfig, rank: int, world: int) -> ReplaySampler:
        main = WindowSampler(data.train, cfg.seq_len, cfg.seed, rank=rank, world_size=world)
        old = WindowSampler(replay.train, cfg.seq_len, cfg.seed + 1, rank=rank, world_size=world)
        return ReplaySampler(main, old, cfg.replay_fraction)

    def replay_val(model: torch.nn.Module, cfg: TrainConfig, autocast: Any) -> dict[str, float]:
        if len(replay.val) < 2:
            return {}
        windows = cfg.eval_batches * cfg.batch_size
        nats, count = token_nats(model, replay.val, cfg.seq_len, cfg.batch_size, windows, autocast=autocast)
        return {"replay_val_loss": nats / count}

    spec.sampler, spec.more_val = sampler, replay_val


def initial_model(
    init: str | Path, data: Any, data_dir: str | Path, seq_len: int, context: int | None = None, rope: str | None = None
) -> torch.nn.Module:
    """The float model in directory `init` (a run dir means its final model), checked to share the data's
    tokenizer and to fit the sequence length: the start of a run that continues training it. With `context` its
    window is first extended to that many positions by `rope` scaling (`extend_model_context`)."""
    from slmkit.interop.checkpoint import load_model, resolve_model_dir
    from slmkit.train.checkpoints import tokenized_with

    directory = resolve_model_dir(init)
    if not tokenized_with(directory / "tokenizer.json", data):
        raise UserError(f"{data_dir} was not tokenized with {directory}'s tokenizer; prepare it with --tokenizer")
    model = load_model(directory)
    if getattr(model, "compression", None) is not None:
        raise UserError(f"{directory}: the model is quantized or factored; continue training a float model")
    if context is not None:
        extend_model_context(model, context, rope, directory)
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds {directory}'s context ({model.config.max_seq_len})")
    return model


def extend_model_context(model: torch.nn.Module, context: int, rope: str | None, source: Path) -> None:
    """Give the loaded `model` a `context`-position window with `rope` scaling (None: yarn) in place; saving it
    writes the new max_position_embeddings and rope parameters (see slmkit.config.extend_context)."""
    from slmkit.config import extend_context
    from slmkit.interop.families import check_family

    before = model.config.max_seq_len  # type: ignore[attr-defined]
    try:
        config = extend_context(model.config, context, rope or "yarn")  # type: ignore[attr-defined]
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    model.config = check_family(config, str(source))  # type: ignore[attr-defined]
    log.info("context extended from %d to %d positions with %s rope scaling", before, context, rope or "yarn")


def check_enough_data(data: Any, data_dir: str | Path, seq_len: int) -> None:
    if len(data.train) < seq_len + 1:
        raise UserError(
            f"{data_dir}: train split has {len(data.train)} tokens, fewer than one sequence of "
            f"{seq_len + 1}; use more data or a smaller --seq-len"
        )


def run(
    cfg: TrainConfig,
    data: Any,
    run_dir: Path,
    spec: RunSpec,
    resume_from: Path | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train `spec.model` on `spec.objective` with the data dir `data` (a `load_data_dir` result) into run_dir,
    continuing from the checkpoint `resume_from` if given (see `checkpoints.latest_resumable`)."""
    strategy = distributed.resolve_strategy(cfg.strategy)
    device = resolve_device(cfg.device)
    ctx, device = distributed.start(strategy, device, cfg.dist_timeout_seconds)
    try:
        with distributed.quiet_unless_main(ctx):
            reporter = (reporter or LogReporter()) if ctx.is_main else _SilentReporter()
            session = _Session(cfg, data, run_dir, spec, ctx, device, reporter)
            session.setup(resume_from)
            return session.train()
    except Exception as exc:
        if ctx.distributed and distributed.is_collective_failure(exc):
            raise _rank_failure(ctx, exc, run_dir) from None
        raise
    finally:
        distributed.stop(ctx)


def _rank_failure(ctx: distributed.DistContext, exc: Exception, run_dir: Path) -> distributed.RankFailure:
    latest = latest_checkpoint(run_dir)
    kept = f"the last checkpoint, {latest}, is intact; continue with --resume" if latest else "no checkpoint yet"
    text = str(exc).strip()
    # the backend's first sentence names what happened ("Connection reset by peer", "Timed out ...")
    first_line = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    return distributed.RankFailure(
        f"rank {ctx.rank} of {ctx.world_size}: another rank failed or stopped answering within "
        f"{ctx.timeout_seconds:g} s ({first_line}); every rank stops, see the other ranks' output; {kept}"
    )


@dataclass
class _Counters:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops, "elapsed": self.elapsed}


class _Session:
    """One invocation of a run: the model, optimizer and sampler, the counters, and the run dir's files."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: Any,
        run_dir: Path,
        spec: RunSpec,
        ctx: distributed.DistContext,
        device: torch.device,
        reporter: Reporter,
    ) -> None:
        self.cfg, self.data, self.run_dir, self.spec = cfg, data, run_dir, spec
        self.ctx, self.device, self.reporter = ctx, device, reporter
        self.model, self.objective = spec.model, spec.objective
        self.amp_dtype = autocast_dtype(cfg, device, getattr(getattr(self.model, "config", None), "d_model", None))
        self.counters = _Counters()
        self.last_val: dict[str, float] = {}
        self.last_saved_step = -1
        self.losses: list[float] = []
        self.metrics_file: Any = None  # open while the loop runs, on rank 0
        has_val = spec.val_nats is not None or len(data.val) > 1
        bytes_per_token = data.bytes_per_token("val") if has_val else None
        self.bytes_per_token = bytes_per_token if bytes_per_token and math.isfinite(bytes_per_token) else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # --- setup -----------------------------------------------------------------------------------------

    def setup(self, resume_from: Path | None) -> None:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model = self.model.to(device)
        model.train()
        self.objective.attach(model, device)
        _freeze_untrainable(model, self.objective)
        saved_state: dict[str, Any] | None = None
        if cfg.untie_head_at is not None and (ctx.distributed or not model.config.tie_embeddings):  # type: ignore[attr-defined]
            raise UserError(
                "untie_head_at unties a tied head during a one-process run; "
                + ("this run has several processes" if ctx.distributed else "this model's head is untied already")
                + " (set tie_embeddings: false to train an untied head from the start)"
            )
        if resume_from is not None:
            check_resume_data(resume_from, self.data, self.data.path)
            if cfg.untie_head_at is not None and model.config.tie_embeddings:  # type: ignore[attr-defined]
                from slmkit.interop.hf import load_config

                if not load_config(resume_from / "config.json").tie_embeddings:  # saved after the untying: untie again
                    self._untie_head()
            # full weights go into the plain model before it is wrapped (fsdp then shards what is loaded)
            if self.spec.checkpoint_format is not None:
                self.spec.checkpoint_format.load(resume_from, model)
                saved_state = load_trainer_state(resume_from / STATE_PT, device)
            else:
                saved_state = load_checkpoint(resume_from, model, device)
            self.cfg, note = _keep_global_batch(cfg, saved_state.get("world_size", 1), ctx.world_size)
            cfg = self.cfg
            if note:
                self.reporter.message(note)
        self.wrapped = distributed.wrap_model(model, ctx, device, self.amp_dtype)  # `model` keeps the plain names
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        # after wrapping: fsdp swaps in sharded parameters; frozen ones have no gradient to clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, cfg, device)
        if self.spec.sampler is not None:
            self.sampler = self.spec.sampler(cfg, ctx.rank, ctx.world_size)
        else:
            self.sampler = WindowSampler(
                self.data.train, cfg.seq_len, cfg.seed, rank=ctx.rank, world_size=ctx.world_size
            )
        # before the RNG is seeded or restored: the probe draws random matrices
        self.peak, self.peak_source = peak_flops(device, self.amp_dtype or torch.float32)
        self.peak *= ctx.world_size
        if saved_state is not None:
            assert resume_from is not None
            self._restore(resume_from, saved_state)
        else:
            if ctx.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "metrics.jsonl").write_text("")
            torch.manual_seed(cfg.seed)
        if ctx.is_main:
            record = self.spec.config_record(cfg)
            (self.run_dir / self.spec.config_file).write_text(json.dumps(record, indent=2) + "\n")
        if ctx.distributed:
            self.reporter.message(f"{ctx.strategy} on {ctx.world_size} processes ({ctx.backend})")

    def _restore(self, resume_from: Path, state: dict[str, Any]) -> None:
        distributed.load_named_optimizer_state(
            self.model, self.optimizer, state["optimizer"], str(resume_from / STATE_PT)
        )
        self.sampler.position = state["sampler_position"]
        set_rng_state(state["rng"], self.device)
        c = self.counters
        c.step, c.tokens = state["step"], state["tokens"]
        # distillation checkpoints from before the shared loop counted no FLOPs
        c.flops, c.elapsed = state.get("flops", 0.0), state["elapsed"]
        self.last_saved_step = c.step
        if self.ctx.is_main:
            truncate_metrics(self.run_dir / "metrics.jsonl", c.step)
        self.reporter.message(f"resuming from {resume_from} (step {c.step})")

    # --- the loop --------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg, ctx, c = self.cfg, self.ctx, self.counters
        model_cfg = self.model.config  # type: ignore[attr-defined]
        # the global batch: micro-batch x grad-accum x world size; budgets and the schedule count it
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * ctx.world_size
        self.flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
        self.budget = Budget(cfg.max_steps, cfg.max_tokens, cfg.max_flops, cfg.max_minutes)
        self.reporter.start(self._start_info())
        if ctx.is_main:
            self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed below
        stop_reason: str | None = self.budget.done(c.step, c.tokens, c.flops, c.elapsed)
        self.wrapped.train()
        interrupt = _DeferredInterrupt()
        interrupted_anywhere = False
        try:
            while stop_reason is None:
                if interrupted_anywhere or (not ctx.distributed and interrupt.requested):
                    raise KeyboardInterrupt
                record, interrupted_anywhere = self._step(interrupt)
                stop_reason = self.budget.done(c.step, c.tokens, c.flops, c.elapsed)
                self._after_step(record, stop_reason)
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            self.reporter.message(f"interrupted at step {c.step}; saving a checkpoint")
        finally:
            interrupt.restore()
            if self.metrics_file is not None:
                self.metrics_file.close()
                self.metrics_file = None
        return self._finish(stop_reason)

    def _start_info(self) -> dict[str, Any]:
        model_cfg, c = self.model.config, self.counters  # type: ignore[attr-defined]
        return {
            **model_cfg.param_counts(),
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "device": str(self.device),
            "dtype": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops_per_token,
            "planned_steps": self.budget.planned_steps(
                self.tokens_per_step, self.tokens_per_step * self.flops_per_token
            ),
            "step": c.step,
            "budget": {k: v for k, v in vars(self.budget).items() if v is not None},
            "strategy": self.ctx.strategy,
            "world_size": self.ctx.world_size,
            "objective": self.spec.kind,
            "optimizer": resolve_optimizer(self.model, self.cfg),
            "peak_flops": self.peak,
            "mfu_peak": self.peak_source,  # what MFU divides by (per device)
        }

    def _step(self, interrupt: _DeferredInterrupt) -> tuple[dict[str, Any], bool]:
        """One optimizer step over grad_accum micro-batches; returns its metrics record and whether any
        rank was interrupted (Ctrl-C)."""
        cfg, ctx, c = self.cfg, self.ctx, self.counters
        t0 = time.perf_counter()
        progress = self.budget.progress(c.step, c.tokens, c.flops, c.elapsed)
        if cfg.untie_head_at is not None and progress >= cfg.untie_head_at and self.model.config.tie_embeddings:  # type: ignore[attr-defined]
            self._untie_head()
            add_head_group(self.optimizer, self.model.lm_head.weight, cfg.embed_lr_scale)  # type: ignore[union-attr,arg-type]
            self.params.append(self.model.lm_head.weight)  # type: ignore[union-attr,arg-type]
            self.reporter.message(f"step {c.step}: the output head is untied from the embedding (untie_head_at)")
        lr = lr_at(cfg, c.step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group may keep its own ratio to the schedule
        length = seq_len_at(cfg, c.step)  # sequence-length warm-up: the windows' first `length` tokens
        rows = rows_at(cfg, c.step)  # batch-size warm-up: the batch's first `rows` windows
        tokens_this_step = self.tokens_per_step * length * rows // (cfg.seq_len * cfg.batch_size)
        loss_sum: torch.Tensor | float = 0.0
        metric_sums: dict[str, torch.Tensor] | None = None  # only objectives that report metrics pay for them
        for micro_step in range(cfg.grad_accum):
            batch = self.sampler.next_batch(cfg.batch_size)
            x, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
            if length < x.shape[1] or rows < x.shape[0]:
                x, y = x[:rows, :length], y[:rows, :length]
            forward = self.forward
            if len(batch) > 2 and batch[2]:  # packed samples: their segments and positions
                extra = {k: v.to(self.device) for k, v in batch[2].items()}
                extra = {k: v[:rows, :length] if v.dim() == 2 else v for k, v in extra.items()}  # (B, T) follow x
                forward = functools.partial(forward, **extra)
            with distributed.sync_gradients(self.wrapped, ctx, last_micro_step=micro_step == cfg.grad_accum - 1):
                with self.autocast():
                    loss, metrics = self.objective.loss(forward, x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            if metrics:
                metric_sums = _accumulate(metric_sums, metrics)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # one sync per step, for the log; distributed: mean over ranks, slowest rank's time, any Ctrl-C
        n = cfg.grad_accum
        names = tuple(metric_sums) if metric_sums else ()
        values = (loss_sum / n, *(metric_sums[k] / n for k in names)) if metric_sums else (loss_sum / n,)
        means, dt, interrupted = distributed.step_stats(ctx, values, time.perf_counter() - t0, interrupt.requested)
        train_loss = means[0]
        if not math.isfinite(train_loss):
            raise UserError(
                f"{self.spec.kind} diverged at step {c.step + 1} (loss {train_loss}); lower --lr "
                f"(now {cfg.lr}) or raise --warmup-steps; the last checkpoint is intact"
            )
        c.step += 1
        c.tokens += tokens_this_step
        c.flops += tokens_this_step * self.flops_per_token
        c.elapsed += dt
        self.losses.append(train_loss)
        record = {
            "step": c.step,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": distributed.grad_norm_value(grad_norm),
            "tokens": c.tokens,
            "flops": c.flops,
            "elapsed": c.elapsed,
            "tokens_per_second": tokens_this_step / dt,
            "mfu": tokens_this_step * self.flops_per_token / dt / self.peak,
            "epoch": self.sampler.epoch,
            "progress": self.budget.progress(c.step, c.tokens, c.flops, c.elapsed),
        }
        if names:  # the objective's metrics (lm_loss, aux_loss, distill_kl, ...)
            record.update(zip(names, means[1:], strict=True))
        sampler_metrics = getattr(self.sampler, "log_metrics", None)  # e.g. a mixture's realised domain shares
        if sampler_metrics is not None:
            record.update(sampler_metrics())
        return record, interrupted

    def _untie_head(self) -> None:
        """Late untying: the output head becomes its own copy of the embedding (from then on both train apart),
        and the model's config says so, so checkpoints and the final model are saved untied."""
        model = self.model
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.detach().clone())  # type: ignore[union-attr]
        model.config = model.config.replace(tie_embeddings=False)  # type: ignore[union-attr,operator]

    def _after_step(self, record: dict[str, Any], stop_reason: str | None) -> None:
        cfg, step = self.cfg, self.counters.step
        if step % cfg.log_interval == 0 or stop_reason:
            self._write_metrics(record)
        self.reporter.step(record)
        if step % cfg.eval_interval == 0 or stop_reason:
            self.last_val = self._evaluate()
            if self.last_val:
                self._write_metrics({"step": step, **self.last_val})
                self.reporter.eval({"step": step, **self.last_val})
        if step % cfg.save_interval == 0 and not stop_reason:
            self._checkpoint()

    def _finish(self, stop_reason: str) -> TrainResult:
        c = self.counters
        final_dir = None
        if stop_reason == "interrupted":
            if c.step > self.last_saved_step and c.step > 0:
                self._checkpoint()
        else:
            final_dir = self._checkpoint(final=True)
        result = TrainResult(
            run_dir=self.run_dir,
            final_dir=final_dir,
            step=c.step,
            tokens=c.tokens,
            flops=c.flops,
            seconds=c.elapsed,
            stop_reason=stop_reason,
            train_loss=self.losses[-1] if self.losses else None,
            val_loss=self.last_val.get("val_loss"),
            val_bits_per_byte=self.last_val.get("val_bits_per_byte"),
            losses=self.losses,
            val=self.last_val,
        )
        self.reporter.end(result)
        return result

    # --- evaluation, metrics, checkpoints --------------------------------------------------------------

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def _val_loss(self, model: torch.nn.Module) -> float:
        cfg = self.cfg
        windows = cfg.eval_batches * cfg.batch_size
        autocast = self.autocast if self.amp_dtype else None
        if self.spec.val_nats is not None:
            nats, count = self.spec.val_nats(model, cfg, autocast)
            return nats / count
        nats, count = token_nats(model, self.data.val, cfg.seq_len, cfg.batch_size, windows, autocast=autocast)
        return nats / count

    def _evaluate(self) -> dict[str, float]:
        # every rank scores the same windows (fsdp needs all ranks in each forward); the results agree
        if self.bytes_per_token is None:
            return {}
        val_loss = self._val_loss(self.model)
        more = (
            self.spec.more_val(self.model, self.cfg, self.autocast if self.amp_dtype else None)
            if (self.spec.more_val)
            else {}
        )
        return {
            "val_loss": val_loss,
            "val_bits_per_byte": val_loss / math.log(2) / self.bytes_per_token,
            **self.objective.eval_metrics(self._val_loss),
            **more,
        }

    def _checkpoint(self, final: bool = False) -> Path:
        ctx, c, model = self.ctx, self.counters, self.model
        target = self.run_dir / "final" if final else self.run_dir / "checkpoints" / f"step-{c.step}"
        # gathering is a collective under fsdp (every rank takes part); only rank 0 writes
        weights = distributed.full_model_state(model) if ctx.distributed else model.state_dict()
        optimizer_state = distributed.named_optimizer_state(model, self.optimizer)
        if ctx.is_main:
            trainer_state = {
                "optimizer": optimizer_state,
                "sampler_position": self.sampler.position,
                "rng": rng_state(self.device),
                "world_size": ctx.world_size,
                **c.as_dict(),
            }
            summary = {
                **c.as_dict(),
                "val": self.last_val,
                "train_config": self.cfg.to_dict(),
                "data_dir": str(self.data.path),
                "data": data_identity(self.data),
                "world_size": ctx.world_size,
                "run": self.spec.kind,
            }
            write_state = trainer_state_writer(trainer_state, summary)
            add_files = self.spec.add_files

            def extra(tmp: Path) -> None:
                if add_files is not None:
                    add_files(tmp)
                write_state(tmp)

            if self.spec.checkpoint_format is not None:
                self.spec.checkpoint_format.save(model, target, self.spec.tokenizer_dir, extra)
            else:
                gathered = _GatheredModel(model.config, weights)  # type: ignore[attr-defined]
                save_model(gathered, target, tokenizer_dir=self.spec.tokenizer_dir, extra=extra)
            if not final:
                prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        distributed.barrier(ctx)  # when this returns, the directory exists for every rank
        self.last_saved_step = c.step
        return target


def _freeze_untrainable(model: torch.nn.Module, objective: Objective) -> None:
    """Parameters the objective does not train get requires_grad False: no gradient, not in the optimizer."""
    any_trainable = False
    for name, param in model.named_parameters():
        keep = bool(objective.trainable(name, param))
        param.requires_grad_(keep)
        any_trainable |= keep
    if not any_trainable:
        raise UserError("the trainable-parameter selection leaves nothing to train; widen `trainable`")


def _accumulate(sums: dict[str, torch.Tensor] | None, metrics: Metrics) -> dict[str, torch.Tensor]:
    if sums is None:
        return dict(metrics)
    for name, value in metrics.items():
        sums[name] = sums[name] + value
    return sums


def _keep_global_batch(cfg: TrainConfig, saved_world: int, world: int) -> tuple[TrainConfig, str | None]:
    """A run resumed on another number of processes keeps its global batch (micro-batch x grad-accum x
    world size): the sequences each process takes per step are split into micro-batches of at most the
    old size, so the data order, the schedule and the losses stay those of the original run."""
    if saved_world == world:
        return cfg, None
    global_batch = cfg.batch_size * cfg.grad_accum * saved_world
    if global_batch % world:
        raise UserError(
            f"the run's global batch of {global_batch} sequences ({cfg.batch_size} x {cfg.grad_accum} grad-accum x "
            f"{saved_world} processes) does not split over {world} processes; resume it on a number of processes "
            f"that divides {global_batch}"
        )
    per_process = global_batch // world
    batch_size = max(b for b in range(1, min(cfg.batch_size, per_process) + 1) if per_process % b == 0)
    grad_accum = per_process // batch_size
    note = (
        f"{saved_world} -> {world} processes: batch size {cfg.batch_size} -> {batch_size}, grad-accum "
        f"{cfg.grad_accum} -> {grad_accum}, keeping the global batch of {global_batch} sequences"
    )
    return dataclasses.replace(cfg, batch_size=batch_size, grad_accum=grad_accum), note


class _GatheredModel:
    """What `save_model` reads of a module (its config and state dict), for a state gathered from shards."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


class _DeferredInterrupt:
    """The first Ctrl-C ends the run after the current step (then a checkpoint is saved); a second one
    interrupts at once. Outside the main thread signals cannot be caught and nothing changes."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
