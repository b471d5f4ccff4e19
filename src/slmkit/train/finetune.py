"""Supervised fine-tuning: a model directory plus chat or prompt/completion JSONL, through the one training loop.

`finetune(cfg, data, run_dir)` loads `cfg.init` (any slmkit model dir; a quantized one only with adapters:
QLoRA), with `cfg.context` extends its window first (`slmkit.config.extend_context`: max_seq_len and rope
scaling, saved with the fine-tuned model), packs the samples (`slmkit.data.chat`), and runs
`slmkit.train.loop.run` with the language-modeling objective over the trained tokens only. Full fine-tuning
trains every parameter (or `trainable` patterns); with `cfg.lora` the model gets LoRA/NOLA adapters
(`slmkit.models.lora`) and only they train, and each checkpoint (and `final/`) is a PEFT adapter directory instead
of a model directory.

Budgets, evaluation on a held-out share of the samples, metrics, progress and `--resume` are the loop's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig
from slmkit.train.loop import Reporter, RunSpec, TrainResult, extend_model_context, run

FINETUNE_CONFIG = "finetune_config.json"


@dataclass
class FinetuneConfig(TrainConfig):
    """A training config whose model is `init` (required), with the fine-tuning data and adapter options."""

    data: str = ""  # the JSONL file of samples
    optimizer: Literal["auto", "adamw", "muon"] = "adamw"  # fine-tuning (adapters above all) keeps AdamW
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_interval: int = 50
    loss_on_prompt: bool = False  # train on every token, not only the assistant's
    pack: bool | None = None  # pack samples into rows (None: when the model can keep them apart)
    val_fraction: float = 0.05  # share of the samples held out for validation (without val_data)
    val_data: str | None = None  # a separate JSONL file for validation
    lora: dict[str, Any] | None = None  # `slmkit.models.lora.LoRASpec` fields; None: full fine-tuning

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.init:
            raise UserError("fine-tuning needs the model to start from (init, the MODEL argument)")
        if not (0 <= self.val_fraction < 1):
            raise UserError(f"finetune config: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lora is not None:
            self.lora_spec()  # validate early
            if self.trainable is not None:
                raise UserError("finetune config: with adapters only they train; drop `trainable`")
            if self.strategy == "fsdp":
                raise UserError("finetune config: adapters train with single or ddp, not fsdp")

    def lora_spec(self) -> Any:
        from slmkit.models.lora import LoRASpec

        assert self.lora is not None
        try:
            return LoRASpec(**self.lora)
        except TypeError as exc:
            raise UserError(f"finetune config: lora: {exc}") from None


def finetune(
    cfg: FinetuneConfig | None,
    run_dir: str | Path,
    resume: bool = False,
    reporter: Reporter | None = None,
    budget_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune `cfg.init` on `cfg.data` into run_dir (see the module docstring); with `resume` the run's own
    config is read back from run_dir (`cfg` may then be None) and `budget_overrides` extend its budget."""
    from slmkit.interop.checkpoint import load_model, resolve_model_dir
    from slmkit.train.checkpoints import latest_resumable, refuse_existing_run

    run_dir = Path(run_dir)
    resume_from: Path | None = None
    if resume:
        resume_from = latest_resumable(run_dir, FINETUNE_CONFIG, "fine-tuning")
        cfg = FinetuneConfig.load(run_dir / FINETUNE_CONFIG, budget_overrides)
    else:
        assert cfg is not None
        refuse_existing_run(run_dir, FINETUNE_CONFIG, overwrite)
    if not cfg.has_budget:
        raise UserError("no training budget: give --max-steps, --max-tokens, --max-minutes or --max-flops")
    assert cfg.init is not None
    base_dir = resolve_model_dir(cfg.init)
    model = load_model(base_dir)
    compressed = getattr(model, "compression", None) is not None
    if compressed and cfg.lora is None:
        raise UserError(
            f"{base_dir}: the model is quantized or factored; fine-tune it with adapters (--lora: QLoRA), or "
            "fully fine-tune its float original"
        )
    if cfg.context is not None:
        if cfg.lora is not None:
            raise UserError(
                "--context with adapters: an adapter run saves only the adapters and the base keeps its context; "
                "extend the context with full fine-tuning"
            )
        extend_model_context(model, cfg.context, cfg.rope, base_dir)
    if cfg.seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds {base_dir}'s context ({model.config.max_seq_len})")
    packs = bool(model.packs_documents)
    if cfg.pack and not packs:
        raise UserError(
            f"{base_dir}: its mixers carry state across tokens, so packed samples would see each other; "
            "fine-tune it without --pack (one sample per row)"
        )
    data = _load_data(cfg, base_dir, packed=packs if cfg.pack is None else cfg.pack)
    adapter_format = None
    trainable: Any = cfg.trainable
    if cfg.lora is not None:
        from slmkit.models.lora import add_adapters, is_adapter_param

        torch.manual_seed(cfg.seed)
        add_adapters(model, cfg.lora_spec())
        trainable = _AdapterParams(is_adapter_param)
        adapter_format = AdapterCheckpoints(base_dir)
    from slmkit.train.batches import RowSampler
    from slmkit.train.objectives import LanguageModeling

    spec = RunSpec(
        kind="fine-tuning",
        model=model,
        objective=LanguageModeling(trainable, cfg.aux_loss_weight),
        tokenizer_dir=base_dir,
        config_file=FINETUNE_CONFIG,
        config_record=TrainConfig.to_dict,
        sampler=lambda c, rank, world: RowSampler(data.train_rows, c.seed, rank, world, packed=data.packed),
        val_nats=(lambda module, c, autocast: masked_nats(module, data.val_rows, c, autocast))
        if data.val_rows is not None
        else None,
        checkpoint_format=adapter_format,
        add_files=lambda tmp: write_chat_template(tmp, data.template),
    )
    return run(cfg, data, run_dir, spec, resume_from, reporter)


def _load_data(cfg: FinetuneConfig, base_dir: Path, packed: bool) -> Any:
    from slmkit.data.chat import SFTData

    if not cfg.data:
        raise UserError("no fine-tuning data: give --data FILE.jsonl")
    return SFTData(
        cfg.data,
        base_dir,
        cfg.seq_len,
        loss_on_prompt=cfg.loss_on_prompt,
        packed=packed,
        val_fraction=cfg.val_fraction,
        val_path=cfg.val_data,
        seed=cfg.seed,
    )


class _AdapterParams:
    """The trainable selection of an adapter run: adapter parameters only."""

    def __init__(self, predicate: Callable[[str], bool]) -> None:
        self.predicate = predicate

    def __call__(self, name: str, param: torch.nn.Parameter) -> bool:
        return self.predicate(name)


@torch.no_grad()
def masked_nats(model: torch.nn.Module, rows: Any, cfg: TrainConfig, autocast: Any) -> tuple[float, int]:
    """Summed cross-entropy (nats) over the trained targets of up to eval_batches x batch_size rows, and their
    count: the validation loss of a fine-tuning run, on the same rows at every evaluation."""
    import contextlib

    from slmkit.data.chat import IGNORE
    from slmkit.train.losses import next_token_cross_entropy

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = min(len(rows), cfg.eval_batches * cfg.batch_size)
    nats, count = 0.0, 0
    try:
        for start in range(0, n, cfg.batch_size):
            picks = slice(start, min(start + cfg.batch_size, n))
            x = torch.from_numpy(rows.inputs[picks]).to(device)
            y = torch.from_numpy(rows.targets[picks]).to(device)
            extra = {}
            if getattr(model, "packs_documents", False):
                extra = {
                    "segments": torch.from_numpy(rows.segments[picks]).to(device),
                    "pos": torch.from_numpy(rows.positions[picks]).to(device),
                }
            with autocast() if autocast else contextlib.nullcontext():
                logits = model(x, **extra)
            nats += float(next_token_cross_entropy(logits, y, reduction="sum"))
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    return nats, max(count, 1)


def write_chat_template(directory: Path, template: str) -> None:
    """Record the template the model was fine-tuned with in its tokenizer_config.json (`slm serve`, transformers'
    apply_chat_template and the next fine-tuning read it there)."""
    path = directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            config = {}
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2) + "\n")


class AdapterCheckpoints:
    """Checkpoints of an adapter run: PEFT adapter directories (`slmkit.interop.adapters`) plus trainer state;
    `slm generate/eval/serve` load such a directory as its base with the adapter attached."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir.resolve()  # recorded in adapter_config.json: absolute, so it loads from anywhere

    def save(self, model: torch.nn.Module, target: Path, tokenizer_dir: Path, extra: Callable[[Path], None]) -> Path:
        from slmkit.interop.adapters import save_adapter

        return save_adapter(model, target, self.base_dir, overwrite=True, extra=extra)

    def load(self, directory: Path, model: torch.nn.Module) -> None:
        from slmkit.interop.adapters import load_adapter
        from slmkit.models.lora import remove_adapters

        remove_adapters(model)  # the fresh adapter gives way to the saved one (same layers, same names)
        load_adapter(model, directory, trainable=True)
