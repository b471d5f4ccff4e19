"""This machine, measured once per build: training FLOP/s per model shape and decode milliseconds per token.

The measurements reuse what the ladder and the planner already time (`ladder.measure_train_throughput`, a few
optimizer steps of a random-init model; `planner.measure_decode_ms`, batch-1 decode through the generation core
that `slm generate`, the engine and the efficiency probes share). They are stored in build.json, so a resumed
build plans from the same numbers, and `--machine build.json` replays them in a new build (the same plan, hence
the same model on CPU).

A profile is a plain dict:
``{"vocab_size", "context", "batch_size", "train": [{"shape", "mixer", "params", "total_params",
"tokens_per_second", "flops_per_second", "checked" (a planned shape, timed while planning)}], "decode": [{"shape",
"mixer", "total_params", "depth", "ms"}],
"decode_checked": {"mixer:WxD:vocab:context": ms}}`` (profiles written before the depth was recorded have none:
their decode line is by parameters alone; "decode_checked" holds the planner's own timings of members near a
latency cap and of the planned one, added while planning). Each mixer family's rates and decode line are read from
its own points (a step of a mixture of experts or a Mamba-2 layer costs what an attention model of its size does
not); points without a "mixer" (profiles from before it was recorded) are attention's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from slmkit.errors import UserError
from slmkit.scaling.shapes import DEFAULT_MIXER, Shape

# shapes timed on this machine: the planner's smallest ("tiny", 64x2) and larger ones for the line through them
MEASURED_SHAPES = ("64x2", "128x4", "256x6")
LARGE_BUDGET_SHAPES = ("384x8",)  # timed too when the budget is an hour or more
# decode-only, in each measured mixer family: a deep, thin shape, so the decode fit separates the cost per layer
# from the cost per parameter
DEPTH_PROBE = Shape(64, 8)


def shapes_to_measure(budget_seconds: float, mixer: str) -> list[Shape]:
    from slmkit.scaling.shapes import parse_sizes, with_mixer

    names = MEASURED_SHAPES[:2] if budget_seconds < 300 else MEASURED_SHAPES
    names += LARGE_BUDGET_SHAPES if budget_seconds >= 3600 else ()
    return with_mixer(parse_sizes(",".join(names)), mixer)


def measure(
    vocab_size: int,
    context: int,
    batch_size: int,
    shapes: list[Shape],
    device: str = "cpu",
    on_status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time training steps and batch-1 decoding of each shape here; returns a profile (module docstring)."""
    from slmkit.scaling.planner import decode_point, measure_decode_ms

    profile: dict[str, Any] = {"vocab_size": vocab_size, "context": context, "batch_size": batch_size}
    profile["train"], profile["decode"] = [], []

    def time_decode(shape: Shape) -> None:
        ms = measure_decode_ms(shape, vocab_size, context)
        profile["decode"].append(decode_point(shape, vocab_size, context, ms))

    for shape in shapes:
        if on_status:
            on_status(f"timing {shape.name}: training steps and batch-1 decoding")
        profile["train"].append(train_point(shape, vocab_size, context, batch_size, device))
        time_decode(shape)
    for mixer in sorted({s.mixer for s in shapes}):
        probe = replace(DEPTH_PROBE, mixer=mixer)
        if probe not in shapes:
            if on_status:
                on_status(f"timing {probe.name}: batch-1 decoding")
            time_decode(probe)
    return profile


def screen_families(
    smallest: dict[str, Shape],
    cap: float,
    vocab_size: int,
    context: int,
    on_status: Callable[[str], None] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Before the families are timed in full: each family's smallest shape decoded (`retimed_over_cap`); returns the
    families whose smallest model meets `cap` (all of them when none does: the feasibility check then refuses the
    build with the figures) and the decode points of those that do not (marked "retimed"), so a family no model of
    which can meet the latency target costs one decode timing, not its training and decode timings and a ladder."""
    from slmkit.scaling.planner import decode_point, measure_decode_ms

    kept, dropped = [], []
    for mixer, shape in smallest.items():
        if on_status:
            on_status(f"timing {shape.name} ({mixer}): batch-1 decoding against --max-latency")
        ms = retimed_over_cap(shape, vocab_size, context, cap, measure_decode_ms(shape, vocab_size, context))
        if ms <= cap:
            kept.append(mixer)
        else:
            dropped.append({**decode_point(shape, vocab_size, context, ms), "retimed": True})
    return (kept, dropped) if kept else (list(smallest), [])


def retimed_over_cap(shape: Shape, vocab_size: int, context: int, cap: float, ms: float) -> float:
    """`ms`, a decode timing of `shape`; when it is over `cap`, the fastest of it and two more timings: one timing of
    a tiny model can read slow (the first of a process did, at 1.7x), and a family or a build is refused on this."""
    from slmkit.scaling.planner import measure_decode_ms

    if ms <= cap:
        return ms
    return min(ms, *(measure_decode_ms(shape, vocab_size, context) for _ in range(2)))


def train_point(shape: Shape, vocab_size: int, context: int, batch_size: int, device: str) -> dict[str, Any]:
    """One shape's training throughput here (`ladder.measure_train_throughput`), as a profile's "train" entry."""
    from slmkit.scaling.ladder import LadderSettings, measure_train_throughput

    settings = LadderSettings(seq_len=context, batch_size=batch_size, device=device)
    cfg = shape.config(vocab_size, context)
    tokens_per_second = measure_train_throughput(shape, vocab_size, settings)
    return {
        "shape": shape.name,
        "mixer": shape.mixer,
        "params": cfg.num_params(False),
        "total_params": cfg.num_params(),
        "tokens_per_second": tokens_per_second,
        "flops_per_second": tokens_per_second * cfg.flops_per_token(context),
    }


def check_train_rate(profile: dict[str, Any], shape: Shape, device: str, replay: bool = False) -> float | None:
    """Time the planned shape's own training steps and add them to the profile's "train" points (marked
    "checked"), so `flops_rate` reads them from now on: the line through the timed shapes misjudged shapes of
    other proportions (a 80x6 plan trained 21% fewer tokens than it promised, a 96x5 one 11%). Returns the timed
    rate over the rate the profile gave it before; None when nothing is timed: a timed shape of its family has its
    size (so `flops_rate` reads a timing for it already), or `replay` (a `--machine` profile holds the timings its
    build took)."""
    params = shape.config(profile["vocab_size"], profile["context"]).num_params(False)
    if replay or any(p["params"] == params for p in family_points(profile["train"], shape.mixer)):
        return None
    point = train_point(shape, profile["vocab_size"], profile["context"], profile["batch_size"], device)
    estimate = flops_rate(profile, shape.mixer)(point["params"])
    profile["train"].append({**point, "checked": True})
    return point["flops_per_second"] / estimate


def check_profile(profile: Any, source: str) -> dict[str, Any]:
    ok = (
        isinstance(profile, dict)
        and isinstance(profile.get("train"), list)
        and isinstance(profile.get("decode"), list)
        and profile["train"]
        and profile["decode"]
    )
    if not ok:
        raise UserError(f"{source}: no machine measurements (a build.json of `slm build` holds them under 'machine')")
    return profile


def family_points(points: list[dict[str, Any]], mixer: str) -> list[dict[str, Any]]:
    """The timings of one mixer family (points without a "mixer" are attention's); all of them when the family has
    none (a `--machine` profile of a build in other families)."""
    own = [p for p in points if p.get("mixer", DEFAULT_MIXER) == mixer]
    return own or points


def flops_rate(profile: dict[str, Any], mixer: str = DEFAULT_MIXER) -> Callable[[float], float]:
    """Training FLOP/s of a mixer family as a function of non-embedding parameters: straight in log-log between
    neighbouring timed shapes of the family (so a timed shape reads its own rate; shapes of equal size, their mean),
    the end shapes' rates beyond the measured range."""
    by_size: dict[float, list[float]] = {}
    for p in family_points(profile["train"], mixer):
        by_size.setdefault(float(p["params"]), []).append(math.log(p["flops_per_second"]))
    sizes = np.log(np.array(sorted(by_size), dtype=float))
    rates = np.array([np.mean(by_size[n]) for n in sorted(by_size)], dtype=float)
    return lambda n: float(math.exp(np.interp(math.log(max(n, 1.0)), sizes, rates)))


def decode_timer(profile: dict[str, Any]) -> Callable[[Shape, int, int], float]:
    """`planner.plan`'s decode_timer: `planner.decode_line` through the timings of the shape's mixer family, at its
    total parameters and depth (a line by parameters alone for profiles without depths; a timed shape reads its own
    timing)."""
    from slmkit.scaling.planner import decode_line

    lines: dict[str, Callable[[float, int], float]] = {}
    timed = {(p.get("mixer", DEFAULT_MIXER), p["shape"]): p["ms"] for p in profile["decode"]}

    def timer(shape: Shape, vocab_size: int, context: int) -> float:
        if (shape.mixer, shape.name) in timed and vocab_size == profile["vocab_size"]:
            return float(timed[(shape.mixer, shape.name)])
        if shape.mixer not in lines:
            lines[shape.mixer] = decode_line(family_points(profile["decode"], shape.mixer))
        return lines[shape.mixer](shape.config(vocab_size, context).num_params(), shape.depth)

    return timer


def check_timer(profile: dict[str, Any], replay: bool = False) -> Callable[[Shape, int, int], float]:
    """`planner.plan`'s check_timer: a member's own decode timing (`planner.checked_decode_ms`), taken once and
    kept in the profile under "decode_checked" (by mixer, shape, vocabulary and context), so a resumed or
    replayed build checks its latency cap against the same numbers and so plans the same model. `replay` (a
    `--machine` profile): nothing is timed here; a member the profile has no timing of reads `decode_timer`'s."""
    from slmkit.scaling.planner import checked_decode_ms

    store = profile.setdefault("decode_checked", {})
    estimate = decode_timer(profile)

    def timer(shape: Shape, vocab_size: int, context: int) -> float:
        key = f"{shape.mixer}:{shape.name}:{vocab_size}:{context}"
        if key in store:
            return float(store[key])
        if replay:
            return estimate(shape, vocab_size, context)
        store[key] = checked_decode_ms(shape, vocab_size, context)
        return float(store[key])

    return timer


def train_seconds(profile: dict[str, Any], params: float, flops: float, mixer: str = DEFAULT_MIXER) -> float:
    return flops / flops_rate(profile, mixer)(params)
