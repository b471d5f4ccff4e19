"""What the stages after training cost on this machine, predicted for the planned shape, and the build's clock.

The work after training (the train stage's val score, compress, verify, ship) has costs that do not shrink with
the budget: loading models, a fresh evaluation process, exports, the card. `stages.probe_post_costs` runs that
same work on a random-init model of the smallest shape during planning and records each part's seconds and the
forward tokens it scored (`profile["post"]`, replayed with `--machine`). `reserve` predicts each part for the
planned shape: the forward-token share of the probe's seconds (at the probe shape's measured per-token forward
time, a third of its training time per token) scales with the planned shape's per-token time, the rest is kept
as measured, and the total gets `MARGIN`. Training gets what the budget leaves after that reservation.
"""

from __future__ import annotations

from typing import Any

from slmkit.build import machine as machine_mod

MARGIN = 1.2  # the reservation over the prediction: load changes between the probe and the stages
FORWARD_SHARE = 1 / 3  # forward FLOPs per token / training FLOPs per token (backward is twice the forward)
# parts of the post-training work, by the stage that spends them
PARTS = {
    "train": ("train_evaluate",),
    "compress": ("compress_float", "compress_candidates", "select"),
    "verify": ("held_out", "evaluate"),
    "ship": ("hf", "gguf", "card", "report"),
}


def forward_seconds_per_token(profile: dict[str, Any], shape: Any, vocab: int, context: int) -> float:
    """Seconds per scored token of a forward pass of `shape`, from this machine's training FLOP/s."""
    cfg = shape.config(vocab, context)
    rate = machine_mod.flops_rate(profile, shape.mixer)(cfg.num_params(False))
    return cfg.flops_per_token(context) * FORWARD_SHARE / rate


def reserve(
    profile: dict[str, Any], shape: Any, vocab: int, context: int, candidates: int, margin: float = MARGIN
) -> dict[str, float]:
    """Seconds to reserve for each part of the post-training work (`PARTS`) for a model of `shape`.

    candidates: the compression candidates to budget for (0 when the float model is expected to ship)."""
    from slmkit.scaling.shapes import Shape

    post = profile["post"]
    width, depth = (int(x) for x in post["shape"].split("x"))
    t_probe = forward_seconds_per_token(profile, Shape(width, depth, shape.mixer), post["vocab_size"], post["context"])
    t_plan = forward_seconds_per_token(profile, shape, vocab, context)
    ratio = max(t_plan / t_probe, 1.0)  # never predict less than the probe took
    out = {}
    for parts in PARTS.values():
        for part in parts:
            seconds = float(post["seconds"].get(part, 0.0))
            tokens = float(post["tokens"].get(part, 0))
            if part == "compress_candidates":
                seconds, tokens = seconds * candidates, tokens * candidates  # the probe times one candidate
            forward = min(seconds, tokens * t_probe)
            out[part] = (seconds - forward + forward * ratio) * margin
    return out


def by_stage(parts: dict[str, float]) -> dict[str, float]:
    """Reserved seconds per stage ('train': only its final val score) from `reserve`'s parts."""
    return {stage: sum(parts.get(p, 0.0) for p in names) for stage, names in PARTS.items()}


def train_overhead(
    profile: dict[str, Any], shape: Any, vocab: int, context: int, eval_tokens: int, evals: int = 6, saves: int = 12
) -> float:
    """Wall seconds of a training run that are not optimizer steps (the loop's `max_minutes` counts only steps):
    its validations (`evals` of `eval_tokens`) and checkpoints (`saves`, at the probe's save time scaled by
    parameters), with `MARGIN`."""
    post = profile["post"]
    params = shape.config(vocab, context).num_params()
    save = float(post["seconds"].get("save", 0.0)) * max(1.0, params / max(post.get("total_params", params), 1))
    t_plan = forward_seconds_per_token(profile, shape, vocab, context)
    return (evals * eval_tokens * t_plan + saves * save) * MARGIN


def step_minutes(plan: dict[str, Any], spent: float, done: float = 0.0) -> tuple[float, float]:
    """The training loop's `max_minutes` (it counts optimizer-step time only) that ends the run by the plan's
    deadline on the build's spend clock, `plan["train_ends_by"]` = budget - reserved post-training work, when
    the build has spent `spent` seconds and the run's steps already took `done` (a resumed run); and the
    seconds of steps left. At least one second of steps, so a late start still ships a model."""
    left = plan["train_ends_by"] - spent - plan["train_overhead_seconds"]
    return max(done + left, 1.0) / 60, left
