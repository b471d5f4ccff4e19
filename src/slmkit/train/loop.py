"""The training loop: budgets, evaluation, metrics, atomic checkpoints and exact resume.

`train(cfg, data_dir, run_dir)` is the one public entry point; the CLI, the quickstart and later the
ladder call it. It reports through a `Reporter` (the CLI draws a progress line; the default logs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from slmkit.errors import UserError
from slmkit.interop.checkpoint import WEIGHTS, checkpoint_step, latest_checkpoint, save_model
from slmkit.train import distributed
from slmkit.train.batches import WindowSampler
from slmkit.train.budget import Budget
from slmkit.train.config import TrainConfig
from slmkit.train.optim import lr_at, make_optimizer

log = logging.getLogger(__name__)

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


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
        log.info("training %s parameters on %s (%s)", f"{info['params']:,}", info["device"], info["dtype"])

    def step(self, m: dict[str, Any]) -> None:
        if m["step"] % self.every == 0:
            log.info("step %d loss %.4f lr %.2e %.0f tok/s", m["step"], m["loss"], m["lr"], m["tokens_per_second"])

    def eval(self, m: dict[str, Any]) -> None:
        log.info("step %d val_loss %.4f val_bpb %.4f", m["step"], m["val_loss"], m["val_bits_per_byte"])

    def message(self, text: str) -> None:
        log.info(text)

    def end(self, result: TrainResult) -> None:
        log.info("done: %s after %d steps", result.stop_reason, result.step)


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


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (CUDA with bf16); fp32 on CPU unless asked."""
    if cfg.dtype == "float32":
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    # the checkpoint is loaded with map_location=device, which moves these to the GPU; RNG states are CPU bytes
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    budget_overrides: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a model on a prepared data dir into run_dir; see the module docstring.

    Under torchrun every rank calls this; `cfg.strategy` picks one process, DDP or FSDP (see
    `slmkit.train.distributed`), and only rank 0 reports, writes metrics and checkpoints.
    """
    from slmkit.data.shards import load_data_dir

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    if resume:
        resume_from = _latest_resumable(run_dir)
        saved = json.loads((run_dir / "train_config.json").read_text())
        cfg = TrainConfig.from_dict({**saved, **(budget_overrides or {})}, source=str(run_dir / "train_config.json"))
    elif run_dir.exists() and (latest_checkpoint(run_dir) or (run_dir / "final" / WEIGHTS).exists()):
        raise UserError(
            f"{run_dir}: run directory already has checkpoints; pass --resume to continue it, or choose a new --out"
        )
    if not cfg.has_budget:
        raise UserError("no training budget: give --max-steps, --max-tokens, --max-minutes or --max-flops")
    strategy = distributed.resolve_strategy(cfg.strategy)

    data = load_data_dir(data_dir)
    if len(data.train) < cfg.seq_len + 1:
        raise UserError(
            f"{data_dir}: train split has {len(data.train)} tokens, fewer than one sequence of "
            f"{cfg.seq_len + 1}; use more data or a smaller --seq-len"
        )
    device = resolve_device(cfg.device)
    ctx, device = distributed.start(strategy, device, cfg.dist_timeout_seconds)
    try:
        with distributed.quiet_unless_main(ctx):
            return _run(cfg, data, run_dir, resume_from, reporter if ctx.is_main else _SilentReporter(), ctx, device)
    except Exception as exc:
        if ctx.distributed and distributed.is_collective_failure(exc):
            latest = latest_checkpoint(run_dir)
            kept = (
                f"the last checkpoint, {latest}, is intact; continue with --resume" if latest else "no checkpoint yet"
            )
            text = str(exc).strip()
            # the backend's first sentence names what happened ("Connection reset by peer", "Timed out ...")
            first_line = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
            raise distributed.RankFailure(
                f"rank {ctx.rank} of {ctx.world_size}: another rank failed or stopped answering within "
                f"{ctx.timeout_seconds:g} s ({first_line}); every rank stops, see the other ranks' output; {kept}"
            ) from None
        raise
    finally:
        distributed.stop(ctx)


class _SilentReporter:
    """Ranks other than 0 report nothing."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, metrics: dict[str, Any]) -> None: ...
    def eval(self, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def end(self, result: TrainResult) -> None: ...


def _run(
    cfg: TrainConfig,
    data: Any,
    run_dir: Path,
    resume_from: Path | None,
    reporter: Reporter | None,
    ctx: distributed.DistContext,
    device: torch.device,
) -> TrainResult:
    from slmkit.eval.perplexity import token_nats
    from slmkit.models import build_model

    reporter = reporter or LogReporter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp_dtype = autocast_dtype(cfg, device)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    model_cfg = cfg.model_config(vocab_size=data.vocab_size)
    model_cfg = model_cfg.replace(bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    model.init_weights(seed=cfg.seed)
    model.to(device)
    saved_state: dict[str, Any] | None = None
    if resume_from is not None:
        # full weights go into the plain model before it is wrapped (fsdp then shards what is loaded)
        saved_state = _load_checkpoint(resume_from, model, device)
        cfg, note = _keep_global_batch(cfg, saved_state.get("world_size", 1), ctx.world_size)
        if note:
            reporter.message(note)
    wrapped = distributed.wrap_model(model, ctx, device, amp_dtype)  # `model` keeps the plain names
    optimizer = make_optimizer(model, cfg, device)
    sampler = WindowSampler(data.train, cfg.seq_len, cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    step, tokens, flops, elapsed = 0, 0, 0.0, 0.0

    if saved_state is not None:
        assert resume_from is not None
        distributed.load_named_optimizer_state(model, optimizer, saved_state["optimizer"], str(resume_from / STATE_PT))
        sampler.position = saved_state["sampler_position"]
        _set_rng_state(saved_state["rng"], device)
        step, tokens = saved_state["step"], saved_state["tokens"]
        flops, elapsed = saved_state["flops"], saved_state["elapsed"]
        if ctx.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
        reporter.message(f"resuming from {resume_from} (step {step})")
    else:
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("")
        torch.manual_seed(cfg.seed)
    if ctx.is_main:
        cfg.save(run_dir / "train_config.json")
    if ctx.distributed:
        reporter.message(f"{ctx.strategy} on {ctx.world_size} processes ({ctx.backend})")

    # the global batch: micro-batch x grad-accum x world size; budgets and the schedule count it
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * ctx.world_size
    flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
    budget = Budget(cfg.max_steps, cfg.max_tokens, cfg.max_flops, cfg.max_minutes)
    peak = measure_peak_flops(device, amp_dtype or torch.float32) * ctx.world_size
    bytes_per_token = data.bytes_per_token("val") if len(data.val) > 1 else None
    reporter.start(
        {
            "params": model_cfg.num_params(),
            "non_embedding_params": model_cfg.num_params(False),
            "device": str(device),
            "dtype": str(amp_dtype or torch.float32).removeprefix("torch."),
            "tokens_per_step": tokens_per_step,
            "flops_per_token": flops_per_token,
            "planned_steps": budget.planned_steps(tokens_per_step, tokens_per_step * flops_per_token),
            "step": step,
            "budget": {k: v for k, v in vars(budget).items() if v is not None},
            "strategy": ctx.strategy,
            "world_size": ctx.world_size,
        }
    )

    forward = torch.compile(wrapped) if cfg.compile else wrapped
    metrics_file = open(run_dir / "metrics.jsonl", "a") if ctx.is_main else None  # noqa: SIM115 - closed in finally
    result_losses: list[float] = []
    last_val: dict[str, float] = {}
    stop_reason: str | None = budget.done(step, tokens, flops, elapsed)
    last_saved_step = step if resume_from is not None else -1

    def write_metrics(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def run_eval() -> dict[str, float]:
        # every rank scores the same windows (fsdp needs all ranks in each forward); the results agree
        if bytes_per_token is None:
            return {}
        nats, count = token_nats(
            model,
            data.val,
            cfg.seq_len,
            cfg.batch_size,
            cfg.eval_batches * cfg.batch_size,
            autocast=autocast if amp_dtype else None,
        )
        val_loss = nats / count
        return {"val_loss": val_loss, "val_bits_per_byte": val_loss / math.log(2) / bytes_per_token}

    def checkpoint(final: bool = False) -> Path:
        nonlocal last_saved_step
        target = run_dir / "final" if final else run_dir / "checkpoints" / f"step-{step}"
        state = {"step": step, "tokens": tokens, "flops": flops, "elapsed": elapsed}
        # gathering is a collective under fsdp (every rank takes part); only rank 0 writes
        weights = distributed.full_model_state(model) if ctx.distributed else model.state_dict()
        optimizer_state = distributed.named_optimizer_state(model, optimizer)

        def add_state(tmp: Path) -> None:
            torch.save(
                {
                    "optimizer": optimizer_state,
                    "sampler_position": sampler.position,
                    "rng": _rng_state(device),
                    "world_size": ctx.world_size,
                    **state,
                },
                tmp / STATE_PT,
            )
            (tmp / STATE_JSON).write_text(
                json.dumps(
                    {
                        **state,
                        "val": last_val,
                        "train_config": cfg.to_dict(),
                        "data_dir": str(data.path),
                        "world_size": ctx.world_size,
                    },
                    indent=2,
                )
                + "\n"
            )

        if ctx.is_main:
            save_model(_GatheredModel(model_cfg, weights), target, tokenizer_dir=data.path, extra=add_state)
            if not final:
                _prune_checkpoints(run_dir, cfg.keep_checkpoints)
        distributed.barrier(ctx)  # when checkpoint() returns, the directory exists for every rank
        last_saved_step = step
        return target

    wrapped.train()
    interrupt = _DeferredInterrupt()
    interrupted_anywhere = False
    try:
        while stop_reason is None:
            if interrupted_anywhere or (not ctx.distributed and interrupt.requested):
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            progress = budget.progress(step, tokens, flops, elapsed)
            lr = lr_at(cfg, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro_step in range(cfg.grad_accum):
                x, y = sampler.next_batch(cfg.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with distributed.sync_gradients(wrapped, ctx, last_micro_step=micro_step == cfg.grad_accum - 1):
                    with autocast():
                        logits = forward(x)
                        loss = torch.nn.functional.cross_entropy(
                            logits.float().view(-1, logits.size(-1)), y.reshape(-1)
                        )
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one sync per step, for the log; distributed: mean over ranks, slowest rank's time, any Ctrl-C
            train_loss, dt, interrupted_anywhere = distributed.step_stats(
                ctx, loss_sum / cfg.grad_accum, time.perf_counter() - t0, interrupt.requested
            )
            if not math.isfinite(train_loss):
                raise UserError(
                    f"training diverged at step {step + 1} (loss {train_loss}); lower --lr "
                    f"(now {cfg.lr}) or raise --warmup-steps; the last checkpoint is intact"
                )
            step += 1
            tokens += tokens_per_step
            flops += tokens_per_step * flops_per_token
            elapsed += dt
            result_losses.append(train_loss)
            record = {
                "step": step,
                "loss": train_loss,
                "lr": lr,
                "grad_norm": distributed.grad_norm_value(grad_norm),
                "tokens": tokens,
                "flops": flops,
                "elapsed": elapsed,
                "tokens_per_second": tokens_per_step / dt,
                "mfu": tokens_per_step * flops_per_token / dt / peak,
                "epoch": sampler.epoch,
                "progress": budget.progress(step, tokens, flops, elapsed),
            }
            stop_reason = budget.done(step, tokens, flops, elapsed)
            if step % cfg.log_interval == 0 or stop_reason:
                write_metrics(record)
            reporter.step(record)
            if step % cfg.eval_interval == 0 or stop_reason:
                last_val = run_eval()
                if last_val:
                    write_metrics({"step": step, **last_val})
                    reporter.eval({"step": step, **last_val})
            if step % cfg.save_interval == 0 and not stop_reason:
                checkpoint()
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        reporter.message(f"interrupted at step {step}; saving a checkpoint")
    finally:
        interrupt.restore()
        if metrics_file is not None:
            metrics_file.close()

    final_dir = None
    if stop_reason == "interrupted":
        if step > last_saved_step and step > 0:
            checkpoint()
    else:
        final_dir = checkpoint(final=True)
    result = TrainResult(
        run_dir=run_dir,
        final_dir=final_dir,
        step=step,
        tokens=tokens,
        flops=flops,
        seconds=elapsed,
        stop_reason=stop_reason,
        train_loss=result_losses[-1] if result_losses else None,
        val_loss=last_val.get("val_loss"),
        val_bits_per_byte=last_val.get("val_bits_per_byte"),
        losses=result_losses,
    )
    reporter.end(result)
    return result


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


def _latest_resumable(run_dir: Path) -> Path:
    if not (run_dir / "train_config.json").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no train_config.json); start a run without --resume")
    candidates = [
        p for p in (latest_checkpoint(run_dir), run_dir / "final") if p is not None and (p / STATE_PT).is_file()
    ]
    if not candidates:
        raise UserError(f"{run_dir}: run directory has no checkpoint to resume from; start it again without --resume")
    return max(candidates, key=checkpoint_step)


def _load_checkpoint(directory: Path, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint's full weights into the (unwrapped) model; return its trainer state."""
    from slmkit.interop.checkpoint import from_hf_state_dict, load_state_file

    weights = from_hf_state_dict(load_state_file(directory / WEIGHTS))
    if model.config.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight".removeprefix("model.")]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{directory}: checkpoint does not match this run's model ({exc})") from None
    try:
        return torch.load(directory / STATE_PT, map_location=device, weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{directory / STATE_PT}: unreadable trainer state ({exc})") from None


def _prune_checkpoints(run_dir: Path, keep: int) -> None:
    root = run_dir / "checkpoints"
    steps = sorted(
        (int(p.name.split("-")[1]), p)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name.split("-")[1].isdigit()
    )
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
