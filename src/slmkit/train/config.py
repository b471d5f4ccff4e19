"""Training configuration: one typed dataclass, loadable from YAML, saved as JSON in the run dir."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slmkit.config import PRESETS, ModelConfig, check_field_types, preset
from slmkit.errors import UserError
from slmkit.interop.families import check_family


@dataclass
class TrainConfig:
    """Optimisation, data, budget and bookkeeping settings of one training run."""

    preset: str = "micro"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides on top of the preset
    # a model directory whose config and weights start the run instead of a fresh preset (continued pre-training;
    # an upcycled or carved mixture of experts); its tokenizer must be the data's
    init: str | None = None
    # continued pre-training: a data dir (same tokenizer) of which `replay_fraction` of every batch is drawn, so the
    # model keeps what it knew (validation on its val split is logged as replay_val_loss)
    replay: str | None = None
    replay_fraction: float = 0.1
    # draw batches from the data dir's domains (its sources, see `slm data prepare`) at these shares, e.g.
    # {"code": 0.7, "papers": 0.3}; shares are positive, normalised to sum to 1; domains not named are not used
    mix: dict[str, float] | None = None
    # optimisation
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # optimizer and training recipe (slmkit.train.optim; docs/training.md)
    # muon: Muon for hidden matrices, AdamW for the rest; auto (the default): muon, or adamw where Muon cannot run
    # (fsdp's sharded matrices, or no hidden matrix among the trainable parameters); slmkit.train.optim
    optimizer: Literal["auto", "adamw", "muon"] = "auto"
    muon_momentum: float = 0.95
    muon_lr_scale: float = 1.0  # Muon's lr = lr x this (its shape-based scaling already matches AdamW's RMS)
    # the embedding tables' and output head's lr = lr x this (AdamW, either optimizer; the speedrun gives them rates
    # of their own); 1.0 keeps them in the shared groups (the parameter groups of earlier checkpoints)
    embed_lr_scale: float = 1.0
    seq_len_warmup_steps: int = 0  # ramp sequences from seq_len_warmup_start to seq_len over these steps (0: off)
    seq_len_warmup_start: int = 64
    batch_warmup_steps: int = 0  # ramp rows per micro-batch from batch_warmup_start to batch_size (0: off)
    batch_warmup_start: int = 4
    # late untying (modded-nanogpt): a tied head becomes its own copy of the embedding once progress reaches this
    untie_head_at: float | None = None
    # budgets (stop at the first one reached); at least one is required
    max_steps: int | None = None
    max_tokens: int | None = None
    max_minutes: float | None = None
    max_flops: float | None = None
    # bookkeeping
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 1
    save_interval: int = 500
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool = False
    threads: int | None = None
    # more than one process (torchrun); see slmkit.train.distributed
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    dist_timeout_seconds: float = 600.0  # a collective waiting longer than this fails the run on every rank
    # objectives (see slmkit.train.objectives)
    trainable: list[str] | None = None  # fnmatch patterns on parameter names; None trains every parameter
    aux_loss_weight: float = 0.01  # weight of the auxiliary losses a model reports (e.g. MoE load balancing)
    # data order and weighting (slmkit.train.curriculum, LanguageModeling's reweighting)
    curriculum: Literal["none", "decomposition"] = "none"
    reweight: Literal["none", "loss"] = "none"
    reweight_temperature: float = 1.0
    # context extension of the `init` model before training (slmkit.config.extend_context): its max_seq_len becomes
    # `context` and its rope is stretched by `rope` (linear, dynamic or yarn; None: yarn), saved with the result
    context: int | None = None
    rope: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "train config")
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        for name in (
            "batch_size",
            "grad_accum",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "save_interval",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"train config: {name} must be an integer >= 1, got {value!r}")
        if self.warmup_steps < 0:
            raise UserError(f"train config: warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"train config: lr must be a positive number, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise UserError(f"train config: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 < self.decay_fraction <= 1):
            raise UserError(f"train config: decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise UserError(f"train config: schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"train config: dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("train config: beta1 and beta2 must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("train config: weight_decay and grad_clip must be >= 0")
        for name in ("max_steps", "max_tokens", "max_minutes", "max_flops"):
            value = getattr(self, name)
            if value is not None and not (value > 0):
                raise UserError(f"train config: {name} must be > 0, got {value}")
        if self.strategy not in ("auto", "single", "ddp", "fsdp"):
            raise UserError(f"train config: strategy must be auto, single, ddp or fsdp, got {self.strategy!r}")
        if not (isinstance(self.dist_timeout_seconds, int | float) and self.dist_timeout_seconds > 0):
            raise UserError(f"train config: dist_timeout_seconds must be > 0, got {self.dist_timeout_seconds!r}")
        if self.trainable is not None and (
            not isinstance(self.trainable, list | tuple)
            or not self.trainable
            or not all(isinstance(p, str) and p for p in self.trainable)
        ):
            raise UserError(
                f"train config: trainable must be a non-empty list of parameter-name patterns, got {self.trainable!r}"
            )
        if not (isinstance(self.aux_loss_weight, int | float) and 0 <= self.aux_loss_weight < math.inf):
            raise UserError(f"train config: aux_loss_weight must be a number >= 0, got {self.aux_loss_weight!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise UserError(f"train config: device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"train config: threads must be >= 1, got {self.threads}")
        self._check_recipe()
        if self.curriculum not in ("none", "decomposition"):
            raise UserError(f"train config: curriculum must be none or decomposition, got {self.curriculum!r}")
        if self.reweight not in ("none", "loss"):
            raise UserError(f"train config: reweight must be none or loss, got {self.reweight!r}")
        if not self.reweight_temperature > 0:
            raise UserError(f"train config: reweight_temperature must be > 0, got {self.reweight_temperature}")
        if self.curriculum != "none" and self.replay is not None:
            raise UserError("train config: a curriculum and replay cannot be combined yet; use one of them")
        if not (0 < self.replay_fraction < 1):
            raise UserError(f"train config: replay_fraction must be in (0, 1), got {self.replay_fraction}")
        if self.mix is not None:
            self.mix = check_mix(self.mix)
            if self.replay is not None:
                raise UserError("train config: replay and mix cannot be combined; give the old data as a domain of mix")
            if self.curriculum != "none":
                raise UserError("train config: a curriculum and mix cannot be combined yet (each chooses the batches)")
        if self.context is not None or self.rope is not None:
            self._check_extension()
        if self.init is not None:
            if self.model:
                raise UserError(
                    f"train config: init ({self.init}) gives the model; model overrides {sorted(self.model)} "
                    "cannot change it (use a preset instead)"
                )
            return
        self.model_config(vocab_size=self.model.get("vocab_size", 8192))  # validate overrides early

    def _check_extension(self) -> None:
        from slmkit.config import EXTENSION_ROPE

        if self.context is None:
            raise UserError("train config: rope (--rope) stretches a model to a new context; give context (--context)")
        if self.init is None:
            raise UserError(
                "train config: context (--context) extends a model that training starts from (init, --init DIR); "
                "a fresh model takes its context from --seq-len or the preset"
            )
        if self.rope is not None and self.rope not in EXTENSION_ROPE:
            raise UserError(f"train config: rope must be one of {', '.join(EXTENSION_ROPE)}, got {self.rope!r}")
        if self.context <= 0:
            raise UserError(f"train config: context must be a positive integer, got {self.context}")

    def _check_recipe(self) -> None:
        if self.optimizer not in ("auto", "adamw", "muon"):
            raise UserError(f"train config: optimizer must be auto, adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise UserError(
                "train config: optimizer muon does not work under strategy fsdp (Muon needs whole matrices, fsdp "
                "shards them); use strategy ddp or optimizer adamw"
            )
        if not 0 <= self.muon_momentum < 1:
            raise UserError(f"train config: muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not self.muon_lr_scale > 0:
            raise UserError(f"train config: muon_lr_scale must be > 0, got {self.muon_lr_scale}")
        if isinstance(self.embed_lr_scale, bool) or not self.embed_lr_scale > 0:
            raise UserError(f"train config: embed_lr_scale must be > 0, got {self.embed_lr_scale}")
        if self.seq_len_warmup_steps < 0:
            raise UserError(f"train config: seq_len_warmup_steps must be >= 0, got {self.seq_len_warmup_steps}")
        if self.batch_warmup_steps < 0:
            raise UserError(f"train config: batch_warmup_steps must be >= 0, got {self.batch_warmup_steps}")
        if self.batch_warmup_steps and not 1 <= self.batch_warmup_start <= self.batch_size:
            raise UserError(
                f"train config: batch_warmup_start must be in [1, batch_size={self.batch_size}], "
                f"got {self.batch_warmup_start}"
            )
        if self.untie_head_at is not None and not 0 < self.untie_head_at < 1:
            raise UserError(
                f"train config: untie_head_at must be in (0, 1) (a share of the run), got {self.untie_head_at}"
            )
        if self.untie_head_at is not None and self.strategy in ("ddp", "fsdp"):
            raise UserError(
                f"train config: untie_head_at needs one process (strategy {self.strategy} fixes the parameters when "
                "it wraps the model); untie the head from the start (tie_embeddings: false) instead"
            )
        if self.seq_len_warmup_steps and not 1 <= self.seq_len_warmup_start <= self.seq_len:
            raise UserError(
                f"train config: seq_len_warmup_start must be in [1, seq_len={self.seq_len}], "
                f"got {self.seq_len_warmup_start}"
            )

    @property
    def has_budget(self) -> bool:
        return any(getattr(self, n) is not None for n in ("max_steps", "max_tokens", "max_minutes", "max_flops"))

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with overrides; max_seq_len at least seq_len; vocabulary from the tokenizer."""
        overrides = {
            "max_seq_len": max(self.seq_len, PRESETS[self.preset].get("max_seq_len", 0)),
            **self.model,
            "vocab_size": vocab_size,
        }
        return check_family(preset(self.preset, **overrides))  # the family can save it: checked before training

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise UserError(f"{source}: unknown training option(s) {unknown}; valid: {sorted(fields)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise UserError(f"{source}: {exc}") from None
        except UserError as exc:
            if source == "config" or str(exc).startswith(source):
                raise
            raise UserError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """The config a run saved (train_config.json), with `overrides`; UserError naming the file if corrupt."""
        return cls.from_dict({**read_json_object(path), **(overrides or {})}, source=str(path))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """YAML with top-level training options, `preset`, and a `model:` mapping of overrides."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: invalid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of options at the top level")
        if "model" in data and not isinstance(data["model"], dict):
            raise UserError(f"{path}: `model` must be a mapping of ModelConfig fields")
        return cls.from_dict(data, source=str(path))


def check_mix(mix: Any) -> dict[str, float]:
    """`mix` checked: {domain: share}, every share positive (the sampler normalises them, so 7 and 3 are 0.7 and 0.3;
    kept as given, so a resumed run computes exactly the same shares)."""
    if not isinstance(mix, dict) or not mix:
        raise UserError(f"train config: mix must be a mapping of domain names to shares, got {mix!r}")
    for name, share in mix.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"train config: mix has a domain name that is not a string: {name!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not (0 < share < math.inf):
            raise UserError(
                f"train config: mix share of {name!r} must be a positive number, got {share!r} (leave a domain out "
                "of the mix instead of giving it 0)"
            )
    return {name: float(share) for name, share in mix.items()}


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path` (a run's saved config); UserError naming the file if missing or corrupt."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; the run directory is incomplete") from None
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise UserError(
            f"{path}: cannot read it as JSON ({exc}); restore it from a backup or start a new run"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of training options; restore it or start a new run")
    return data
