"""Knowledge distillation: train a student on a teacher's softened next-token distribution.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(labels)

(Hinton et al. 2015; the T^2 keeps the KL gradient's scale independent of T.) The student is a model
dir (e.g. the output of `slm compress --method prune-structured`, to recover its quality) or a preset
name (to train a small model from a larger one). The loop reuses the trainer's parts: `TrainConfig`
(optimiser, schedule, budgets), `make_optimizer` / `lr_at`, `WindowSampler` (deterministic, resumable
batches), `Budget` and `save_model` (atomic checkpoints), and writes the same run layout:
`checkpoints/step-N/`, `final/`, `metrics.jsonl`, plus `distill_config.json`. A checkpoint holds the
optimizer state and the sampler position, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "distill_config.json"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"


@dataclass
class DistillResult:
    run_dir: Path
    final_dir: Path | None
    step: int
    tokens: int
    seconds: float
    stop_reason: str
    val_loss: float | None = None
    teacher_val_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # per step, this invocation only


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, averaged over tokens."""
    v = student_logits.size(-1)
    s = student_logits.float().reshape(-1, v)
    t = teacher_logits.float().reshape(-1, v)
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        kl = F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(s, targets.reshape(-1))
    return loss


def _check_options(temperature: float, alpha: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UserError(f"--temperature must be a positive number, got {temperature}")
    if not (0 <= alpha <= 1):
        raise UserError(f"--alpha (weight of the distillation term) must be in [0, 1], got {alpha}")


def _latest_state(run_dir: Path) -> Path:
    from slmkit.interop.checkpoint import checkpoint_step, latest_checkpoint

    found = (latest_checkpoint(run_dir), run_dir / "final")
    candidates = [p for p in found if p is not None and (p / STATE_PT).is_file()]
    if not (run_dir / CONFIG_FILE).is_file() or not candidates:
        raise UserError(f"{run_dir}: no distillation checkpoint to resume; start the run without --resume")
    return max(candidates, key=checkpoint_step)


def _build_student(student: str, cfg: TrainConfig, vocab_size: int, eot: int) -> torch.nn.Module:
    from slmkit.config import PRESETS
    from slmkit.interop.checkpoint import load_model
    from slmkit.models import build_model

    path = Path(student)
    if path.exists():
        model = load_model(path)
        if getattr(model, "compression", None) is not None:
            raise UserError(
                f"{student}: the student is quantized or factored; distil into a float model (e.g. a pruned one)"
            )
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if student not in PRESETS:
        raise UserError(f"--student {student!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    config = dataclasses.replace(cfg, preset=student).model_config(vocab_size=vocab_size)
    config = config.replace(bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(cfg.seed)
    model = build_model(config)
    model.init_weights(seed=cfg.seed)
    return model


def distill(
    teacher: str | Path,
    student: str | Path,
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    resume: bool = False,
    budget_overrides: dict[str, Any] | None = None,
) -> DistillResult:
    """Distil `teacher` into `student` (model dir or preset) on `data_dir`, writing a run to `run_dir`."""
    from slmkit.data.shards import load_data_dir
    from slmkit.data.tokenizer import file_sha256
    from slmkit.eval.perplexity import token_nats
    from slmkit.interop.checkpoint import latest_checkpoint, load_model, resolve_model_dir, save_model
    from slmkit.train.batches import WindowSampler
    from slmkit.train.budget import Budget
    from slmkit.train.loop import resolve_device, truncate_metrics
    from slmkit.train.optim import lr_at, make_optimizer

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    if resume:
        resume_from = _latest_state(run_dir)
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        teacher, student = saved["teacher"], str(resume_from)
        temperature, alpha = saved["temperature"], saved["alpha"]
        cfg = TrainConfig.from_dict({**saved["train"], **(budget_overrides or {})}, source=str(run_dir / CONFIG_FILE))
    else:
        if run_dir.exists() and (latest_checkpoint(run_dir) or (run_dir / "final").exists()):
            raise UserError(f"{run_dir}: run directory already has checkpoints; pass --resume, or choose a new --out")
        cfg = cfg or TrainConfig()
    _check_options(temperature, alpha)
    if not cfg.has_budget:
        raise UserError("no distillation budget: give --max-steps, --max-tokens or --max-minutes")

    data = load_data_dir(data_dir)
    teacher_dir = resolve_model_dir(teacher)
    teacher_tok = teacher_dir / "tokenizer.json"
    if not teacher_tok.is_file() or file_sha256(teacher_tok) != data.meta.get("tokenizer_sha256"):
        raise UserError(f"{data_dir} was not tokenized with {teacher_dir}'s tokenizer; prepare it with --tokenizer")
    if len(data.train) < cfg.seq_len + 1:
        raise UserError(f"{data_dir}: train split has {len(data.train)} tokens, fewer than one window of {cfg.seq_len}")
    device = resolve_device(cfg.device)
    teacher_model = load_model(teacher_dir, device=device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    model = _build_student(str(student), cfg, teacher_model.config.vocab_size, data.eot_token_id).to(device)
    if model.config.vocab_size != teacher_model.config.vocab_size:
        raise UserError(
            f"student vocabulary ({model.config.vocab_size}) differs from the teacher's "
            f"({teacher_model.config.vocab_size}); both must use the teacher's tokenizer"
        )
    if cfg.seq_len > min(model.config.max_seq_len, teacher_model.config.max_seq_len):
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the context of the teacher or the student")

    optimizer = make_optimizer(model, cfg, device)
    sampler = WindowSampler(data.train, cfg.seq_len, cfg.seed)
    step, tokens, elapsed = 0, 0, 0.0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_PT, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        sampler.position = state["sampler_position"]
        torch.set_rng_state(state["rng"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        truncate_metrics(run_dir / "metrics.jsonl", step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("")
        saved = {
            "teacher": str(teacher_dir),
            "student": str(student),
            "temperature": temperature,
            "alpha": alpha,
            "train": cfg.to_dict(),
        }
        (run_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    if resume_from is not None and budget_overrides:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        saved["train"] = cfg.to_dict()
        (run_dir / CONFIG_FILE).write_text(json.dumps(saved, indent=2) + "\n")

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    budget = Budget(cfg.max_steps, cfg.max_tokens, None, cfg.max_minutes)
    losses: list[float] = []

    def checkpoint(final: bool = False) -> Path:
        target = run_dir / "final" if final else run_dir / "checkpoints" / f"step-{step}"
        counters = {"step": step, "tokens": tokens, "elapsed": elapsed}

        def add_state(tmp: Path) -> None:
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "sampler_position": sampler.position,
                    "rng": torch.get_rng_state(),
                    **counters,
                },
                tmp / STATE_PT,
            )
            (tmp / STATE_JSON).write_text(json.dumps({**counters, "distill": True}, indent=2) + "\n")

        save_model(model, target, tokenizer_dir=teacher_dir, extra=add_state)
        if not final:
            old = sorted(
                (int(p.name.split("-")[1]), p)
                for p in (run_dir / "checkpoints").iterdir()
                if p.name.startswith("step-") and p.name.split("-")[1].isdigit()
            )
            for _, path in old[: -cfg.keep_checkpoints]:
                shutil.rmtree(path, ignore_errors=True)
        return target

    stop_reason = budget.done(step, tokens, 0.0, elapsed)
    model.train()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        try:
            while stop_reason is None:
                t0 = time.perf_counter()
                lr = lr_at(cfg, step, budget.progress(step, tokens, 0.0, elapsed))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                total = 0.0
                for _ in range(cfg.grad_accum):
                    x, y = sampler.next_batch(cfg.batch_size)
                    x, y = x.to(device), y.to(device)
                    with torch.no_grad():
                        teacher_logits = teacher_model(x)
                    loss = distill_loss(model(x), teacher_logits, y, temperature, alpha)
                    (loss / cfg.grad_accum).backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = total / cfg.grad_accum
                if not math.isfinite(loss_value):
                    raise UserError(f"distillation diverged at step {step + 1}; lower --lr (now {cfg.lr})")
                step += 1
                tokens += tokens_per_step
                elapsed += time.perf_counter() - t0
                losses.append(loss_value)
                metrics.write(json.dumps({"step": step, "loss": loss_value, "lr": lr, "tokens": tokens}) + "\n")
                metrics.flush()
                if step % 10 == 0:
                    log.info("step %d distill loss %.4f", step, loss_value)
                stop_reason = budget.done(step, tokens, 0.0, elapsed)
                if step % cfg.save_interval == 0 and not stop_reason:
                    checkpoint()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            checkpoint()

    final_dir = None
    val_loss = teacher_val = None
    if stop_reason != "interrupted":
        if len(data.val) > 1:
            windows = cfg.eval_batches * cfg.batch_size
            nats, count = token_nats(model, data.val, cfg.seq_len, cfg.batch_size, windows)
            val_loss = nats / count
            nats, count = token_nats(teacher_model, data.val, cfg.seq_len, cfg.batch_size, windows)
            teacher_val = nats / count
            with open(run_dir / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps({"step": step, "val_loss": val_loss, "teacher_val_loss": teacher_val}) + "\n")
        final_dir = checkpoint(final=True)
    return DistillResult(
        run_dir=run_dir,
        final_dir=final_dir,
        step=step,
        tokens=tokens,
        seconds=elapsed,
        stop_reason=stop_reason,
        val_loss=val_loss,
        teacher_val_loss=teacher_val,
        losses=losses,
    )
