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

Cross-architecture students (`student_config`, `slm distill --student-config FILE`): a model config file
(YAML or JSON: an optional `preset` and ModelConfig fields, e.g. `preset: micro-hybrid`) builds a student of
another architecture, say a mamba2/attention hybrid from a transformer teacher. Before training,
`transfer_weights` copies what carries over unchanged (see there), and `align_steps` optimizer steps of
per-layer hidden-state alignment (`Distillation`) come before the logit distillation: the stage-wise recipe
of MOHAWK (Bick et al. 2024, "Transformers to SSMs").
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

__all__ = [
    "CONFIG_FILE",
    "DistillResult",
    "TransferReport",
    "check_transferable",
    "distill",
    "distill_loss",
    "read_student_config",
    "transfer_weights",
]

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
    transfer: TransferReport | None = None  # what a --student-config student took from the teacher


@dataclass
class TransferReport:
    """Which student tensors were copied from the teacher, and which kept their fresh initialisation."""

    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {"copied": list(self.copied), "fresh": list(self.fresh)}

    def summary(self) -> str:
        return f"copied {len(self.copied)} tensors from the teacher, {len(self.fresh)} initialised fresh"


def read_student_config(path: str | Path, teacher_config: Any) -> Any:
    """The `ModelConfig` of a student config file: YAML or JSON, an optional `preset` plus ModelConfig fields.

    Fields it leaves out come from the preset, or else from the teacher (so `layer_pattern: [mamba2, attention]`
    alone is a hybrid of the teacher's size); the vocabulary and special tokens are always the teacher's.
    """
    import yaml

    from slmkit.config import PRESETS, ModelConfig

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: student config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}  # JSON is YAML
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML or JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of model config fields at the top level")
    data = dict(data)
    name = data.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise UserError(f"{path}: unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(data) - fields)
    if bad:
        raise UserError(f"{path}: unknown model config field(s) {bad}")
    if "vocab_size" in data and data["vocab_size"] != teacher_config.vocab_size:
        raise UserError(
            f"{path}: student vocab_size {data['vocab_size']} differs from the teacher's "
            f"{teacher_config.vocab_size}; the student must use the teacher's tokenizer"
        )
    if name is not None:
        base = dict(PRESETS[name])
    else:
        base = {f: getattr(teacher_config, f) for f in fields if f != "extra"}
        if "layer_pattern" in data or "mixer" in data:
            base["layer_pattern"] = None
            # a student of other mixers has no Hugging Face class unless the file names a family
            base["family"] = "slmkit"
    keep = {"vocab_size", "bos_token_id", "eos_token_id"}
    merged = {**base, **data, **{k: getattr(teacher_config, k) for k in keep}}
    return ModelConfig(**{k: v for k, v in merged.items() if k in fields})


def check_transferable(teacher_config: Any, student_config: Any) -> None:
    """Refuse a student whose weights cannot line up with the teacher's: one error naming the mismatch."""
    for name, what in (("vocab_size", "vocabulary"), ("d_model", "width (d_model)"), ("n_layers", "layer count")):
        t, s = getattr(teacher_config, name), getattr(student_config, name)
        if t != s:
            raise UserError(
                f"student {what} {s} differs from the teacher's {t}; a transferred student needs the teacher's {what}"
            )


def transfer_weights(teacher: torch.nn.Module, student: torch.nn.Module) -> TransferReport:
    """Copy into `student` every teacher tensor that means the same there, in place; report what was copied.

    Copied when the name and shape match: token (and position) embeddings, lm_head, the final norm, each
    layer's norms and MLP. A layer's mixer weights are copied only where student and teacher have the same
    mixer kind at that layer (an attention layer kept in a hybrid gets the teacher's attention exactly).
    Everything else (the new mamba2/gla/based mixers, MLPs of another width) keeps its fresh initialisation;
    alignment trains it. Attention's v/o are not mapped into mamba2's or gla's projections: nothing here shows
    that it helps, and a mismatched start can be worse than a fresh one.
    """
    teacher_state = teacher.state_dict()
    kinds = (teacher.config.mixer_at, student.config.mixer_at)  # type: ignore[attr-defined, operator]
    report = TransferReport()
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in student.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # a tied lm_head is the embedding: listed once
                continue
            seen.add(id(tensor))
            source = teacher_state.get(name)
            ok = source is not None and source.shape == tensor.shape and source.dtype.is_floating_point
            parts = name.split(".")
            if ok and parts[0] == "layers" and parts[2] in ("self_attn", "mixer"):
                ok = kinds[0](int(parts[1])) == kinds[1](int(parts[1]))
            if ok:
                tensor.copy_(source)  # type: ignore[arg-type]
                report.copied.append(name)
            elif tensor.dtype.is_floating_point:
                report.fresh.append(name)
    return report


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
    teacher: str | Path,
    student: str | None,
    data: Any,
    data_dir: str | Path,
    cfg: TrainConfig,
    student_config: str | Path | None = None,
) -> tuple[Path, torch.nn.Module, torch.nn.Module, TransferReport | None]:
    """The teacher's model dir, the teacher (on the CPU; the loop moves it) and the student, checked to
    share the data's tokenizer and to fit the run's sequence length."""
    from slmkit.interop.checkpoint import load_model, resolve_model_dir
    from slmkit.train.checkpoints import tokenized_with

    teacher_dir = resolve_model_dir(teacher)
    if not tokenized_with(teacher_dir / "tokenizer.json", data):
        raise UserError(f"{data_dir} was not tokenized with {teacher_dir}'s tokenizer; prepare it with --tokenizer")
    teacher_model = load_model(teacher_dir)
    report = None
    if student_config is not None:
        from slmkit.models import build_model

        config = read_student_config(student_config, teacher_model.config)
        check_transferable(teacher_model.config, config)
        torch.manual_seed(cfg.seed)
        model = build_model(config)
        model.init_weights(seed=cfg.seed)
        report = transfer_weights(teacher_model, model)
    else:
        assert student is not None
        model = _build_student(student, cfg, teacher_model.config.vocab_size, data.eot_token_id)
    if model.config.vocab_size != teacher_model.config.vocab_size:
        raise UserError(
            f"student vocabulary ({model.config.vocab_size}) differs from the teacher's "
            f"({teacher_model.config.vocab_size}); both must use the teacher's tokenizer"
        )
    if cfg.seq_len > min(model.config.max_seq_len, teacher_model.config.max_seq_len):
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the context of the teacher or the student")
    return teacher_dir, teacher_model, model, report


def distill(
    teacher: str | Path,
    student: str | Path | None,
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    resume: bool = False,
    budget_overrides: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    student_config: str | Path | None = None,
    align_steps: int = 0,
) -> DistillResult:
    """Distil `teacher` into `student` (model dir or preset) on `data_dir`, writing a run to `run_dir`.

    Or, with `student_config` (and `student` None), into a student built from that model config file with
    the teacher's transferable weights copied in (`transfer_weights`), after `align_steps` steps of
    hidden-state alignment (see `slmkit.train.objectives.Distillation`).

    Under torchrun every rank calls this, as for `slmkit.train.loop.train`. `reporter` sees the run as
    `train`'s does (default: logging). `overwrite` replaces an earlier run in `run_dir`, as for `train`.
    """
    from slmkit.data.shards import load_data_dir
    from slmkit.train import distributed
    from slmkit.train.checkpoints import checkpoint_step, latest_resumable, refuse_existing_run
    from slmkit.train.loop import RunSpec, check_enough_data, run
    from slmkit.train.objectives import Distillation

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    if not resume and (student is None) == (student_config is None):
        raise UserError("give exactly one of --student (model dir or preset) and --student-config (config file)")
    original_student = str(student if student is not None else student_config)
    start_step = 0
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
        student_config, align_steps = None, int(saved.get("align_steps", 0))
        start_step = max(0, checkpoint_step(resume_from))
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
    student_name = None if student is None else str(student)
    teacher_dir, teacher_model, model, report = _teacher_and_student(
        teacher, student_name, data, data_dir, cfg, student_config
    )

    def config_record(final_cfg: TrainConfig) -> dict[str, Any]:
        return {
            "teacher": str(teacher_dir),
            "student": original_student,
            "temperature": temperature,
            "alpha": alpha,
            "align_steps": align_steps,
            **({"transfer": report.to_dict()} if report is not None else {}),
            "train": final_cfg.to_dict(),
        }

    spec = RunSpec(
        kind="distillation",
        model=model,
        objective=Distillation(
            teacher_model,
            temperature,
            alpha,
            cfg.trainable,
            cfg.aux_loss_weight,
            align_steps=align_steps,
            grad_accum=cfg.grad_accum,
            start_step=start_step,
        ),
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
        transfer=report,
    )
