"""What a training run optimises: the `Objective` Protocol and its implementations.

One loop (`slmkit.train.loop`) serves pre-training, distillation and fine-tuning; what differs between
them is the objective it is given:

- `LanguageModeling`: next-token cross-entropy, plus the model's auxiliary losses (see `AuxLosses`).
- `Distillation`: KL to a frozen teacher's temperature-softened distribution mixed with cross-entropy,
  optionally after `align_steps` steps of per-layer hidden-state alignment (see `Distillation`).

Both take a trainable-parameter selection (a predicate, or name patterns: `NamePatterns`): parameters
it leaves out are frozen (requires_grad False, not in the optimizer) and still saved in checkpoints.

Auxiliary losses: a module that contributes one (e.g. a mixture-of-experts router's load-balancing
loss) has an attribute `aux_loss`, None at construction, that its forward sets to a scalar tensor.
The objective finds those modules once (`attach`), clears them before each forward, adds
`aux_loss_weight` x their sum to the loss, and logs the sum as `aux_loss` (and the plain cross-entropy
as `lm_loss`). A model without such modules pays nothing per step. Such a module may also set `aux_metrics`,
a dict of detached scalars (routing statistics), logged per layer as `{name}/L{layer}`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

import torch

from slmkit.data.chat import IGNORE
from slmkit.errors import UserError
from slmkit.train.losses import distill_terms, next_token_cross_entropy

Forward = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)
Metrics = Mapping[str, torch.Tensor]  # detached scalars, averaged over micro-steps and logged per step
Trainable = Callable[[str, torch.nn.Parameter], bool]  # (name in model.named_parameters(), parameter)

# returned when there is nothing to log: one shared object, no allocation per micro-step
NO_METRICS: Metrics = MappingProxyType({})


class Objective(Protocol):
    """The loss a run minimises, and which parameters it may change."""

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        """Whether the optimizer updates this parameter; the loop freezes the others."""
        ...

    def attach(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called once before training with the plain (unwrapped) model, already on `device`: check it
        fits, move helpers (a teacher) to the device, find what the loss reads (aux-loss modules)."""
        ...

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """The mean loss of one micro-batch to backpropagate (a scalar), and named metrics to log.

        `forward` is the model as the loop runs it (wrapped for DDP/FSDP, maybe compiled); the call
        happens under the run's autocast. Metrics must not sync with the device: the loop reads them
        together with the loss, once per step.
        """
        ...

    def eval_metrics(self, val_loss: Callable[[torch.nn.Module], float]) -> dict[str, float]:
        """Entries added to each evaluation record; `val_loss(module)` scores any module on the val split."""
        ...


class NamePatterns:
    """A trainable-parameter selection by `fnmatch` patterns on names ("*norm*", "layers.1.*")."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        if not self.patterns or not all(isinstance(p, str) and p for p in self.patterns):
            raise UserError(f"trainable: expected a list of parameter-name patterns, got {list(self.patterns)!r}")

    def __call__(self, name: str, param: torch.nn.Parameter) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def check(self, model: torch.nn.Module) -> None:
        """Every pattern must select something: a typo would otherwise quietly freeze what it meant to train."""
        names = [name for name, _ in model.named_parameters()]
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise UserError(
                    f"trainable pattern {pattern!r} matches no parameter of the model "
                    f"(names look like {names[0]!r} ... {names[-1]!r})"
                )


def selection(trainable: Trainable | Iterable[str] | None) -> Trainable:
    """A predicate from what an objective is given: a predicate, name patterns, or None (train everything)."""
    if trainable is None:
        return _everything
    if callable(trainable):
        return trainable
    return NamePatterns(trainable)


def _everything(name: str, param: torch.nn.Parameter) -> bool:
    return True


def _check_selection(trainable: Trainable, model: torch.nn.Module) -> None:
    if isinstance(trainable, NamePatterns):
        trainable.check(model)


class AuxLosses:
    """The auxiliary losses a model reports through `aux_loss` attributes (see the module docstring)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.modules: list[torch.nn.Module] = []
        self.tags: list[str] = []  # per module: how its metrics are named ("L3" for a module inside layers.3)

    def attach(self, model: torch.nn.Module) -> None:
        named = [(name, m) for name, m in model.named_modules() if hasattr(m, "aux_loss")]
        self.modules = [m for _, m in named]
        self.tags = [_layer_tag(name) for name, _ in named]

    def clear(self) -> None:
        # a value left by an earlier forward (an evaluation, a module skipped this time) must not count twice
        for module in self.modules:
            module.aux_loss = None
            if hasattr(module, "aux_metrics"):
                module.aux_metrics = None

    def collect(self) -> torch.Tensor | None:
        """The sum of the losses set during the last forward (None if none was set); clears them."""
        total: torch.Tensor | None = None
        for module in self.modules:
            value = module.aux_loss
            if value is not None:
                total = value if total is None else total + value
                module.aux_loss = None  # the graph it holds is freed with the step, not kept to the next one
        return total

    def add_to(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """loss + weight x the aux losses of the last forward; their sum is logged as `aux_loss`."""
        aux = self.collect()
        if aux is None:  # no module set one this time: log 0 so every step has the same metrics
            metrics["aux_loss"] = torch.zeros((), device=loss.device)
            return loss, metrics
        metrics["aux_loss"] = aux.detach().float()
        for module, tag in zip(self.modules, self.tags, strict=True):
            for name, value in (getattr(module, "aux_metrics", None) or {}).items():
                metrics[f"{name}/{tag}"] = value
            if hasattr(module, "aux_metrics"):
                module.aux_metrics = None
        return loss + self.weight * aux.float(), metrics


def _layer_tag(module_name: str) -> str:
    """ "L3" for a module inside `layers.3` (the layer a metric belongs to); the module's own name otherwise."""
    parts = module_name.split(".")
    if len(parts) >= 2 and parts[0] == "layers" and parts[1].isdigit():
        return f"L{parts[1]}"
    return module_name or "model"


class LanguageModeling:
    """Next-token cross-entropy, plus `aux_loss_weight` x the model's auxiliary losses if it reports any.

    With `reweight_temperature` (Dynamic Loss-Based Sample Reweighting, Sow et al. 2025) each sequence's mean loss
    is weighted by batch_size x softmax(detached sequence losses / temperature): weights average 1, harder
    sequences weigh more at low temperatures, and a large temperature is the plain mean. The largest weight of
    the step is logged as `reweight_max`, the plain cross-entropy as `lm_loss`.
    """

    def __init__(
        self,
        trainable: Trainable | Iterable[str] | None = None,
        aux_loss_weight: float = 0.01,
        reweight_temperature: float | None = None,
    ) -> None:
        self._trainable = selection(trainable)
        self.aux = AuxLosses(aux_loss_weight)
        if reweight_temperature is not None and not reweight_temperature > 0:
            raise UserError(f"reweight temperature must be > 0, got {reweight_temperature}")
        self.reweight_temperature = reweight_temperature

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return self._trainable(name, param)

    def attach(self, model: torch.nn.Module, device: torch.device) -> None:
        _check_selection(self._trainable, model)
        self.aux.attach(model)

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if self.reweight_temperature is not None:
            return self._reweighted(forward, x, y)
        if not self.aux.modules:
            return next_token_cross_entropy(forward(x), y), NO_METRICS
        self.aux.clear()
        loss = next_token_cross_entropy(forward(x), y)
        return self.aux.add_to(loss, {"lm_loss": loss.detach()})

    def _reweighted(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        assert self.reweight_temperature is not None
        self.aux.clear()
        logits = forward(x)
        per_token = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        ).view_as(y)
        counted = (y != IGNORE).float()  # padding targets (fine-tuning, curricula) carry no loss
        per_row = (per_token * counted).sum(1) / counted.sum(1).clamp(min=1)  # (B,)
        live = counted.sum(1) > 0
        scores = (per_row.detach() / self.reweight_temperature).masked_fill(~live, -math.inf)
        weights = torch.softmax(scores, dim=0) * live.sum()  # mean 1 over the rows that carry loss
        loss = (weights * per_row).sum() / live.sum().clamp(min=1)
        plain = (per_token * counted).sum() / counted.sum().clamp(min=1)
        metrics = {"lm_loss": plain.detach(), "reweight_max": weights.max().detach()}
        if not self.aux.modules:
            return loss, metrics
        return self.aux.add_to(loss, metrics)

    def eval_metrics(self, val_loss: Callable[[torch.nn.Module], float]) -> dict[str, float]:
        return {}


class Distillation:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (see `distill_terms`).

    The teacher is frozen and in eval mode; it runs under no_grad before the student on the same batch.
    Its validation loss does not change during a run, so it is computed at the first evaluation only.

    With `align_steps` > 0 the first that many optimizer steps are a stage of hidden-state alignment
    (MOHAWK's second stage, Bick et al. 2024): every student layer is fed the teacher's input to the same
    layer (frozen, detached) and its output is pulled to the teacher layer's output by mean squared error,
    averaged over layers and logged as `align_mse`. Each layer learns on its own, so a new mixer (mamba2, gla)
    learns to stand in for the attention it replaces without waiting for the layers below it to settle; the
    logit distillation above follows. Student and teacher need the same number of layers and width
    (`slmkit.compress.distill.check_transferable`). A layer copied from the teacher scores exactly zero.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        temperature: float,
        alpha: float,
        trainable: Trainable | Iterable[str] | None = None,
        aux_loss_weight: float = 0.01,
        align_steps: int = 0,
        grad_accum: int = 1,
        start_step: int = 0,
    ) -> None:
        self.check_options(temperature, alpha)
        if align_steps < 0:
            raise UserError(f"--align-steps must be >= 0, got {align_steps}")
        self.align_steps, self.grad_accum = align_steps, max(1, grad_accum)
        self._micro_steps = start_step * self.grad_accum  # training micro-batches seen (a resumed run counts on)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self._trainable = selection(trainable)
        self.aux = AuxLosses(aux_loss_weight)
        self._teacher_val_loss: float | None = None

    @staticmethod
    def check_options(temperature: float, alpha: float) -> None:
        if not (temperature > 0 and math.isfinite(temperature)):
            raise UserError(f"--temperature must be a positive number, got {temperature}")
        if not (0 <= alpha <= 1):
            raise UserError(f"--alpha (weight of the distillation term) must be in [0, 1], got {alpha}")

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return self._trainable(name, param)

    def attach(self, model: torch.nn.Module, device: torch.device) -> None:
        _check_selection(self._trainable, model)
        self.teacher.to(device)
        # the student's aux losses count; the teacher's (it is not trained) do not
        self.aux.attach(model)
        if self.align_steps:
            self.attach_layers(model)

    def alignment_loss(self, forward: Forward, x: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """Mean over layers of MSE(student layer(teacher's input), teacher layer's output) for one micro-batch.

        One teacher pass records each layer's input and output (forward hooks); one student pass through
        `forward` (so DDP still sees every gradient) has each layer's input swapped for the teacher's by a
        pre-hook, so no gradient crosses layers. The student's logits of that pass are not used.
        """
        teacher_layers = list(self.teacher.layers)  # type: ignore[attr-defined]
        inputs: list[torch.Tensor | None] = [None] * len(teacher_layers)
        targets: list[torch.Tensor | None] = [None] * len(teacher_layers)
        outputs: list[torch.Tensor | None] = [None] * len(teacher_layers)

        def record_teacher(i: int) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
                inputs[i], targets[i] = args[0].detach(), out.detach()

            return hook

        def feed_student(i: int) -> Callable[..., tuple]:
            def hook(module: torch.nn.Module, args: tuple) -> tuple:
                return (inputs[i], *args[1:])

            return hook

        def record_student(i: int) -> Callable[..., None]:
            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
                outputs[i] = out

            return hook

        handles = [layer.register_forward_hook(record_teacher(i)) for i, layer in enumerate(teacher_layers)]
        try:
            with torch.no_grad():
                self.teacher(x)
        finally:
            for handle in handles:
                handle.remove()
        handles = [layer.register_forward_pre_hook(feed_student(i)) for i, layer in enumerate(self._student_layers)]
        handles += [layer.register_forward_hook(record_student(i)) for i, layer in enumerate(self._student_layers)]
        try:
            self.aux.clear()
            forward(x)
        finally:
            for handle in handles:
                handle.remove()
        per_layer = [
            torch.nn.functional.mse_loss(out.float(), target.float())  # type: ignore[union-attr]
            for out, target in zip(outputs, targets, strict=True)
        ]
        loss = torch.stack(per_layer).mean()
        metrics = {"align_mse": loss.detach()}
        self.aux.collect()  # a student MoE's balancing loss is not part of this stage; drop what it set
        return loss, metrics

    def attach_layers(self, model: torch.nn.Module) -> None:
        """Check that the student's layers line up with the teacher's, as alignment needs."""
        layers = getattr(model, "layers", None)
        teacher_layers = getattr(self.teacher, "layers", None)
        if layers is None or teacher_layers is None or len(layers) != len(teacher_layers):
            raise UserError("--align-steps needs a student with as many layers as the teacher")
        self._student_layers = list(layers)

    def aligning(self) -> bool:
        """Whether the current optimizer step is in the alignment stage."""
        return self._micro_steps // self.grad_accum < self.align_steps

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        aligning = self.aligning()
        self._micro_steps += 1
        if aligning:
            return self.alignment_loss(forward, x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        if not self.aux.modules:
            return distill_terms(forward(x), teacher_logits, y, self.temperature, self.alpha)
        self.aux.clear()
        return self.aux.add_to(*distill_terms(forward(x), teacher_logits, y, self.temperature, self.alpha))

    def eval_metrics(self, val_loss: Callable[[torch.nn.Module], float]) -> dict[str, float]:
        if self._teacher_val_loss is None:
            self._teacher_val_loss = val_loss(self.teacher)
        return {"teacher_val_loss": self._teacher_val_loss}
