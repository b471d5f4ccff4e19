"""The stages of `slm build` (see `slmkit.build.pipeline`); each function runs the steps of one stage."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmkit.build import costs
from slmkit.build import machine as machine_mod
from slmkit.build.options import STOP_ENV, BuildRequest, BuildStopped
from slmkit.errors import UserError

WORK = "work"
RATE_CHECKS = 3  # planned shapes whose training rate is timed while planning (machine.check_train_rate)
LADDER_SHARE = 0.15  # of the budget: the ladder's rungs (training, evaluation, checkpoints)
# the embedding tables' and head's lr multiple of the planned run (TrainConfig.embed_lr_scale): x10 took the
# quickstart's recipe to its 5-minute target in 2.5 minutes (docs/training.md). The ladder's rungs keep 1.0: with
# x10 in its rungs too the 10-minute build's law put the optimum at a 48x4 model (+18% loss against its prediction,
# 1.35 bpb against the quickstart's 1.17; docs/build.md), so the law describes the plain recipe and the run beats it
BUILD_EMBED_LR_SCALE = 10.0
# The rest of the quickstart's recipe that the planned run takes on top of the ladder's (docs/training.md: each
# took bpb off `micro` at equal time): the wsd schedule (its decay is timed to the run's deadline), sequence-length
# warm-up (up to 100 steps, from 64 tokens) and an untied output head (same FLOPs and decode work per token; more
# bytes of weights, so not when --max-size caps them), with the quickstart's lr warm-up (30 steps at most; the
# plan's rule gives a tenth of the steps up to 100) and its decay over the last 30% of the time (the loop's default
# is 20%). The law was fitted on the plain recipe, so the run should land at or below its prediction.
BUILD_SCHEDULE = "wsd"
BUILD_WARMUP_STEPS, BUILD_DECAY_FRACTION = 30, 0.3
BUILD_SEQ_WARMUP_STEPS, BUILD_SEQ_WARMUP_START = 100, 64
LADDER_EFFICIENCY = 0.5  # share of a ladder's wall time spent in optimizer steps (the rest: evals, saves, starts)
# The ladder's rungs train at a quarter of the run's batch and at least 30 steps (fewer when the budget cannot
# hold 7 rungs so): the first ~30 steps of a run barely move the loss (8.30 -> 7.82 nats at 30 steps of the
# 10-minute build's 80x6), and rungs of 14-30 steps there made the law extrapolate ~25% too pessimistically.
# At batch 4 and >= 30 steps the same FLOPs predicted two 10-minute runs trained at batch 16 within -3.0% to +3.5%
# (two seeds; benchmarks/ladder_predict.py, docs/build.md). Builds under 5 minutes keep their own (already small) batch.
LADDER_BATCH = 4
LADDER_MIN_STEPS = (30, 20, 10)  # tried in turn until the budget holds a ladder
# the compression candidates, least aggressive first (a loss tie goes to the earlier): w8a8 is int8's weights with
# activations quantized per call (`slm compress --method int8 --activations dynamic`), the same file
COMPRESS_METHODS = ("int8", "w8a8", "int4", "gptq-int4")
INT8_LIKE = ("int8", "w8a8", "int4")  # cost about the same to make and measure; GPTQ more (its calibration)
LOSS_TIE = 1e-4  # nats/token: candidates closer than this are equally good (the earlier, less aggressive, wins)
EVAL_WINDOWS = 256  # held-out windows for candidates and the interval (evenly spaced over the val split)
MIN_EVAL_WINDOWS = 40  # the fewest held-out windows verify shrinks to when the budget runs short
TRAIN_EVALS, TRAIN_SAVES = 6, 12  # at most, in the planned run (eval_interval steps//5, save_interval steps//10)


@dataclass
class BuildContext:
    request: BuildRequest
    out: Path
    state: Any  # pipeline.BuildState
    runner: Any  # pipeline._Stages
    say: Any
    console: Any = None
    train_reporter: Any = None
    _data: Any = field(default=None, repr=False)

    @property
    def work(self) -> Path:
        return self.out / WORK

    @property
    def data_dir(self) -> Path:
        return Path(self.state.data["data_dir"])

    def data(self) -> Any:
        from slmkit.data.shards import load_data_dir

        if self._data is None:
            self._data = load_data_dir(self.data_dir)
        return self._data

    @property
    def budget(self) -> float:
        return self.request.budget_seconds

    def fast(self) -> bool:
        """A short build (under 5 minutes): shorter sequences and smaller ladder batches."""
        return self.budget < 300

    @property
    def replayed(self) -> bool:
        """A `--machine` replay: no wall-clock limits anywhere (the planned work, however long, the same model)."""
        return bool(self.state.data.get("machine_replayed"))

    def seconds_left(self) -> float:
        """The budget minus every stage's spend so far (the current stage's included)."""
        self.runner.tick()
        return self.budget - self.state.spent_seconds()

    def reserved(self) -> dict[str, float]:
        """The plan's reserved seconds per part of the post-training work (`costs.PARTS`)."""
        return self.state.data["plan"]["reserved"]


# ---- 1. data --------------------------------------------------------------------------------------------
def stage_data(ctx: BuildContext) -> None:
    def run() -> dict[str, Any]:
        sources = ctx.request.data
        if len(sources) == 1 and (Path(sources[0]) / "meta.json").is_file():
            directory = Path(sources[0]).resolve()
            ctx.state.decide("data", f"used the prepared data dir {directory} as it is")
        else:
            from slmkit.data.prepare import prepare

            directory = (ctx.work / "data").resolve()
            ctx.say(f"preparing {', '.join(sources)} (BPE vocabulary {ctx.request.vocab_size})")
            prepare(sources, directory, vocab_size=ctx.request.vocab_size, val_fraction=0.05, progress=False)
            ctx.state.decide("data", f"prepared {', '.join(sources)} into {directory}")
        ctx.state.data["data_dir"] = str(directory)
        return {"data_dir": str(directory)}

    result = ctx.runner.step("data", "prepare", run)
    ctx.state.data["data_dir"] = result["data_dir"]
    data = ctx.data()
    splits = data.meta["splits"]
    if splits["train"]["tokens"] < 1000 or splits["val"]["tokens"] < 64:
        raise UserError(
            f"{ctx.data_dir}: the corpus is too small to build a model ({splits['train']['tokens']} train and "
            f"{splits['val']['tokens']} val tokens); give more text"
        )
    ctx.say(f"data: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens in {ctx.data_dir}")


# ---- 2. plan --------------------------------------------------------------------------------------------
def _ladder_settings(ctx: BuildContext) -> Any:
    return run_settings(ctx.fast(), ctx.request.seed, ctx.request.device, ctx.request.threads)


def run_settings(fast: bool, seed: int = 1337, device: str = "cpu", threads: int | None = None) -> Any:
    """The planned run's recipe (context, batch, lr, val windows) as LadderSettings; the ladder's rungs train with
    `ladder_rung_settings` of it. `fast`: a build under 5 minutes."""
    from slmkit.scaling.ladder import LadderSettings

    # the quickstart's context at 5 minutes and more (it was 128 until the 10-minute benchmark scored each model at
    # the length it trained at: 128 cost the build 3% of bits per byte against the quickstart's 256, docs/build.md)
    return LadderSettings(
        seq_len=64 if fast else 256,
        batch_size=4 if fast else 16,
        lr=3e-3,
        levels=4,
        min_steps=3 if fast else 10,
        val_windows=32 if fast else 64,
        seed=seed,
        device=device,
        threads=threads,
    )


def ladder_rung_settings(settings: Any, fast: bool, min_steps: int = LADDER_MIN_STEPS[0]) -> Any:
    """The ladder's rung settings from the run's (`_ladder_settings`): batch `LADDER_BATCH` and `min_steps` for a
    build of 5 minutes or more; a shorter build's ladder trains at the run's own settings."""
    from dataclasses import replace

    if fast:
        return settings
    return replace(settings, batch_size=min(LADDER_BATCH, settings.batch_size), min_steps=min_steps)


def _smallest_shape(mixer: str) -> Any:
    from slmkit.config import PRESETS
    from slmkit.scaling.planner import SMALLEST_PRESET
    from slmkit.scaling.shapes import Shape

    preset = PRESETS[SMALLEST_PRESET]
    return Shape(preset["d_model"], preset["n_layers"], mixer)


def compressed_bytes(shape: Any, vocab: int, context: int) -> dict[str, int]:
    """Bytes of the weights of a random-init model of `shape`, float and under each quantizer (what the
    safetensors file of `slm compress` holds), counted from the packed state dicts."""
    import torch

    from slmkit.compress.quantize import QuantOptions, quantize_model
    from slmkit.models import build_model

    model = build_model(shape.config(vocab, context)).eval()
    model.init_weights(seed=0)

    def size(state: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())

    float_state = dict(model.state_dict())
    if model.config.tie_embeddings:
        float_state.pop("lm_head.weight", None)
    out = {"float": size(float_state)}
    for method, bits in (("int8", 8), ("int4", 4)):
        state, _spec = quantize_model(model, QuantOptions(bits=bits), None)
        out[method] = size(state)
    return out


def _feasibility(ctx: BuildContext, profile: dict[str, Any], mixers: list[str]) -> dict[str, Any]:
    """The targets against the smallest model the planner may pick in each family: a family whose smallest model
    misses --max-latency or --max-size is dropped (a decision; its ladder is not run), and the build is refused
    (UserError, before any training) when no family is left. Returns the families kept under "families"."""
    request = ctx.request
    settings = _ladder_settings(ctx)
    vocab = ctx.data().vocab_size
    timer = machine_mod.decode_timer(profile)
    result: dict[str, Any] = {}
    smallest = {m: _smallest_shape(m) for m in mixers}
    decode_ms = {m: timer(s, vocab, settings.seq_len) for m, s in smallest.items()}
    retimed = {(p.get("mixer"), p["shape"]) for p in profile["decode"] if p.get("retimed")}
    cap = request.max_latency_ms
    for m, shape in smallest.items():
        if cap is not None and not ctx.replayed and (m, shape.name) not in retimed:
            decode_ms[m] = machine_mod.retimed_over_cap(shape, vocab, settings.seq_len, cap, decode_ms[m])
    result["smallest_decode_ms_by_family"] = decode_ms
    fastest = min(decode_ms.values())
    result["smallest_decode_ms"] = fastest
    if cap is not None and fastest > cap:
        nearest = math.ceil(fastest * 1.1 * 10) / 10
        raise UserError(
            f"--max-latency {cap:g}ms cannot be met here: the smallest model the planner may "
            f"pick ({', '.join(sorted({s.name for s in smallest.values()}))}) decodes at {fastest:.2f} ms/token on "
            f"this machine; the nearest feasible target is --max-latency {nearest:g}ms"
        )
    if cap is not None:
        for m in [m for m in smallest if decode_ms[m] > cap]:
            ctx.state.decide(
                "plan",
                f"family {m} dropped: its smallest model ({smallest[m].name}) decodes at {decode_ms[m]:.3f} ms/token "
                f"here, over --max-latency {cap:g}ms (no ladder is run for it)",
            )
            del smallest[m]
    result["size_method"] = "float"
    if request.max_size_bytes is not None:
        by_family = {m: compressed_bytes(shape, vocab, settings.seq_len) for m, shape in smallest.items()}
        limit = request.max_size_bytes
        fits = {m: [f for f in ("float", "int8", "int4") if b[f] <= limit] for m, b in by_family.items()}
        if not any(fits.values()):
            m = min(by_family, key=lambda m: by_family[m]["int4"])
            params = smallest[m].config(vocab, settings.seq_len).num_params()
            nearest_mb = math.ceil(by_family[m]["int4"] / 1e6 * 1.05 * 100) / 100
            raise UserError(
                f"--max-size {request.max_size_bytes / 1e6:g}MB cannot be met: the smallest model the planner may "
                f"pick ({params:,} parameters) takes {by_family[m]['int4'] / 1e6:.2f} MB even as int4; the nearest "
                f"feasible target is --max-size {nearest_mb:g}MB"
            )
        for m in [m for m in smallest if not fits[m]]:
            ctx.state.decide(
                "plan",
                f"family {m} dropped: its smallest model ({smallest[m].name}) takes "
                f"{by_family[m]['int4'] / 1e6:.2f} MB even as int4, over --max-size (no ladder is run for it)",
            )
            del smallest[m]
        # plan for the least lossy format that fits the smallest model; larger models shrink the same way
        first = next(iter(smallest))
        params = smallest[first].config(vocab, settings.seq_len).num_params()
        result["smallest_bytes"] = by_family[first]
        result["size_method"] = fits[first][0]
        result["bytes_per_param"] = by_family[first][fits[first][0]] / params
        result["max_params"] = request.max_size_bytes / result["bytes_per_param"]
    else:
        result["smallest_bytes"] = compressed_bytes(next(iter(smallest.values())), vocab, settings.seq_len)
    # the planner refuses a budget that cannot train its smallest model on one token per parameter: refuse it here,
    # before the ladder, with the budget that would do
    worst = 0.0
    for shape in smallest.values():
        cfg = shape.config(vocab, settings.seq_len)
        rate = machine_mod.flops_rate(profile, shape.mixer)
        seconds = cfg.num_params() * cfg.flops_per_token(settings.seq_len) / rate(cfg.num_params(False))
        worst = max(worst, seconds)
    result["smallest_train_seconds"] = worst  # checked against the budget once the post-training work is timed
    result["families"] = list(smallest)
    return result


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def _ladder_sizes(vocab: int, settings: Any, budget_flops: float, train_tokens: int, mixer: str) -> list[Any]:
    """The largest window of small shapes (a decade or more of parameters) whose ladder keeps every size in
    two compute levels within the budget; the smallest window when none does."""
    from slmkit.scaling.ladder import MIN_SPAN, plan_rungs
    from slmkit.scaling.shapes import parse_sizes, with_mixer

    pool = with_mixer(parse_sizes("32x1,32x2,64x2,64x4,96x4,128x4,128x8,192x6,256x6,256x8"), mixer)
    windows = []
    for start in range(len(pool)):
        for end in range(start + 2, len(pool) + 1):
            window = pool[start:end]
            span = window[-1].config(vocab, settings.seq_len).num_params(False) / window[0].config(
                vocab, settings.seq_len
            ).num_params(False)
            if span >= MIN_SPAN and len(window) <= 4:
                windows.append(window)
                break
    for window in reversed(windows):
        try:
            rungs = plan_rungs(window, vocab, settings, budget_flops=budget_flops, train_tokens=train_tokens)
        except UserError:
            continue
        if _every_size_twice(rungs, window):
            return window
    return windows[0]


def _every_size_twice(rungs: list[Any], sizes: list[Any]) -> bool:
    """Whether every size has rungs at two compute levels or more."""
    return all(sum(r.width == s.width and r.depth == s.depth for r in rungs) >= 2 for s in sizes)


def ladder_design(
    run_settings: Any, fast: bool, vocab: int, budget_flops: float, train_tokens: int, mixer: str
) -> tuple[Any, list[Any]]:
    """The ladder's rung settings and sizes for a budget: the first of `LADDER_MIN_STEPS` whose ladder has enough
    rungs (`plan_rungs` refuses fewer) and every size in two levels, the last one otherwise (`run_ladder` then says
    what is missing)."""
    from slmkit.scaling.ladder import plan_rungs

    for min_steps in LADDER_MIN_STEPS:
        settings = ladder_rung_settings(run_settings, fast, min_steps)
        sizes = _ladder_sizes(vocab, settings, budget_flops, train_tokens, mixer)
        try:
            rungs = plan_rungs(sizes, vocab, settings, budget_flops=budget_flops, train_tokens=train_tokens)
        except UserError:
            continue
        if _every_size_twice(rungs, sizes):
            return settings, sizes
    return settings, sizes


def _run_ladders(ctx: BuildContext, profile: dict[str, Any], mixers: list[str]) -> list[str]:
    from slmkit.scaling.ladder import run_ladder

    data = ctx.data()
    seconds = ctx.budget * LADDER_SHARE / len(mixers)
    run = _ladder_settings(ctx)
    paths = []
    for mixer in mixers:
        smallest = _smallest_shape(mixer).config(data.vocab_size, run.seq_len).num_params(False)
        flops = seconds * LADDER_EFFICIENCY * machine_mod.flops_rate(profile, mixer)(smallest)
        settings, sizes = ladder_design(run, ctx.fast(), data.vocab_size, flops, len(data.train), mixer)
        path = ctx.work / f"ladder-{mixer.replace(',', '-')}"
        note = (
            f"ladder ({mixer}) rungs at batch {settings.batch_size} with at least {settings.min_steps} steps each "
            f"(the run trains at batch {run.batch_size}): shorter rungs sit in the first steps' plateau and bias the "
            "law (docs/build.md, the ladder's prediction)"
        )
        if settings.batch_size != run.batch_size and all(d["decision"] != note for d in ctx.state.data["decisions"]):
            ctx.state.decide("plan", note)  # once, also when a stopped ladder is resumed
        ctx.say(
            f"ladder ({mixer}): {', '.join(s.name for s in sizes)}, {flops:.3g} FLOPs "
            f"(~{seconds:.0f} s, {LADDER_SHARE:.0%} of the budget), batch {settings.batch_size}, rungs of at least "
            f"{settings.min_steps} steps"
        )
        try:
            result = run_ladder(
                ctx.data_dir, path, budget_flops=flops, sizes=sizes, settings=settings, mixer=mixer, progress=False
            )
        except UserError as exc:
            raise UserError(
                f"--budget {ctx.budget / 60:g} min is too small to fit a scaling law here ({exc}); raise --budget or "
                "pass --fit LADDER"
            ) from None
        if result.interrupted:
            raise KeyboardInterrupt
        paths.append(str(path))
    return paths


def stage_plan(ctx: BuildContext) -> None:
    from slmkit.scaling import planner

    request = ctx.request
    mixers = request.mixers()
    settings = _ladder_settings(ctx)
    data = ctx.data()

    def measure() -> dict[str, Any]:
        if "machine" in ctx.state.data:
            return {"replayed": True}
        families, screened = mixers, []
        if request.max_latency_ms is not None and len(mixers) > 1:
            smallest = {m: _smallest_shape(m) for m in mixers}
            families, screened = machine_mod.screen_families(
                smallest, request.max_latency_ms, data.vocab_size, settings.seq_len, on_status=ctx.say
            )
        shapes = [s for m in families for s in machine_mod.shapes_to_measure(ctx.budget, m)]
        profile = machine_mod.measure(
            data.vocab_size, settings.seq_len, settings.batch_size, shapes, request.device, on_status=ctx.say
        )
        profile["decode"] += screened  # families whose smallest model misses the latency target: that timing only
        ctx.state.data["machine"] = profile
        return {"replayed": False}

    ctx.runner.step("plan", "measure", measure)
    profile = ctx.state.data["machine"]
    for p in profile["train"]:
        ctx.say(f"  {p['shape']}: {p['tokens_per_second']:,.0f} training tokens/s ({p['flops_per_second']:.3g} FLOP/s)")
    for p in profile["decode"]:
        ctx.say(f"  {p['shape']}: {p['ms']:.2f} ms per decoded token (batch 1)")

    feasible = ctx.runner.step("plan", "feasibility", lambda: _feasibility(ctx, profile, mixers))
    mixers = feasible.get("families", mixers)  # the families that can meet the targets (older build.json: all)
    candidates = len(COMPRESS_METHODS) if feasible.get("size_method", "float") != "float" else 0
    ctx.runner.step("plan", "post-costs", lambda: _post_costs(ctx, profile, mixers, feasible, candidates))
    if request.fit:
        ladders = ctx.runner.step("plan", "ladder", lambda: [str(Path(p).resolve()) for p in request.fit])
        ctx.state.decide("plan", f"planned on the given fit ({', '.join(ladders)}); no ladder run")
    else:
        ladders = ctx.runner.step("plan", "ladder", lambda: _run_ladders(ctx, profile, mixers))

    def make_plan() -> dict[str, Any]:
        from slmkit.scaling.shapes import Shape

        # what the build spent before training: measured here, or (a replay, whose plan must not depend on this
        # machine's load) the ladder's share of the budget
        if ctx.replayed:
            before = 0.0 if request.fit else ctx.budget * LADDER_SHARE
        else:
            before = ctx.budget - ctx.seconds_left()

        def fit(shape: Any, context: int, train_config: dict[str, Any] | None) -> tuple[dict[str, float], float, float]:
            parts = costs.reserve(profile, shape, data.vocab_size, context, candidates)
            tokens = (train_config or {}).get("batch_size", settings.batch_size) * context * 4  # eval_batches 4
            overhead = costs.train_overhead(
                profile, shape, data.vocab_size, context, tokens, evals=TRAIN_EVALS, saves=TRAIN_SAVES
            )
            return parts, overhead, ctx.budget - before - sum(parts.values()) - overhead

        def run_planner(seconds: float) -> Any:
            nearest = _nearest_budget(ctx.budget - seconds + feasible["smallest_train_seconds"], 0.0)
            if seconds <= 0:
                raise UserError(
                    f"--budget {_duration(ctx.budget)} is too small here: the work before training took "
                    f"{before:.0f} s and the work after it is predicted to take {ctx.budget - before - seconds:.0f} "
                    f"s, leaving nothing to train; the nearest feasible budget is --budget "
                    f"{nearest:g}m"
                )
            try:
                return planner.plan(
                    ladders,
                    budget_minutes=seconds / 60,
                    max_decode_ms=request.max_latency_ms,
                    max_params=feasible.get("max_params"),
                    bootstrap=20 if ctx.fast() else 50,
                    seed=request.seed,
                    flops_per_second={m: machine_mod.flops_rate(profile, m) for m in mixers},
                    decode_timer=machine_mod.decode_timer(profile),
                    check_timer=machine_mod.check_timer(profile, replay=ctx.replayed),
                    # the run trains at its own batch (the build's ladder runs a smaller one); a --fit ladder's own
                    batch_size=None if request.fit else settings.batch_size,
                )
            except UserError as exc:
                raise UserError(
                    f"--budget {_duration(ctx.budget)} is too small here: after the work before training "
                    f"({before:.0f} s) and the reserved work after it ({ctx.budget - before - seconds:.0f} s), "
                    f"{seconds:.0f} s are left to train, and the planner refused them ({exc}); the nearest feasible "
                    f"budget is --budget {nearest:g}m"
                ) from None

        # reserve the post-training work of the smallest model, plan, then reserve for the planned shape and plan
        # again when that needs more (a larger model scores and saves more slowly)
        import time

        parts, overhead, seconds = fit(_smallest_shape(mixers[0]), settings.seq_len, None)
        started = time.perf_counter()
        result = run_planner(seconds)
        if not ctx.replayed:
            # planning itself takes seconds (the bootstrap of the fit): this call and the one that replans
            before += 2 * (time.perf_counter() - started)
            seconds = ctx.budget - before - sum(parts.values()) - overhead
            result = run_planner(seconds)
        # the planned shape's own training rate: timed, and planned again on it, until the plan is a timed shape
        # (at most RATE_CHECKS timings; a replay's profile holds them, so it plans the same)
        for _ in range(RATE_CHECKS):
            shape = Shape(result.width, result.depth, result.mixer)
            started = time.perf_counter()
            ratio = machine_mod.check_train_rate(profile, shape, request.device, replay=ctx.replayed)
            if ratio is None:
                break
            before += time.perf_counter() - started
            seconds = ctx.budget - before - sum(parts.values()) - overhead
            ctx.say(
                f"timed the planned {shape.name}'s training steps: {ratio:.2f}x the rate the timed shapes' line gave "
                "it; planning again with its own"
            )
            result = run_planner(seconds)
        for _ in range(2):
            shape = Shape(result.width, result.depth, result.mixer)
            new_parts, new_overhead, new_seconds = fit(shape, result.context, result.train_config())
            if new_seconds >= seconds - 0.5:
                parts, overhead = new_parts, new_overhead
                break
            parts, overhead, seconds = new_parts, new_overhead, new_seconds
            result = run_planner(seconds)
        if ctx.console is not None:
            planner.print_plan(result, ctx.console)
        stages = costs.by_stage(parts)
        after = sum(parts.values())
        return {
            **result.to_dict(),
            "train_config": result.train_config(),
            "train_minutes": seconds / 60,
            "reserved": parts,
            "train_overhead_seconds": overhead,
            # the build's spend clock (seconds of every stage's spend summed): training ends by this
            "train_ends_by": ctx.budget - after,
            "before_train_seconds": before,
            "stage_seconds": {
                "data": ctx.state.stage("data")["seconds"],
                "plan": max(before - ctx.state.stage("data")["seconds"], 0.0),  # a replay counts only the ladder
                "train": ctx.budget - after - before + stages["train"],
                **{name: stages[name] for name in ("compress", "verify", "ship")},
            },
        }

    plan = ctx.runner.step("plan", "plan", make_plan)
    ctx.state.data["plan"] = plan
    if feasible.get("size_method", "float") != "float":
        ctx.state.decide(
            "plan",
            f"--max-size: planned under {feasible['max_params']:,.0f} parameters, the most that fit as "
            f"{feasible['size_method']} ({feasible['bytes_per_param']:.2f} bytes per parameter measured on the "
            "smallest model)",
        )


def _nearest_budget(seconds: float, ladder_share: float) -> float:
    """Minutes (rounded up to 0.1, with 10% to spare) of a budget that holds `seconds` besides the ladder."""
    return math.ceil(seconds / (1 - ladder_share) * 1.1 / 60 * 10) / 10


def _post_costs(
    ctx: BuildContext, profile: dict[str, Any], mixers: list[str], feasible: dict[str, Any], candidates: int
) -> dict[str, Any]:
    """Times the post-training work on the smallest model (unless the profile holds it), then refuses a budget
    that cannot hold the work before training, the smallest model's training and the work after it."""
    if "post" in profile:
        replayed = True
    else:
        replayed = False
        ctx.say("timing the work after training (scoring, compression, evaluation process, exports) on a tiny model")
        profile["post"] = probe_post_costs(ctx, candidates=candidates > 0, mixer=mixers[0])
        if ctx.replayed:
            ctx.state.decide("plan", "the replayed machine holds no post-training costs: they were timed here")
        ctx.state.save()
    settings = _ladder_settings(ctx)
    vocab = ctx.data().vocab_size
    smallest = _smallest_shape(mixers[0])
    after = sum(costs.reserve(profile, smallest, vocab, settings.seq_len, candidates).values())
    before = ctx.budget - ctx.seconds_left()
    ladder_share = 0.0 if ctx.request.fit else LADDER_SHARE
    # with --fit the ladder's own context sets the smallest model's cost: the planner checks that one
    training = 0.0 if ctx.request.fit else feasible["smallest_train_seconds"] * costs.MARGIN
    eval_tokens = 4 * settings.batch_size * settings.seq_len
    overhead = costs.train_overhead(profile, smallest, vocab, settings.seq_len, eval_tokens)
    needed = before + after + training + overhead
    if needed > ctx.budget * (1 - ladder_share):
        raise UserError(
            f"--budget {_duration(ctx.budget)} is too small here: the smallest model the planner may pick needs "
            f"{training:.0f} s of training at this machine's measured speed (one token per parameter), the work "
            f"before training took {before:.0f} s and the work after it (scoring, compression, evaluation, exports) "
            f"is predicted at {after:.0f} s"
            + (f", and the ladder gets {LADDER_SHARE:.0%} of the budget" if ladder_share else "")
            + f"; the nearest feasible budget is --budget {_nearest_budget(needed, ladder_share):g}m"
        )
    return {"replayed": replayed, "smallest_after_seconds": after}


def probe_post_costs(ctx: BuildContext, candidates: bool, mixer: str) -> dict[str, Any]:
    """Runs the post-training work of the build (the functions its stages call) on a random-init model of the
    smallest shape, and returns each part's seconds and the forward tokens it scored (`costs`)."""
    import time

    from slmkit.eval.card import write_card
    from slmkit.eval.report import load_report, render_html
    from slmkit.interop.checkpoint import load_model, save_model
    from slmkit.models import build_model
    from slmkit.scaling.ladder import evaluate_rung

    settings = _ladder_settings(ctx)
    data = ctx.data()
    seq = settings.seq_len
    shape = _smallest_shape(mixer)
    root = ctx.work / "probe"
    shutil.rmtree(root, ignore_errors=True)
    model = build_model(shape.config(data.vocab_size, seq)).eval()
    model.init_weights(seed=0)
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}
    val = len(data.val)
    windows = min(EVAL_WINDOWS * seq, val)

    def timed(part: str, fn: Any, scored: int = 0) -> Any:
        start = time.perf_counter()
        out = fn()
        seconds[part], tokens[part] = time.perf_counter() - start, scored
        return out

    model_dir = root / "model"
    timed("save", lambda: save_model(model, model_dir, tokenizer_dir=ctx.data_dir))
    timed("train_evaluate", lambda: evaluate_rung(model_dir, data, settings), min(settings.val_windows * seq, val))
    timed("compress_float", lambda: _float_measurement(ctx, model_dir), windows)
    if candidates:
        # int8, w8a8 and int4 cost about the same; GPTQ int4 more (its calibration): one candidate is their mean
        timed("compress_candidates", lambda: _candidate(ctx, model_dir, "int8", root / "int8"), windows)
        int8 = seconds["compress_candidates"]
        timed("compress_candidates", lambda: _candidate(ctx, model_dir, "gptq-int4", root / "gptq"), windows)
        gptq = seconds["compress_candidates"]
        seconds["compress_candidates"] = (len(INT8_LIKE) * int8 + gptq) / len(COMPRESS_METHODS)
    timed("select", lambda: shutil.copytree(model_dir, root / "selected"))
    timed(
        "held_out",
        lambda: bits_per_byte_interval(load_model(model_dir), data, seq, ctx.request.seed),
        windows,
    )
    timed("evaluate", lambda: _evaluation(ctx, model_dir, root / "eval", repeats=2), val)
    timed("hf", lambda: _export_hf(model_dir, root / "hf", "float"))
    timed("gguf", lambda: _export_gguf(model_dir, root / "model.gguf", "float"))
    timed("card", lambda: write_card(model_dir, root / "eval" / "report.json"))
    timed("report", lambda: render_html(load_report(root / "eval" / "report.json")))
    shutil.rmtree(root, ignore_errors=True)
    return {
        "shape": shape.name,
        "vocab_size": data.vocab_size,
        "context": seq,
        "total_params": shape.config(data.vocab_size, seq).num_params(),
        "seconds": seconds,
        "tokens": tokens,
    }


# ---- 3. train -------------------------------------------------------------------------------------------
class _PredictionReporter:
    """Wraps the trainer's reporter: shows the plan's predicted loss next to each validation; the stop hook."""

    def __init__(self, inner: Any, plan: dict[str, Any], stop_step: int | None) -> None:
        self.inner = inner
        self.plan = plan
        self.stop_step = stop_step

    def start(self, info: dict[str, Any]) -> None:
        self.inner.start(info)

    def step(self, m: dict[str, Any]) -> None:
        self.inner.step(m)
        if self.stop_step is not None and m["step"] >= self.stop_step:
            raise BuildStopped(f"stopped after train:{self.stop_step} ({STOP_ENV})")

    def eval(self, m: dict[str, Any]) -> None:
        self.inner.eval(m)
        low, high = self.plan["loss_interval"]
        if hasattr(self.inner, "val"):
            self.inner.val += f" (planned end {self.plan['predicted_loss']:.3f} [{low:.3f}, {high:.3f}])"

    def message(self, text: str) -> None:
        self.inner.message(text)

    def end(self, result: Any) -> None:
        self.inner.end(result)


def planned_steps(train_config: dict[str, Any]) -> int:
    """Optimizer steps of the plan's run config (its max_tokens at its batch and context)."""
    return max(1, train_config["max_tokens"] // (train_config["seq_len"] * train_config["batch_size"]))


def run_recipe(train_config: dict[str, Any], untie: bool) -> dict[str, Any]:
    """The planned run's training options: the plan's (the ladder's recipe at the planned shape and tokens) with
    the quickstart's recipe on top (BUILD_*; the head untied when `untie`)."""
    config = {
        **train_config,
        "embed_lr_scale": BUILD_EMBED_LR_SCALE,
        "schedule": BUILD_SCHEDULE,
        "decay_fraction": BUILD_DECAY_FRACTION,
        "warmup_steps": min(train_config.get("warmup_steps", BUILD_WARMUP_STEPS), BUILD_WARMUP_STEPS),
    }
    if train_config["seq_len"] > BUILD_SEQ_WARMUP_START:
        config["seq_len_warmup_steps"] = max(1, min(BUILD_SEQ_WARMUP_STEPS, planned_steps(train_config) // 10))
        config["seq_len_warmup_start"] = BUILD_SEQ_WARMUP_START
    if untie:
        config["model"] = {**train_config.get("model", {}), "tie_embeddings": False}
    return config


def stage_train(ctx: BuildContext) -> None:
    from slmkit.interop.checkpoint import WEIGHTS, latest_checkpoint
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import LogReporter, train

    plan = ctx.state.data["plan"]
    run_dir = ctx.work / "run"
    final = run_dir / "final"
    low, high = plan["loss_interval"]
    ctx.say(
        f"training {plan['width']}x{plan['depth']} ({plan['total_params']:,} parameters) on {plan['tokens']:,} tokens; "
        f"predicted val loss {plan['predicted_loss']:.4f} ({plan['ci_level']:.0%} interval {low:.4f}-{high:.4f})"
    )
    steps = planned_steps(plan["train_config"])
    config = {
        **run_recipe(plan["train_config"], untie=ctx.request.max_size_bytes is None),
        "seed": ctx.request.seed,
        "device": ctx.request.device,
        "threads": ctx.request.threads,
        "max_minutes": None,
        "eval_interval": max(25, steps // 5),
        "eval_batches": 4,
        "save_interval": max(5, steps // 10),
        "keep_checkpoints": 1,
    }
    untied = config.get("model", {}).get("tie_embeddings") is False
    recipe = (
        "the run trains the ladder's recipe with the quickstart's on top: "
        f"embedding/head lr x{BUILD_EMBED_LR_SCALE:g}, {BUILD_SCHEDULE} schedule (decay over the last "
        f"{BUILD_DECAY_FRACTION:.0%}, {config['warmup_steps']} warm-up steps)"
        + (
            f", {config['seq_len_warmup_steps']} steps of sequence-length warm-up"
            if "seq_len_warmup_steps" in config
            else ""
        )
        + (", an untied head (same work per token, more bytes of weights)" if untied else "")
        + (" (the head stays tied: --max-size counts bytes of weights)" if ctx.request.max_size_bytes else "")
        + "; the law describes the ladder's recipe, so the run should land at or below its prediction"
    )
    if not any(d["decision"] == recipe for d in ctx.state.data["decisions"]):
        ctx.state.decide("train", recipe)
    stop = ctx.runner.stop_after or ""
    stop_step = int(stop.split(":", 1)[1]) if stop.startswith("train:") and stop[6:].isdigit() else None

    def run() -> dict[str, Any]:
        if not ((final / WEIGHTS).is_file() and (final / "trainer_state.json").is_file()):
            resume = latest_checkpoint(run_dir) is not None
            if resume:
                ctx.say(f"resuming training from {latest_checkpoint(run_dir)}")
            # a replayed machine (--machine) promises the same model: the planned tokens, with no wall-clock limit;
            # otherwise the run's optimizer steps stop by the deadline (the loop's max_minutes counts step time
            # only: its validations and checkpoints are taken off)
            if not ctx.replayed:
                done = 0.0
                if resume:
                    import json

                    done = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())["elapsed"]
                # the run trains until the deadline: more tokens than planned when the machine is faster than it
                # measured, fewer when slower (the schedule follows the time)
                config["max_minutes"], left = costs.step_minutes(plan, ctx.budget - ctx.seconds_left(), done)
                config["max_tokens"] = None
                ctx.say(
                    f"training deadline: {left:.0f} s of optimizer steps from now (the build's clock reaches "
                    f"{plan['train_ends_by']:.0f} of {ctx.budget:.0f} s; the rest is reserved for the stages after it)"
                )
            inner = ctx.train_reporter or LogReporter()
            reporter = _PredictionReporter(inner, plan, stop_step)
            result = train(
                TrainConfig.from_dict(config, source="build plan"),
                ctx.data_dir,
                run_dir,
                resume=resume,
                reporter=reporter,
                overwrite=not resume,
            )
            if result.stop_reason == "interrupted":
                raise KeyboardInterrupt
        import json

        trainer = json.loads((final / "trainer_state.json").read_text())
        return {
            "final_dir": str(final),
            "steps": trainer["step"],
            "tokens": trainer["tokens"],
            "flops": trainer["flops"],
            "train_seconds": trainer["elapsed"],
            "stop_reason": trainer.get("stop_reason"),
        }

    result = ctx.runner.step("train", "train", run)
    if abs(result["tokens"] - plan["tokens"]) > plan["tokens"] * 0.01:
        ctx.state.decide(
            "train",
            f"training stopped at its deadline ({plan['train_ends_by']:.0f} s into the build, the budget less the time "
            f"reserved for the stages after it) after {result['tokens']:,} tokens, {plan['tokens']:,} planned: this "
            f"machine ran {'slower' if result['tokens'] < plan['tokens'] else 'faster'} than measured",
        )

    def actual() -> dict[str, Any]:
        from slmkit.scaling.ladder import evaluate_rung

        loss, bpb, tokens = evaluate_rung(final, ctx.data(), _ladder_settings(ctx))
        return {"val_loss": loss, "bits_per_byte": bpb, "val_tokens": tokens}

    measured = ctx.runner.step("train", "evaluate", actual)
    inside = low <= measured["val_loss"] <= high
    ctx.say(
        f"val loss {measured['val_loss']:.4f} (predicted {plan['predicted_loss']:.4f}, interval {low:.4f}-{high:.4f}: "
        f"{'inside' if inside else 'OUTSIDE'})"
    )


# ---- 4. compress ----------------------------------------------------------------------------------------
def _meets(request: BuildRequest, size_bytes: int, decode_ms: float | None) -> dict[str, bool]:
    return {
        "size": request.max_size_bytes is None or size_bytes <= request.max_size_bytes,
        "latency": request.max_latency_ms is None or (decode_ms is not None and decode_ms <= request.max_latency_ms),
    }


def decode_ms_per_token(directory: Path) -> float | None:
    """Batch-1 decode ms/token of a model dir in this process, through the generation core the efficiency
    probes and `slm generate` use (`eval.efficiency.measure_efficiency`, short settings); the shipped model is
    timed again in a fresh process in the verify stage."""
    from slmkit.eval.efficiency import measure_efficiency

    eff = measure_efficiency(directory, prompt_tokens=16, new_tokens=32, batch_size=1, repeats=3)
    return eff["decode_ms_per_token"]


def _float_measurement(ctx: BuildContext, final: Path) -> dict[str, Any]:
    from slmkit.compress.pipeline import directory_size
    from slmkit.interop.checkpoint import load_model

    model = load_model(final)
    loss = _val_loss(model, ctx.data(), model.config.max_seq_len)
    decode = decode_ms_per_token(final)
    size = directory_size(final)
    return {
        "method": "float",
        "path": str(final),
        "size_bytes": size,
        "loss": loss,
        "bits_per_byte": loss / math.log(2) / ctx.data().bytes_per_token("val"),
        "decode_ms_per_token": decode,
        "meets": _meets(ctx.request, size, decode),
    }


def _val_loss(model: Any, data: Any, seq_len: int) -> float:
    from slmkit.train.validation import token_nats

    nats, count = token_nats(model, data.val, seq_len, 8, EVAL_WINDOWS)
    return nats / count


def stage_compress(ctx: BuildContext) -> None:
    request = ctx.request
    final = Path(ctx.state.data["stages"]["train"]["steps"]["train"]["final_dir"])
    base = ctx.runner.step("compress", "float", lambda: _float_measurement(ctx, final))
    ctx.say(_describe(base))
    candidates = [base]
    asked = request.max_size_bytes is not None or request.max_latency_ms is not None
    if not asked:
        ctx.state.decide("compress", "no --max-size or --max-latency: the float model ships, nothing compressed")
    elif all(base["meets"].values()):
        ctx.state.decide("compress", "the float model already meets the targets: it ships uncompressed")
    else:
        for method in COMPRESS_METHODS:
            if not ctx.state.step_done("compress", method):
                skip = _skip_candidate(ctx, candidates)
                if skip:
                    ctx.runner.step("compress", method, lambda m=method, s=skip: {"method": m, "skipped": s})
                    ctx.state.decide("compress", f"{method} not tried: {skip}")
                    ctx.say(f"  {method:<10} not tried: {skip}")
                    continue
            record = ctx.runner.step("compress", method, lambda m=method: _candidate(ctx, final, m))
            if "skipped" in record:
                continue
            ctx.say(_describe(record))
            candidates.append(record)
        ctx.state.decide(
            "compress",
            "pruning not tried: unstructured sparsity does not shrink dense weights on disk, and structured pruning "
            "needs distillation that the budget does not hold",
        )
    chosen, why = pick_candidate(candidates, request.max_latency_ms, request.max_size_bytes)
    if not all(chosen["meets"].values()):
        ctx.say(f"warning: {why}")
    ctx.state.data["candidates"] = candidates
    ctx.state.decide("compress", f"shipped {chosen['method']}: {why}")

    def select() -> dict[str, Any]:
        target = ctx.out / "model"
        if target.exists():
            shutil.rmtree(target)
        tmp = ctx.out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(chosen["path"], tmp, ignore=shutil.ignore_patterns("trainer_state.json", "optimizer*"))
        tmp.rename(target)
        return {"method": chosen["method"], "model_dir": str(target)}

    ctx.runner.step("compress", "select", select)


def pick_candidate(
    candidates: list[dict[str, Any]], max_latency_ms: float | None, max_size_bytes: float | None
) -> tuple[dict[str, Any], str]:
    """The candidate that ships, and why: the least held-out loss among those meeting every target (losses within
    LOSS_TIE nats a tie, won by the earlier, less aggressive candidate); when none does, the one missing the fewest
    targets, then the nearest them (its excess over each missed target, relative to the target, summed: a float
    model 2% over a latency target ships before an int8 one 9x over it whose loss is lower by noise), then the same
    loss rule."""

    def loss_rank(c: dict[str, Any]) -> tuple[int, int]:
        return round(c["loss"] / LOSS_TIE), candidates.index(c)

    meeting = [c for c in candidates if all(c["meets"].values())]
    if meeting:
        return min(meeting, key=loss_rank), "least held-out loss among the candidates that meet the targets"

    def excess(c: dict[str, Any]) -> float:
        over = 0.0
        if max_latency_ms and not c["meets"].get("latency", True):
            over += c["decode_ms_per_token"] / max_latency_ms - 1
        if max_size_bytes and not c["meets"].get("size", True):
            over += c["size_bytes"] / max_size_bytes - 1
        return over

    chosen = min(candidates, key=lambda c: (sum(not v for v in c["meets"].values()), excess(c), *loss_rank(c)))
    return chosen, "NO candidate meets every target; shipped the one missing fewest, then the nearest them"


def _skip_candidate(ctx: BuildContext, candidates: list[dict[str, Any]]) -> str | None:
    """Why the next compression candidate is left out (the budget has no room for it and a candidate already
    meets the targets), or None. A replay tries every candidate (the same model)."""
    if ctx.replayed or not any(all(c["meets"].values()) for c in candidates):
        return None
    reserved = ctx.reserved()
    per = reserved.get("compress_candidates", 0.0) / len(COMPRESS_METHODS)
    later = sum(reserved.get(p, 0.0) for p in (*costs.PARTS["verify"], *costs.PARTS["ship"]))
    left = ctx.seconds_left()
    if left - later >= per:
        return None
    return (
        f"{left:.0f} s of the budget are left, the stages after compress need {later:.0f} s and a candidate "
        f"{per:.0f} s, and {', '.join(c['method'] for c in candidates if all(c['meets'].values()))} already meets "
        "the targets"
    )


def _candidate(ctx: BuildContext, final: Path, method: str, out: Path | None = None) -> dict[str, Any]:
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.interop.hf import load_config

    out = out or ctx.work / "candidates" / method
    activations = "dynamic" if method == "w8a8" else "none"
    options = CompressOptions(seed=ctx.request.seed, calib_samples=32, calib_seq_len=128, activations=activations)
    # scored at the model's full context, as the float model is (`_float_measurement`): calibrated at 128 tokens
    # and scored there too, int8 read 0.045 bpb worse than the float model on the 10-minute benchmark, which was
    # the shorter windows, not the rounding
    result = compress(
        final,
        "int8" if method == "w8a8" else method,
        out,
        data=ctx.data_dir,
        options=options,
        measure=False,
        eval_windows=EVAL_WINDOWS,
        overwrite=True,
        eval_seq_len=load_config(final / "config.json").max_seq_len,
    )
    after = result.after
    decode = decode_ms_per_token(out)
    return {
        "method": method,
        "path": str(out),
        "size_bytes": after.size_bytes,
        "loss": after.loss,
        "bits_per_byte": after.bits_per_byte,
        "decode_ms_per_token": decode,
        "compress_seconds": result.seconds,
        "meets": _meets(ctx.request, after.size_bytes, decode),
    }


def _describe(c: dict[str, Any]) -> str:
    marks = ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in c["meets"].items())
    ms = f"{c['decode_ms_per_token']:.2f}" if c["decode_ms_per_token"] is not None else "?"
    return (
        f"  {c['method']:<10} loss {c['loss']:.4f} ({c['bits_per_byte']:.4f} bpb)  {c['size_bytes'] / 1e6:.3f} MB  "
        f"{ms} ms/token  [{marks}]"
    )


# ---- 5. verify ------------------------------------------------------------------------------------------
def bits_per_byte_interval(
    model: Any, data: Any, seq_len: int, seed: int, blocks: int = 20, windows_max: int = EVAL_WINDOWS
) -> dict[str, Any]:
    """Held-out bits per byte over the val split's windows, with a 95% bootstrap interval over contiguous blocks
    of windows (resampled with replacement; each block's nats and tokens summed, so the ratio is of totals)."""
    from slmkit.train.batches import eval_windows
    from slmkit.train.validation import token_nats

    windows = eval_windows(data.val, seq_len, windows_max)
    groups = np.array_split(np.arange(len(windows)), min(blocks, len(windows)))
    nats, counts = [], []
    for group in groups:
        sub = [windows[i] for i in group]
        start, end = sub[0][0], sub[-1][0] + sub[-1][1] + 1
        block_nats, block_count = token_nats(model, data.val[start:end], seq_len, 8)
        nats.append(block_nats)
        counts.append(block_count)
    nats_a, counts_a = np.array(nats), np.array(counts)
    per_byte = 1 / math.log(2) / data.bytes_per_token("val")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(1000, len(groups)))
    boot = nats_a[draws].sum(1) / counts_a[draws].sum(1) * per_byte
    loss = float(nats_a.sum() / counts_a.sum())
    return {
        "loss": loss,
        "bits_per_byte": loss * per_byte,
        "bits_per_byte_interval": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "tokens": int(counts_a.sum()),
        "blocks": len(groups),
        "windows": len(windows),
    }


def _evaluation(ctx: BuildContext, model_dir: Path, report_dir: Path, repeats: int = 2) -> dict[str, Any]:
    """`run_eval` on a model dir (val split, tasks with contamination, efficiency in a fresh process), written
    to report_dir; returns what the build keeps of it."""
    from slmkit.eval.report import write_report
    from slmkit.eval.runner import run_eval

    report = run_eval(
        [model_dir],
        data=[ctx.data_dir],
        tasks=ctx.request.tasks or None,
        seed=ctx.request.seed,
        efficiency=True,
        efficiency_options={
            "prompt_tokens": 32,
            "new_tokens": 32,
            "batch_size": 4,
            "repeats": repeats,
            **({"threads": ctx.request.threads} if ctx.request.threads else {}),
        },
        device="cpu" if ctx.request.device == "auto" else ctx.request.device,
        contamination_data=ctx.data_dir if ctx.request.tasks else None,
        on_status=ctx.say,
    )
    write_report(report, report_dir)
    entry = report["models"][0]
    return {
        "report": str(report_dir / "report.json"),
        "efficiency": entry.get("efficiency", {}),
        "tasks": [
            {"task": t["task"], "metrics": t["metrics"], "contamination": t.get("contamination")}
            for t in entry.get("tasks", [])
        ],
    }


def _verify_scale(ctx: BuildContext) -> float:
    """The share of verify's planned work that fits in what is left of the budget (1 for a replay)."""
    if ctx.replayed:
        return 1.0
    reserved = ctx.reserved()
    need = sum(reserved.get(p, 0.0) for p in costs.PARTS["verify"])
    later = sum(reserved.get(p, 0.0) for p in costs.PARTS["ship"])
    left = ctx.seconds_left() - later
    return 1.0 if need <= 0 or left >= need else max(left, 0.0) / need


def stage_verify(ctx: BuildContext) -> None:
    model_dir = ctx.out / "model"
    scale = _verify_scale(ctx) if not ctx.state.step_done("verify", "held-out") else 1.0
    windows = EVAL_WINDOWS if scale >= 1 else max(MIN_EVAL_WINDOWS, int(EVAL_WINDOWS * scale))
    if windows < EVAL_WINDOWS:
        ctx.state.decide(
            "verify",
            f"the budget left holds {scale:.0%} of verify's planned work: the held-out interval uses {windows} of "
            f"{EVAL_WINDOWS} val windows and the efficiency probe one repeat",
        )

    def held_out() -> dict[str, Any]:
        from slmkit.interop.checkpoint import load_model

        model = load_model(model_dir)
        seq = model.config.max_seq_len
        return bits_per_byte_interval(model, ctx.data(), seq, ctx.request.seed, windows_max=windows)

    score = ctx.runner.step("verify", "held-out", held_out)
    low, high = score["bits_per_byte_interval"]
    ctx.say(f"held-out: {score['bits_per_byte']:.4f} bits/byte (95% interval {low:.4f}-{high:.4f})")

    def evaluate() -> dict[str, Any]:
        return _evaluation(ctx, model_dir, ctx.work / "eval", repeats=2 if windows == EVAL_WINDOWS else 1)

    evaluated = ctx.runner.step("verify", "evaluate", evaluate)
    eff = evaluated["efficiency"]
    if eff:
        ctx.say(
            f"efficiency (fresh process): {eff.get('decode_ms_per_token') or math.nan:.2f} ms/token decode at batch 1, "
            f"{eff.get('weights_bytes', 0) / 1e6:.2f} MB of weights"
        )
    for t in evaluated["tasks"]:
        c = t.get("contamination")
        share = f"; {c['contaminated']}/{c['items']} items overlap the training data" if c else ""
        for metric, v in t["metrics"].items():
            ctx.say(f"task {t['task']}: {metric} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]{share}")


# ---- 6. ship --------------------------------------------------------------------------------------------
def stage_ship(ctx: BuildContext) -> None:
    model_dir = ctx.out / "model"
    method = ctx.state.data["stages"]["compress"]["steps"]["select"]["method"]

    def hf() -> dict[str, Any]:
        return _export_hf(model_dir, ctx.out / "hf", method)

    def gguf() -> dict[str, Any]:
        return _export_gguf(model_dir, ctx.out / "model.gguf", method)

    for name, fn in (("hf", hf), ("gguf", gguf)):
        result = ctx.runner.step("ship", name, fn)
        if "skipped" in result:
            ctx.state.decide("ship", f"{name} not written: {result['skipped']}")
    ctx.state.data["result"] = _result(ctx)
    ctx.runner.step("ship", "card", lambda: _card(ctx))

    def report() -> dict[str, Any]:
        # the last work of the build, inside its clock: the page shows the spend up to its own rendering
        ctx.state.data["spent_seconds"] = ctx.budget - ctx.seconds_left()
        write_outputs(ctx)
        return {"path": str(ctx.out / "report.html")}

    ctx.runner.step("ship", "report", report)


def _export_hf(model_dir: Path, target: Path, method: str) -> dict[str, Any]:
    """The shipped model as a transformers dir (a compressed model's weights dequantized to float32)."""
    from slmkit.interop.adapters import dequantize_model
    from slmkit.interop.checkpoint import load_model, save_model
    from slmkit.interop.families import NATIVE_FAMILIES

    model = load_model(model_dir)
    if model.config.family in NATIVE_FAMILIES:
        return {"skipped": f"the {model.config.family} family has no transformers class"}
    dense = dequantize_model(model)
    if target.exists():
        shutil.rmtree(target)
    save_model(dense, target, tokenizer_dir=model_dir)
    note = "" if method == "float" else f" (the {method} weights dequantized to float32)"
    return {"path": str(target), "note": f"float32 weights{note}"}


def _export_gguf(model_dir: Path, target: Path, method: str) -> dict[str, Any]:
    """The shipped model as GGUF: f16, or q8_0 / q4_1 keeping an int8 / int4 model's codes."""
    from slmkit.interop.gguf import export_gguf

    dtype = {"int8": "q8_0", "int4": "q4_1", "gptq-int4": "q4_1"}.get(method, "f16")
    try:
        export_gguf(model_dir, target, dtype, overwrite=True)
    except UserError as exc:
        return {"skipped": str(exc)}
    return {"path": str(target), "dtype": dtype, "bytes": target.stat().st_size}


def _result(ctx: BuildContext) -> dict[str, Any]:
    steps = ctx.state.data["stages"]
    method = steps["compress"]["steps"]["select"]["method"]
    chosen = next(c for c in ctx.state.data["candidates"] if c["method"] == method)
    held = steps["verify"]["steps"]["held-out"]
    eff = steps["verify"]["steps"]["evaluate"]["efficiency"]
    return {
        "method": method,
        "model_dir": str(ctx.out / "model"),
        "bits_per_byte": held["bits_per_byte"],
        "bits_per_byte_interval": held["bits_per_byte_interval"],
        "loss": held["loss"],
        "decode_ms_per_token": eff.get("decode_ms_per_token") or chosen["decode_ms_per_token"],
        "size_bytes": chosen["size_bytes"],
        "meets": chosen["meets"],
    }


def card_section(data: dict[str, Any]) -> str:
    """The build's figures as Markdown, appended to the generated model card."""
    plan, request = data["plan"], data["request"]
    train = data["stages"]["train"]["steps"]
    result = data["result"]
    low, high = plan["loss_interval"]
    blow, bhigh = result["bits_per_byte_interval"]
    lines = [
        "## How this model was built (`slm build`)",
        "",
        f"Budget {request['budget_seconds'] / 60:g} min on {request['device']}; targets: "
        + (f"decode <= {request['max_latency_ms']:g} ms/token" if request["max_latency_ms"] else "no latency target")
        + ", "
        + (f"size <= {request['max_size_bytes'] / 1e6:g} MB" if request["max_size_bytes"] else "no size target")
        + ".",
        "",
        "| figure | planned | measured |",
        "|---|---:|---:|",
        f"| val loss (nats/token, ladder windows) | {plan['predicted_loss']:.4f} [{low:.4f}, {high:.4f}] | "
        f"{train['evaluate']['val_loss']:.4f} |",
        f"| training tokens | {plan['tokens']:,} | {train['train']['tokens']:,} |",
        f"| training minutes | {plan['train_minutes']:.2f} | {train['train']['train_seconds'] / 60:.2f} |",
        f"| decode ms/token (batch 1) | {plan['predicted_decode_ms']:.2f} | {result['decode_ms_per_token']:.2f} |",
        f"| held-out bits/byte [95% CI] | {plan['predicted_bits_per_byte'] or math.nan:.4f} | "
        f"{result['bits_per_byte']:.4f} [{blow:.4f}, {bhigh:.4f}] |",
        f"| weights (MB) | | {result['size_bytes'] / 1e6:.3f} |",
        "",
        f"Shipped: {result['method']}. Compression candidates (held-out loss, size, decode):",
        "",
        "| method | loss | bits/byte | MB | ms/token | meets targets |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in data.get("candidates", []):
        ms = f"{c['decode_ms_per_token']:.2f}" if c["decode_ms_per_token"] is not None else "?"
        lines.append(
            f"| {c['method']} | {c['loss']:.4f} | {c['bits_per_byte']:.4f} | {c['size_bytes'] / 1e6:.3f} | {ms} | "
            f"{'yes' if all(c['meets'].values()) else 'no'} |"
        )
    planned = plan.get("stage_seconds", {})
    spent = sum(s["seconds"] for s in data["stages"].values())
    lines += ["", f"Time per stage (seconds; {spent:.1f} spent of the {request['budget_seconds']:g} s budget):", ""]
    lines.append("| | " + " | ".join(data["stages"]) + " |")
    lines.append("|---|" + "---:|" * len(data["stages"]))
    lines.append("| planned | " + " | ".join(f"{planned.get(n, math.nan):.1f}" for n in data["stages"]) + " |")
    lines.append("| spent | " + " | ".join(f"{s['seconds']:.1f}" for s in data["stages"].values()) + " |")
    lines += ["", "Decisions:", ""] + [f"- {d['stage']}: {d['decision']}" for d in data["decisions"]]
    return "\n".join(lines) + "\n"


def _card(ctx: BuildContext) -> dict[str, Any]:
    from slmkit.eval.card import write_card

    model_dir = ctx.out / "model"
    readme = model_dir / "README.md"
    readme.unlink(missing_ok=True)
    write_card(model_dir, ctx.work / "eval" / "report.json")
    readme.write_text(readme.read_text() + "\n" + card_section(ctx.state.data))
    shutil.copyfile(readme, ctx.out / "README.md")
    if (ctx.out / "hf").is_dir():
        shutil.copyfile(readme, ctx.out / "hf" / "README.md")
    return {"path": str(ctx.out / "README.md")}


def write_outputs(ctx: BuildContext) -> None:
    """report.html (plan vs actual, spend, candidates, evaluation) from the final build.json."""
    from slmkit.build.report import render_report
    from slmkit.eval.report import load_report

    evaluation = load_report(ctx.work / "eval" / "report.json")
    (ctx.out / "report.html").write_text(render_report(ctx.state.data, evaluation))
