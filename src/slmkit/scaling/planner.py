"""`slm plan`: the best model for a budget, from a fitted ladder.

1. Fit the law on the ladder's rungs (with bootstrap intervals).
2. Turn the budget into FLOPs per model size: a FLOP budget is used as is; a minute budget is multiplied
   by the training FLOP/s the ladder's own rungs achieved on this machine (a log-log fit over rung
   size, clamped to the measured range so nothing is extrapolated optimistically).
3. Score every member of the ladder's shape family (width, depth, heads, KV groups, the ladder's context)
   by its predicted loss when trained on D = budget / its exact FLOPs per token, and take the lowest under
   the caps (--max-params on total parameters, --max-decode-ms on the decode latency predicted from timed
   decode steps of a few sizes here).

Several ladders (``--ladder`` repeated), one per mixer family (``slm ladder --mixer``), are planned one by
one in their own families, each on its own law, caps and timings, and the plan with the lowest predicted
loss wins; the plan lists every family's predicted loss so the choice can be checked. One ladder plans as
before. A ladder planned before families existed is an attention ladder.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.config import PRESETS
from slmkit.errors import UserError
from slmkit.scaling.fit import FitResult, analyse, extrapolation_width, ladder_file, load_rungs
from slmkit.scaling.ladder import PLAN_FILE, read_plan, rung_lr
from slmkit.scaling.shapes import DEFAULT_MIXER, Shape, family, parse_mixer, shape_overrides

Rate = Callable[[float], float]  # training FLOP/s as a function of non-embedding parameters

SIZE_TOLERANCE = 0.10
SMALLEST_PRESET = "tiny"
MAX_MEASURED_PARAMS = 400e6  # larger models are timed by extrapolation, not built
# When --max-decode-ms binds, the line through a few timed shapes decides only where to look: members it puts up to
# BOUNDARY_SLACK over the cap are timed themselves, best predicted loss first, at most BOUNDARY_CHECKS of them, and
# the first one timed under the cap wins. Decode time is not linear in parameters (a 10-minute build's line through
# 64x2 .. 256x6 put 128x4 at 0.23 ms; it decodes in 0.19, under its 0.205 cap, and the line's pick was 96x5 with 25%
# fewer parameters).
BOUNDARY_SLACK = 1.25
BOUNDARY_CHECKS = 10


@dataclass
class Candidate:
    shape: Shape
    params: int  # non-embedding
    total_params: int
    flops_per_token: float


@dataclass
class Plan:
    width: int
    depth: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    context: int
    params: int  # non-embedding
    total_params: int
    tokens: int
    flops: float
    predicted_loss: float
    loss_interval: tuple[float, float]
    ci_level: float
    predicted_bits_per_byte: float | None
    predicted_minutes: float
    optimal_params: float  # N* under the caps: the chosen member's non-embedding parameters
    unconstrained_params: float  # N* without --max-params and --max-decode-ms
    predicted_decode_ms: float
    measured_decode_ms: float | None
    decode_measurements: list[dict[str, float]] = field(default_factory=list)
    # members timed at the latency cap when it binds, in the order timed: shape, predicted (the line's ms), ms, meets
    decode_checked: list[dict[str, Any]] = field(default_factory=list)
    binding: list[str] = field(default_factory=list)  # which caps moved the optimum
    train_options: dict[str, Any] = field(default_factory=dict)
    mixer: str = DEFAULT_MIXER  # the mixer family of the chosen plan (shapes.parse_mixer)
    ladder: str = ""
    # with several ladders: one entry per family planned (mixer, ladder, predicted_loss, loss_interval,
    # params, tokens, width, depth), lowest predicted loss first; the first is this plan
    families: list[dict[str, Any]] = field(default_factory=list)
    # how loss_interval was widened for extrapolation in compute (fit.extrapolation_check; None: not widened):
    # per_log_compute, log_distance (of this plan beyond the ladder's top rung), width (log loss), bootstrap
    extrapolation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_config(self) -> dict[str, Any]:
        """A `slm train --config` YAML mapping: top-level options, `preset`, and `model:` overrides."""
        return {
            "preset": SMALLEST_PRESET,
            "model": shape_overrides(self.width, self.depth, self.context, self.mixer),
            **self.train_options,
            "max_tokens": self.tokens,
        }


def candidates(
    vocab_size: int,
    context: int,
    min_params: int = 0,
    mixer: str = DEFAULT_MIXER,
    max_params: float | None = None,
) -> list[Candidate]:
    """The shape family's members with at least `min_params` and (when given) at most `max_params` non-embedding
    parameters. The family is listed width by width, depth rising, so a width stops at its first member over
    `max_params` (counting every member of the whole family takes tens of seconds on a slow CPU)."""
    out = []
    too_big_width = None
    for shape in family(vocab_size, context, mixer=mixer):
        if shape.width == too_big_width:
            continue
        cfg = shape.config(vocab_size, context)
        n = cfg.num_params(False)
        if max_params is not None and n > max_params:
            too_big_width = shape.width
            continue
        if n >= min_params:
            out.append(Candidate(shape, n, cfg.num_params(), cfg.flops_per_token(context)))
    return out


def config_for_params(target: float, pool: list[Candidate], score: Any = None) -> Candidate:
    """The family member within 10% of `target` non-embedding params with the best score (lowest;
    default: closest aspect ratio to the presets' 32), or the nearest one when none is that close."""
    near = [c for c in pool if abs(c.params / target - 1) <= SIZE_TOLERANCE]
    if not near:
        return min(pool, key=lambda c: abs(math.log(c.params / target)))
    score = score or (lambda c: abs(math.log(c.shape.width / c.shape.depth / 32)))
    return min(near, key=score)


def _ladder_meta(path: str | Path) -> dict[str, Any]:
    plan_path = ladder_file(path).parent / PLAN_FILE
    if not plan_path.is_file():
        raise UserError(f"{plan_path}: missing; `slm plan` needs a ladder directory written by `slm ladder`")
    return read_plan(plan_path)


def training_rate(fit: FitResult) -> Any:
    """FLOP/s as a function of N from the rungs' own timings (log-log line, clamped to the measured range)."""
    records = fit.rungs.records
    rates = np.array([r["flops"] / r["seconds"] for r in records if r.get("seconds")])
    params = np.array([r["params"] for r in records if r.get("seconds")])
    if len(rates) == 0:
        raise UserError("the ladder's rungs have no timings; a --budget-minutes plan needs them (use --budget-flops)")
    if len(np.unique(params)) < 2:
        return lambda n: float(np.median(rates))
    slope, intercept = np.polyfit(np.log(params), np.log(rates), 1)
    low, high = rates.min(), rates.max()
    return lambda n: float(np.clip(math.exp(intercept + slope * math.log(n)), low, high))


def measure_decode_ms(shape: Shape, vocab_size: int, context: int, new_tokens: int = 64) -> float:
    """Milliseconds per decoded token (batch 1, greedy) of a random-init model of this shape, timed as the
    efficiency probe (`eval.efficiency.measure_efficiency`, which `slm build` verifies with) times a shipped model:
    a prompt of 32 tokens, `new_tokens` new ones, the median of three runs after a warm-up. It still reads ~5% under
    the probe's fresh process on a trained model of the same shape (128x4: 0.199 vs 0.210 and 0.207 vs 0.219 ms,
    two pairs; in-process, random init and a tied head here, not separated), so a cap checked here is that lenient."""

    from slmkit.infer.generate import GenerationStats, generate_ids
    from slmkit.infer.sampling import SamplingParams
    from slmkit.models import build_model

    cfg = shape.config(vocab_size, max(context, 64))
    model = build_model(cfg).eval()
    prompt_len = min(32, cfg.max_seq_len // 2)
    prompt = [1 + i % (vocab_size - 1) for i in range(prompt_len)]
    new_tokens = max(2, min(new_tokens, cfg.max_seq_len - prompt_len))
    runs = []
    for run in range(4):  # the first run warms up allocations (a first timing in a process ran up to 1.7x slow)
        stats = GenerationStats()
        start = time.perf_counter()
        for _token in generate_ids(model, prompt, new_tokens, SamplingParams(temperature=0.0), stats=stats):
            pass
        if run == 0:
            continue
        if stats.new_tokens > 1 and stats.decode_seconds > 0:
            runs.append(stats.decode_seconds / (stats.new_tokens - 1) * 1e3)
        else:
            runs.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(runs))


def checked_decode_ms(shape: Shape, vocab_size: int, context: int) -> float:
    """`measure_decode_ms` twice, the slower: a member is held to a latency cap by this, so one lucky timing
    (each the median of three runs) does not pass a member that decodes over the cap."""
    return max(measure_decode_ms(shape, vocab_size, context), measure_decode_ms(shape, vocab_size, context))


def decode_point(shape: Shape, vocab_size: int, context: int, ms: float) -> dict[str, Any]:
    """One decode timing as `decode_line` reads it (and build.json's machine profile stores it)."""
    total = shape.config(vocab_size, context).num_params()
    return {"shape": shape.name, "mixer": shape.mixer, "total_params": total, "depth": shape.depth, "ms": ms}


def decode_line(points: list[dict[str, Any]]) -> Callable[[float, int], float]:
    """Decode ms/token of a model from its total parameters and depth, fitted on timed shapes.

    At batch 1 a step streams every weight once (a cost per parameter) and runs each layer's kernels one after
    another (a cost per layer, which dominates small models: on a 2-core EPYC 64x8 decodes 3.4x slower than 64x2
    with 1.7x the parameters). With three or more timings whose (parameters, depth) pairs are not on one line the
    fit is ms = a + b * params + c * depth (non-negative least squares); otherwise, or for timings without a
    depth (profiles from before depth was recorded), the line a + b * params. Returns f(total_params, depth)."""
    x = np.array([p["total_params"] for p in points], dtype=float)
    y = np.array([p["ms"] for p in points], dtype=float)
    depths = [p.get("depth") for p in points]
    if len(points) >= 3 and all(d is not None for d in depths):
        design = np.column_stack([np.ones_like(x), x / 1e6, np.array(depths, dtype=float)])
        if np.linalg.matrix_rank(design) == 3:
            from scipy.optimize import nnls

            (a, b, c), _ = nnls(design, y)
            return lambda n, depth: float(a + b * n / 1e6 + c * depth)
    if len(np.unique(x)) < 2:
        return lambda n, depth: float(y.mean() * n / x.mean())
    b, a = np.polyfit(x, y, 1)
    b = max(b, 1e-12)
    return lambda n, depth: float(max(a, 0.0) + b * n)


def ladder_mixer(meta: dict[str, Any]) -> str:
    """The mixer family of a ladder plan (attention for plans written before families existed)."""
    return parse_mixer(meta.get("mixer") or (meta.get("request") or {}).get("mixer"))


def ladder_family(path: str | Path) -> str:
    """The mixer family of the ladder directory at `path` (UserError when it is not one)."""
    return ladder_mixer(_ladder_meta(path))


def plan(
    ladder: str | Path | list[str | Path],
    budget_flops: float | None = None,
    budget_minutes: float | None = None,
    max_decode_ms: float | None = None,
    max_params: float | None = None,
    bootstrap: int = 100,
    ci_level: float = 0.95,
    measure_decode: bool = True,
    seed: int = 0,
    flops_per_second: Rate | Mapping[str, Rate] | None = None,
    decode_timer: Callable[[Shape, int, int], float] | None = None,
    batch_size: int | None = None,
    check_timer: Callable[[Shape, int, int], float] | None = None,
) -> Plan:
    """Recommend a config and token count for a budget; with several ladders (one per mixer family), the
    family whose plan has the lowest predicted loss. See the module docstring.

    flops_per_second (training FLOP/s as a function of non-embedding parameters, or a mapping from mixer family to
    one: each family's steps cost what they cost) replaces the rate fitted on the ladder's rung timings;
    decode_timer(shape, vocab_size, context) -> ms/token replaces `measure_decode_ms`. `slm build` passes both
    from its own measurements of this machine, so a build can replay them. batch_size is the planned run's batch
    (default: the ladder's); `slm build` runs its ladder at a smaller batch than its run."""
    ladders = [ladder] if isinstance(ladder, str | Path) else list(ladder)
    if not ladders:
        raise UserError("give at least one --ladder")
    options = dict(
        budget_flops=budget_flops,
        budget_minutes=budget_minutes,
        max_decode_ms=max_decode_ms,
        max_params=max_params,
        bootstrap=bootstrap,
        ci_level=ci_level,
        measure_decode=measure_decode,
        seed=seed,
        flops_per_second=flops_per_second,
        decode_timer=decode_timer,
        batch_size=batch_size,
        check_timer=check_timer,
    )
    if len(ladders) == 1:
        return _plan_family(ladders[0], **options)
    metas = [_ladder_meta(p) for p in ladders]
    if len({m.get("data_fingerprint") for m in metas}) > 1 or len({m.get("tokenizer_sha256") for m in metas}) > 1:
        raise UserError(
            "--ladder: the ladders were trained on different data or tokenizers; their losses don't compare"
        )
    seen: dict[str, str] = {}
    for path, meta in zip(ladders, metas, strict=True):
        mixer = ladder_mixer(meta)
        if mixer in seen:
            raise UserError(f"--ladder: {seen[mixer]} and {path} are both {mixer!r} ladders; give one per mixer family")
        seen[mixer] = str(path)
    plans = sorted((_plan_family(p, **options) for p in ladders), key=lambda p: p.predicted_loss)
    best = plans[0]
    best.families = [
        {
            "mixer": p.mixer,
            "ladder": p.ladder,
            "predicted_loss": p.predicted_loss,
            "loss_interval": p.loss_interval,
            "params": p.params,
            "total_params": p.total_params,
            "tokens": p.tokens,
            "width": p.width,
            "depth": p.depth,
        }
        for p in plans
    ]
    return best


def _plan_family(
    ladder: str | Path,
    budget_flops: float | None = None,
    budget_minutes: float | None = None,
    max_decode_ms: float | None = None,
    max_params: float | None = None,
    bootstrap: int = 100,
    ci_level: float = 0.95,
    measure_decode: bool = True,
    seed: int = 0,
    flops_per_second: Rate | Mapping[str, Rate] | None = None,
    decode_timer: Callable[[Shape, int, int], float] | None = None,
    batch_size: int | None = None,
    check_timer: Callable[[Shape, int, int], float] | None = None,
) -> Plan:
    """The plan of one ladder, in its own mixer family."""
    time_decode = decode_timer or measure_decode_ms
    check = check_timer or decode_timer or checked_decode_ms
    if (budget_flops is None) == (budget_minutes is None):
        raise UserError("give exactly one budget: --budget-flops or --budget-minutes")
    for name, value in (
        ("--budget-flops", budget_flops),
        ("--budget-minutes", budget_minutes),
        ("--max-decode-ms", max_decode_ms),
        ("--max-params", max_params),
    ):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{name} must be a positive number, got {value}")
    meta = _ladder_meta(ladder)
    rungs = load_rungs(ladder)
    vocab = int(meta["vocab_size"])
    context = int(meta["request"]["settings"]["seq_len"])
    mixer = ladder_mixer(meta)
    if isinstance(flops_per_second, Mapping):
        if mixer not in flops_per_second:
            raise UserError(f"no training rate was measured for the {mixer!r} family of {ladder}")
        flops_per_second = flops_per_second[mixer]
    fit = analyse(rungs, bootstrap=bootstrap, ci_level=ci_level, holdout=False, seed=seed, extrapolation=True)
    law = fit.law

    smallest = Shape(PRESETS[SMALLEST_PRESET]["d_model"], PRESETS[SMALLEST_PRESET]["n_layers"], mixer)
    smallest_cfg = smallest.config(vocab, context)
    rate = (flops_per_second or training_rate(fit)) if budget_minutes is not None else None

    def budget_for(n: float) -> float:
        return budget_flops if rate is None else budget_minutes * 60 * rate(n)  # type: ignore[operator]

    # a member is worth counting only if the budget trains it on 1/16 token per parameter or more: C >= 6 N^2 / 16
    # at ~6N FLOPs per token, so N <= 4 sqrt(C / 6), C at its largest over the rate's range
    most_flops = max(budget_for(n) for n in (1e3, 1e5, 1e7, 1e9, 1e11))
    pool = candidates(
        vocab,
        context,
        min_params=smallest_cfg.num_params(False),
        mixer=mixer,
        max_params=max(4 * math.sqrt(most_flops / 6), smallest_cfg.num_params(False)),
    )
    uncapped = pool
    if max_params is not None:
        pool = [c for c in pool if c.total_params <= max_params]
        if not pool:
            raise UserError(
                f"--max-params {max_params:,.0f} is below the smallest preset {SMALLEST_PRESET!r} "
                f"({smallest_cfg.num_params():,} parameters at this vocabulary); raise it"
            )

    # the smallest preset trained on one token per parameter is the least worth recommending
    floor_cost = smallest_cfg.num_params() * smallest_cfg.flops_per_token(context)
    if budget_for(smallest_cfg.num_params(False)) < floor_cost:
        have = (
            f"{budget_flops:.3g} FLOPs"
            if rate is None
            else f"{budget_minutes:g} minutes (~{budget_for(smallest_cfg.num_params(False)):.3g} FLOPs here)"
        )
        raise UserError(
            f"a budget of {have} is too small for the smallest preset {SMALLEST_PRESET!r} "
            f"({smallest_cfg.num_params():,} parameters needs at least {floor_cost:.3g} FLOPs, one token per "
            "parameter); raise the budget"
        )

    # every member is scored with its own exact FLOPs per token (ModelConfig's count, attention and head
    # included), never the ladder's fitted C/D = k N^gamma: that line, fitted on rungs whose cost the head
    # dominates, under-counts a larger member's FLOPs (1.6x at 4M parameters on a 90-second ladder) and so
    # promised big members tokens they would not get
    def predicted(c: Candidate) -> float:
        return float(law(c.params, budget_for(c.params) / c.flops_per_token))

    def rank(members: list[Candidate]) -> list[Candidate]:
        return sorted(members, key=lambda c: (predicted(c), c.total_params))

    ranked = rank(pool)
    unconstrained = float(rank(uncapped)[0].params) if max_params is not None else float(ranked[0].params)

    # decode latency: time a few sizes spanning the range of interest, and one deep, thin shape (depth costs time
    # per step whatever the width), fit a + b params + c depth, check the caps
    points: list[dict[str, Any]] = []
    decode = None
    if measure_decode or max_decode_ms is not None:
        by_size = sorted(pool, key=lambda c: c.params)
        best = ranked[0].params
        probe_targets = sorted({by_size[0].params, best, math.sqrt(by_size[0].params * best)})
        probes = [config_for_params(target, pool).shape for target in probe_targets]
        probes.append(Shape(by_size[0].shape.width, 4 * by_size[0].shape.depth, mixer))
        for shape in probes:
            if shape.config(vocab, context).num_params() > MAX_MEASURED_PARAMS or any(
                p["shape"] == shape.name for p in points
            ):
                continue
            points.append(decode_point(shape, vocab, context, time_decode(shape, vocab, context)))
        decode = decode_line(points)

    binding = []
    if unconstrained != ranked[0].params:
        binding.append("max_params")
    allowed_pool = ranked
    if max_decode_ms is not None and decode is not None:
        allowed_pool = [c for c in ranked if decode(c.total_params, c.shape.depth) <= max_decode_ms]
        if not allowed_pool:
            fastest = min(decode(c.total_params, c.shape.depth) for c in pool)
            raise UserError(
                f"no model meets --max-decode-ms {max_decode_ms:g}: even the smallest preset-sized model is predicted "
                f"to take {fastest:.2f} ms per token on this machine; relax the latency limit"
            )
        if allowed_pool[0] is not ranked[0]:
            binding.append("max_decode_ms")
    chosen = allowed_pool[0]
    checked: list[dict[str, Any]] = []
    if "max_decode_ms" in binding:
        assert decode is not None and max_decode_ms is not None
        chosen, checked = _check_at_cap(ranked, chosen, decode, max_decode_ms, check, vocab, context)
    optimum = float(chosen.params)
    if chosen.params == min(c.params for c in pool):
        binding.append(f"the smallest preset, {SMALLEST_PRESET!r}")
    flops = budget_for(chosen.params)
    tokens = int(flops / chosen.flops_per_token)
    plan_flops = tokens * chosen.flops_per_token
    loss, low, high = fit.predict_far(chosen.params, tokens, plan_flops)
    extrapolation = None
    width = extrapolation_width(fit.extrapolation, float(rungs.flops.max()), plan_flops)
    if width > 0:  # only with a check (fit.extrapolation) and beyond the ladder's top compute
        assert fit.extrapolation is not None
        extrapolation = {
            "per_log_compute": fit.extrapolation["per_log_compute"],
            "log_distance": math.log(plan_flops / float(rungs.flops.max())),
            "width": width,
            "bootstrap": list(fit.predict(chosen.params, tokens)[1:]),
            "held_out": fit.extrapolation["rungs"],
        }
    bpb_ratio = [r["bits_per_byte"] / r["val_loss"] for r in rungs.records if r.get("bits_per_byte")]
    settings = meta["request"]["settings"]
    batch = batch_size or settings["batch_size"]
    steps = max(1, tokens // (settings["seq_len"] * batch))
    overrides = shape_overrides(chosen.shape.width, chosen.shape.depth, context, mixer)
    measured = next((c["ms"] for c in checked if c["shape"] == chosen.shape.name), None)
    if measured is None and measure_decode and chosen.total_params <= MAX_MEASURED_PARAMS:
        measured = check(chosen.shape, vocab, context)
    rate_here = flops_per_second or (training_rate(fit) if any(r.get("seconds") for r in rungs.records) else None)
    return Plan(
        width=chosen.shape.width,
        depth=chosen.shape.depth,
        n_heads=overrides["n_heads"],
        n_kv_heads=overrides["n_kv_heads"],
        d_ff=overrides["d_ff"],
        context=context,
        params=chosen.params,
        total_params=chosen.total_params,
        tokens=tokens,
        flops=tokens * chosen.flops_per_token,
        predicted_loss=loss,
        loss_interval=(low, high),
        ci_level=ci_level,
        predicted_bits_per_byte=loss * float(np.median(bpb_ratio)) if bpb_ratio else None,
        predicted_minutes=tokens * chosen.flops_per_token / rate_here(chosen.params) / 60 if rate_here else math.nan,
        optimal_params=optimum,
        unconstrained_params=unconstrained,
        predicted_decode_ms=decode(chosen.total_params, chosen.shape.depth) if decode else math.nan,
        measured_decode_ms=measured,
        decode_measurements=points,
        decode_checked=checked,
        binding=binding,
        train_options={
            "seq_len": settings["seq_len"],
            "batch_size": batch,
            "lr": rung_lr(settings["lr"], chosen.shape.width),
            "warmup_steps": max(1, min(100, steps // 10)),
            "schedule": "cosine",
            "seed": settings["seed"],
            "optimizer": settings.get("optimizer", "adamw"),  # ladders from before the key ran AdamW
            **({"embed_lr_scale": settings["embed_lr_scale"]} if settings.get("embed_lr_scale", 1.0) != 1.0 else {}),
        },
        mixer=mixer,
        ladder=str(ladder),
        extrapolation=extrapolation,
    )


def _check_at_cap(
    ranked: list[Candidate],
    line_pick: Candidate,
    line: Callable[[float, int], float],
    cap: float,
    timer: Callable[[Shape, int, int], float],
    vocab: int,
    context: int,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The member with the lowest predicted loss that decodes within `cap` when timed itself: members whose line
    estimate is within BOUNDARY_SLACK of the cap (and the line's own pick) are timed in rank order until one meets
    it, at most BOUNDARY_CHECKS; the line's pick when none does. Returns it and the timings, in order."""
    near = [
        c
        for c in ranked
        if c.total_params <= MAX_MEASURED_PARAMS
        and (c is line_pick or line(c.total_params, c.shape.depth) <= cap * BOUNDARY_SLACK)
    ]
    checked: list[dict[str, Any]] = []
    for c in near[:BOUNDARY_CHECKS]:
        ms = float(timer(c.shape, vocab, context))
        meets = ms <= cap
        checked.append(
            {"shape": c.shape.name, "predicted": line(c.total_params, c.shape.depth), "ms": ms, "meets": meets}
        )
        if meets:
            return c, checked
    return line_pick, checked


def write_config(result: Plan, path: str | Path) -> Path:
    """Write the plan as YAML that `slm train --config` accepts (checked by loading it back)."""
    import yaml

    from slmkit.train.config import TrainConfig

    path = Path(path)
    config = result.train_config()
    TrainConfig.from_dict(config, source="plan")  # the trainer must accept what we write
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by `slm plan`: predicted val loss "
        f"{result.predicted_loss:.4f} ({result.ci_level:.0%} interval {result.loss_interval[0]:.4f}-"
        f"{result.loss_interval[1]:.4f})\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def print_plan(result: Plan, console: Any) -> None:
    low, high = result.loss_interval
    if result.families:
        console.print("predicted val loss per mixer family (each at its own best shape for the budget):")
        for f in result.families:
            f_low, f_high = f["loss_interval"]
            console.print(
                f"  {f['mixer']:>24}  {f['predicted_loss']:.4f} ({f_low:.4f}-{f_high:.4f})  "
                f"{f['width']}x{f['depth']}, {f['params']:,} params, {f['tokens']:,} tokens"
            )
        console.print(f"chosen: {result.mixer} (lowest predicted loss)")
    family_note = "" if result.mixer == DEFAULT_MIXER else f"{result.mixer} mixers, "
    console.print(
        f"recommended: {family_note}width {result.width}, depth {result.depth}, {result.n_heads} heads, "
        f"{result.n_kv_heads} KV heads ({result.n_heads // result.n_kv_heads} per group), d_ff {result.d_ff}, "
        f"context {result.context}"
    )
    console.print(
        f"  {result.params:,} non-embedding parameters ({result.total_params:,} in all); optimum N* = "
        f"{result.optimal_params:,.0f}" + (f" (limited by {', '.join(result.binding)})" if result.binding else "")
    )
    minutes = f", ~{result.predicted_minutes:.1f} min here" if math.isfinite(result.predicted_minutes) else ""
    console.print(
        f"  train on {result.tokens:,} tokens ({result.tokens / result.params:.1f} per parameter), "
        f"{result.flops:.3g} FLOPs{minutes}"
    )
    bpb = f" (~{result.predicted_bits_per_byte:.3f} bits/byte)" if result.predicted_bits_per_byte else ""
    console.print(
        f"  predicted val loss {result.predicted_loss:.4f}{bpb}, {result.ci_level:.0%} interval {low:.4f}-{high:.4f}"
    )
    if result.extrapolation:
        e = result.extrapolation
        low, high = e["bootstrap"]
        console.print(
            f"  (bootstrap interval {low:.4f}-{high:.4f}, widened for {math.exp(e['log_distance']):.0f}x the ladder's "
            f"top compute at {e['per_log_compute']:.3f} log-loss per log of compute: the ladder's own error when "
            "predicting its top level from the rest)"
        )
    if math.isfinite(result.predicted_decode_ms):
        measured = f", measured {result.measured_decode_ms:.2f} ms" if result.measured_decode_ms else ""
        probes = ", ".join(f"{p['shape']}: {p['ms']:.2f} ms" for p in result.decode_measurements)
        console.print(
            f"  decode latency (batch 1) predicted {result.predicted_decode_ms:.2f} ms/token{measured} "
            f"(line through {probes})"
        )
        if result.decode_checked:
            timed = ", ".join(
                f"{c['shape']} {c['ms']:.3f} ({'meets' if c['meets'] else 'over'})" for c in result.decode_checked
            )
            console.print(f"  members at the latency cap, timed best predicted loss first: {timed} ms")
