"""Knowledge distillation: train a student on a teacher's softened next-token distribution.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(labels)

(Hinton et al. 2015; the loss is `slmkit.train.losses.distill_terms`.) The student is a model dir (e.g.
the output of `slm compress --method prune-structured`, to recover its quality) or a preset name (to
train a small model from a larger one). Training is the trainer's one loop (`slmkit.train.loop.run`)
with the `Distillation` objective, so a distillation run has what a training run has: budgets, the LR
schedule, autocast, DDP/FSDP under torchrun, deferred Ctrl-C, exact resume (optimizer, sampler, every
RNG state), and the same run layout: `checkpoints/step-N/`, `final/`, `metrics.jsonl`, plus
`distill_config.json`. What stays here is what is particular to distillation: choosing the student,
checking that teacher, student and data share a tokenizer, and the run's config file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig, read_json_object
from slmkit.train.losses import distill_loss

if TYPE_CHECKING:
    from slmkit.train.loop import Reporter

__all__ = ["CONFIG_FILE", "DistillResult", "distill", "distill_loss"]

CONFIG_FILE = "distill_config.json"


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
        return model
    if student not in PRESETS:
        raise UserError(f"--student {student!r} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    config = dataclasses.replace(cfg, preset=student).model_config(vocab_size=vocab_size)
    config = config.replace(bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(cfg.seed)
    model = build_model(config)
    model.init_weights(seed=cfg.seed)
    return model


def _teacher_and_student(
    teacher: str | Path, student: str, data: Any, data_dir: str | Path, cfg: TrainConfig
) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """The teacher's model dir, the teacher (on the CPU; the loop moves it) and the student, checked to
    share the data's tokenizer and to fit the run's sequence length."""
    from slmkit.interop.checkpoint import load_model, resolve_model_dir
    from slmkit.train.checkpoints import tokenized_with

    teacher_dir = resolve_model_dir(teacher)
    if not tokenized_with(teacher_dir / "tokenizer.json", data):
        raise UserError(f"{data_dir} was not tokenized with {teacher_dir}'s tokenizer; prepare it with --tokenizer")
    teacher_model = load_model(teacher_dir)
    model = _build_student(student, cfg, teacher_model.config.vocab_size, data.eot_token_id)
    if model.config.vocab_size != teacher_model.config.vocab_size:
        raise UserError(
            f"student vocabulary ({model.config.vocab_size}) differs from the teacher's "
            f"({teacher_model.config.vocab_size}); both must use the teacher's tokenizer"
        )
    if cfg.seq_len > min(model.config.max_seq_len, teacher_model.config.max_seq_len):
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the context of the teacher or the student")
    return teacher_dir, teacher_model, model


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
    reporter: Reporter | None = None,
    overwrite: bool = False,
) -> DistillResult:
    """Distil `teacher` into `student` (model dir or preset) on `data_dir`, writing a run to `run_dir`.

    Under torchrun every rank calls this, as for `slmkit.train.loop.train`. `reporter` sees the run as
    `train`'s does (default: logging). `overwrite` replaces an earlier run in `run_dir`, as for `train`.
    """
    from slmkit.data.shards import load_data_dir
    from slmkit.train import distributed
    from slmkit.train.checkpoints import latest_resumable, refuse_existing_run
    from slmkit.train.loop import RunSpec, check_enough_data, run
    from slmkit.train.objectives import Distillation

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    original_student = str(student)
    if resume:
        resume_from = latest_resumable(run_dir, CONFIG_FILE, "distillation")
        saved = read_json_object(run_dir / CONFIG_FILE)
        missing = sorted({"teacher", "student", "temperature", "alpha", "train"} - set(saved))
        if missing or not isinstance(saved["train"], dict):
            raise UserError(
                f"{run_dir / CONFIG_FILE}: missing or malformed keys {missing or ['train']}; start a new run"
            )
        # the student continues from the checkpoint; the config keeps naming the one the run started from
        teacher, student, original_student = saved["teacher"], str(resume_from), saved["student"]
        temperature, alpha = saved["temperature"], saved["alpha"]
        cfg = TrainConfig.from_dict({**saved["train"], **(budget_overrides or {})}, source=str(run_dir / CONFIG_FILE))
    else:
        refuse_existing_run(run_dir, CONFIG_FILE, overwrite)
        cfg = cfg or TrainConfig()
    Distillation.check_options(temperature, alpha)
    if not cfg.has_budget:
        raise UserError("no distillation budget: give --max-steps, --max-tokens or --max-minutes")
    distributed.resolve_strategy(cfg.strategy)

    data = load_data_dir(data_dir)
    check_enough_data(data, data_dir, cfg.seq_len)
    teacher_dir, teacher_model, model = _teacher_and_student(teacher, str(student), data, data_dir, cfg)

    def config_record(final_cfg: TrainConfig) -> dict[str, Any]:
        return {
            "teacher": str(teacher_dir),
            "student": original_student,
            "temperature": temperature,
            "alpha": alpha,
            "train": final_cfg.to_dict(),
        }

    spec = RunSpec(
        kind="distillation",
        model=model,
        objective=Distillation(teacher_model, temperature, alpha, cfg.trainable, cfg.aux_loss_weight),
        tokenizer_dir=teacher_dir,
        config_file=CONFIG_FILE,
        config_record=config_record,
    )
    result = run(cfg, data, run_dir, spec, resume_from, reporter)
    return DistillResult(
        run_dir=result.run_dir,
        final_dir=result.final_dir,
        step=result.step,
        tokens=result.tokens,
        seconds=result.seconds,
        stop_reason=result.stop_reason,
        val_loss=result.val_loss,
        teacher_val_loss=result.val.get("teacher_val_loss"),
        losses=result.losses,
    )
