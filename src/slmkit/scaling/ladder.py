"""Scaling ladders: train a grid of small models under one budget and record one JSON line per rung.

The grid follows the IsoFLOP design of Chinchilla (their approach 2): a few compute levels, a factor
`level_ratio` apart, and at each level every model size whose token count D = C / flops_per_token(N)
is at least `min_steps` optimizer steps. Sizes span at least a decade of non-embedding parameters, so
the rungs cover a range of tokens per parameter at every level; the levels are scaled so the whole
ladder spends the budget (FLOPs as the trainer counts them, or wall-clock minutes from a short
throughput probe of each size on this machine). Each rung is an ordinary training run (cosine schedule
matched to its own length, checkpoints, resume) under `LADDER/runs/NAME`, then evaluated on the same
evenly spaced windows of the data's val split, so rungs are comparable.

Files: `ladder.json` (the plan; the data and tokenizer hashes) and `ladder.jsonl` (one line per finished
rung). Running the same command again resumes: finished rungs are skipped, an unfinished one continues
from its last checkpoint.

A time budget (`--budget-minutes`) is planned from a throughput probe at the start, and a machine that gets
busier later would make the ladder overrun it. So after each rung the ladder compares the wall-clock time
its finished rungs took (training and evaluation) with what the plan predicted for them; once it runs more
than 10% behind, it re-plans the rungs not yet started (see :func:`replan_remaining`): at the pace seen so
far they must fit in the minutes left, so their token counts shrink by one common factor, a rung that
would fall under `min_steps` is dropped, and if that is still too much the costliest rungs are dropped. The
new plan is written to `ladder.json` (so a resume follows it), and its `budget` section records the budget,
the time spent, the time planned for the finished rungs and every re-plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slmkit.errors import UserError
from slmkit.scaling.fit import N_PARAMS
from slmkit.scaling.shapes import DEFAULT_MIXER, DEFAULT_SIZES, Shape, parse_mixer, shape_overrides, with_mixer

log = logging.getLogger(__name__)

PLAN_FILE = "ladder.json"
RESULTS_FILE = "ladder.jsonl"
PLAN_VERSION = 1
MIN_SPAN = 10.0  # largest / smallest non-embedding parameters
REPLAN_BEHIND = 1.10  # re-plan a time budget once finished rungs took this much longer than planned


@dataclass
class RungPlan:
    name: str
    width: int
    depth: int
    level: int  # compute level, 0 = smallest
    tokens: int  # training tokens (a whole number of steps)
    steps: int
    params: int  # non-embedding
    total_params: int
    flops_per_token: float
    lr: float
    warmup_steps: int
    predicted_seconds: float | None = None
    mixer: str = DEFAULT_MIXER  # mixer family (shapes.parse_mixer); plans from before families are attention

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token


@dataclass
class LadderSettings:
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3  # at width 128; scaled by 128 / width above it
    levels: int = 4
    level_ratio: float = 2.0
    min_steps: int = 20
    max_epochs: float = 4.0
    val_windows: int = 128
    seed: int = 1337
    device: str = "cpu"
    threads: int | None = None
    optimizer: str = "muon"  # the rungs' (TrainConfig.optimizer); a plan's run uses the fit's optimizer
    embed_lr_scale: float = 1.0  # the rungs' (TrainConfig.embed_lr_scale); a plan's run uses the fit's

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "levels", "min_steps", "val_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"ladder: {name} must be an integer >= 1, got {value!r}")
        if not self.level_ratio > 1:
            raise UserError(f"ladder: --level-ratio must be > 1, got {self.level_ratio}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"ladder: --lr must be a positive number, got {self.lr}")
        if not (self.embed_lr_scale > 0 and math.isfinite(self.embed_lr_scale)):
            raise UserError(f"ladder: embed_lr_scale must be a positive number, got {self.embed_lr_scale}")

    def recorded(self) -> dict:
        """The settings as a ladder's plan records them: embed_lr_scale only when not 1.0, so ladders planned
        before it existed resume with the same options."""
        out = asdict(self)
        if out["embed_lr_scale"] == 1.0:
            del out["embed_lr_scale"]
        return out

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def data_fingerprint(meta: dict[str, Any]) -> str:
    """Hash of what defines a prepared corpus (tokenizer, splits, sources), not of where it lives."""
    keys = ("sources", "text_field", "vocab_size", "tokenizer_sha256", "val_fraction", "splits", "eot_token_id")
    blob = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def rung_lr(base_lr: float, width: int) -> float:
    return base_lr * min(1.0, 128 / width)


def measure_train_throughput(shape: Shape, vocab_size: int, settings: LadderSettings, seconds: float = 1.0) -> float:
    """Training tokens per second of one size on this machine: optimizer steps timed for `seconds` (3 steps at
    least) after a warm-up of 2 steps and 0.25 s at least. The first steps of a process run slow: timed from the
    second step for 0.4 s, 64x2 (batch 16 x 256, 2-core EPYC) read 8.6k tokens/s against 23k over 2 s, 128x4 10.5k
    against 11.4k, and a planner reading such timings over-rates big models' FLOP/s."""
    import torch

    from slmkit.models import build_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import autocast_dtype
    from slmkit.train.losses import next_token_cross_entropy

    cfg = shape.config(vocab_size, settings.seq_len)
    model = build_model(cfg)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len + 1))

    # the dtype `slm train` picks for this shape here (bf16 autocast on CPUs with native bf16, wide enough models)
    amp = autocast_dtype(TrainConfig(), torch.device("cpu"), cfg.d_model)

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(x[:, :-1])
            loss = next_token_cross_entropy(logits, x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm, start = 0, time.perf_counter()
    while warm < 2 or time.perf_counter() - start < 0.25:
        step()
        warm += 1
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * settings.tokens_per_step / (time.perf_counter() - start)


def plan_rungs(
    sizes: list[Shape],
    vocab_size: int,
    settings: LadderSettings,
    budget_flops: float | None = None,
    budget_seconds: float | None = None,
    tokens_per_second: dict[str, float] | None = None,
    train_tokens: int | None = None,
) -> list[RungPlan]:
    """The IsoFLOP grid scaled to spend the budget (see the module docstring)."""
    if (budget_flops is None) == (budget_seconds is None):
        raise UserError("give exactly one ladder budget: --budget-flops or --budget-minutes")
    budget = budget_flops if budget_flops is not None else budget_seconds
    assert budget is not None
    if not (budget > 0 and math.isfinite(budget)):
        raise UserError(f"the ladder budget must be a positive number, got {budget}")
    configs = {s: s.config(vocab_size, settings.seq_len) for s in sizes}
    per_token = {s: c.flops_per_token(settings.seq_len) for s, c in configs.items()}
    min_tokens = settings.min_steps * settings.tokens_per_step
    max_tokens = settings.max_epochs * train_tokens if train_tokens else math.inf

    max_steps = int(max_tokens // settings.tokens_per_step) if math.isfinite(max_tokens) else None

    def grid(base: float, dedupe: bool = False) -> list[RungPlan]:
        """Rungs at base compute; a rung wanting more than `max_epochs` of the data is capped there (and
        dropped from the final plan when another level already has that size at the cap)."""
        rungs: list[RungPlan] = []
        seen: set[tuple[Shape, int]] = set()
        for level in range(settings.levels):
            compute = base * settings.level_ratio**level
            for s in sizes:
                steps = min(compute / per_token[s] // settings.tokens_per_step, 1e18)
                if max_steps is not None:
                    steps = min(steps, max_steps)
                steps = int(steps)
                tokens = steps * settings.tokens_per_step
                if tokens < min_tokens or (dedupe and (s, steps) in seen):
                    continue
                seen.add((s, steps))
                seconds = tokens / tokens_per_second[s.name] if tokens_per_second else None
                rungs.append(
                    RungPlan(
                        name=f"{s.name}-c{level}",
                        width=s.width,
                        depth=s.depth,
                        level=level,
                        tokens=tokens,
                        steps=steps,
                        params=configs[s].num_params(False),
                        total_params=configs[s].num_params(),
                        flops_per_token=per_token[s],
                        lr=rung_lr(settings.lr, s.width),
                        warmup_steps=max(1, min(100, steps // 10)),
                        predicted_seconds=seconds,
                        mixer=s.mixer,
                    )
                )
        return rungs

    def cost(rungs: list[RungPlan]) -> float:
        if budget_flops is not None:
            return sum(r.flops for r in rungs)
        return sum(r.predicted_seconds or 0.0 for r in rungs)

    # cost grows with the base compute (more tokens, and more sizes pass the minimum): bisect in log space
    low, high = 1.0, 1e30
    for _ in range(200):
        mid = math.sqrt(low * high)
        if cost(grid(mid)) <= budget:
            low = mid
        else:
            high = mid
        if high / low < 1.0001:
            break
    rungs = grid(low, dedupe=True)
    if len(rungs) < N_PARAMS + 2:
        smallest = min(sizes, key=lambda s: per_token[s])
        need = min_tokens * per_token[smallest]
        unit = "FLOPs" if budget_flops is not None else "minutes"
        shown = f"{budget:.3g}" if budget_flops is not None else f"{budget / 60:.3g}"
        raise UserError(
            f"a ladder budget of {shown} {unit} gives only {len(rungs)} rung(s) of at least {settings.min_steps} "
            f"steps (one step of the smallest size, {smallest.name}, costs "
            f"{need / settings.min_steps:.3g} FLOPs); the fit needs at least {N_PARAMS + 2}: raise the budget, "
            "pick smaller --sizes, or lower --batch-size / --seq-len"
            + (
                f" (or use more data: rungs stop at {settings.max_epochs:g} epochs of {train_tokens:,} tokens)"
                if train_tokens
                else ""
            )
        )
    return rungs


def replan_remaining(
    remaining: list[RungPlan],
    seconds_left: float,
    pace: float,
    settings: LadderSettings,
    fixed: frozenset[str] = frozenset(),
) -> list[RungPlan]:
    """The rungs not yet started, shrunk so that at `pace` (seconds taken / seconds planned so far) they fit
    in `seconds_left`.

    Every shrinkable rung's steps scale by one common factor; a rung left with fewer than `min_steps` steps
    is dropped; if the floors still leave too much, the costliest shrinkable rungs are dropped. Rungs named
    in `fixed` (already started in an earlier session: their checkpoints hold their length) keep theirs.
    """

    def cost(rungs: list[RungPlan]) -> float:
        return pace * sum(r.predicted_seconds or 0.0 for r in rungs)

    if cost(remaining) <= seconds_left:
        return remaining
    kept_fixed = [r for r in remaining if r.name in fixed]
    room = max(seconds_left - cost(kept_fixed), 0.0)
    shrinkable = [r for r in remaining if r.name not in fixed]
    scale = room / max(cost(shrinkable), 1e-12)
    shrunk: list[RungPlan] = []
    for r in shrinkable:
        steps = min(r.steps, int(r.steps * scale))
        if steps < settings.min_steps:
            continue
        shrunk.append(
            replace(
                r,
                steps=steps,
                tokens=steps * settings.tokens_per_step,
                warmup_steps=max(1, min(100, steps // 10)),
                predicted_seconds=(r.predicted_seconds or 0.0) * steps / r.steps,
            )
        )
    while shrunk and cost(shrunk) > room:
        shrunk.remove(max(shrunk, key=lambda r: r.predicted_seconds or 0.0))
    keep = {r.name: r for r in kept_fixed + shrunk}
    return [keep[r.name] for r in remaining if r.name in keep]


def choose_sizes(
    vocab_size: int, settings: LadderSettings, count: int = 5, mixer: str = DEFAULT_MIXER, **budget: Any
) -> list[Shape]:
    """The largest window of `count` default sizes (a decade or more) whose ladder keeps every size in
    at least two compute levels; the smallest window when none does."""
    sizes = with_mixer(DEFAULT_SIZES, mixer)
    windows = [sizes[i : i + count] for i in range(len(sizes) - count + 1)]
    for window in reversed(windows):
        try:
            rungs = plan_rungs(window, vocab_size, settings, **budget)
        except UserError:
            continue
        counts = {s.name: sum(r.width == s.width and r.depth == s.depth for r in rungs) for s in window}
        if min(counts.values()) >= 2:
            return window
    return windows[0]


# ---- running ----------------------------------------------------------------------------------------
def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; that rung runs again
            if isinstance(record, dict) and "name" in record:
                done[record["name"]] = record
    return done


def evaluate_rung(final_dir: Path, data: Any, settings: LadderSettings) -> tuple[float, float, int]:
    """Loss (nats/token) and bits per byte on the same evenly spaced val windows for every rung."""
    from slmkit.eval.perplexity import token_nats
    from slmkit.interop.checkpoint import load_model

    model = load_model(final_dir, device=_device(settings))
    nats, count = token_nats(model, data.val, settings.seq_len, batch_size=16, max_windows=settings.val_windows)
    loss = nats / count
    return loss, loss / math.log(2) / data.bytes_per_token("val"), count


def _device(settings: LadderSettings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LadderResult:
    out: Path
    records: list[dict[str, Any]]
    interrupted: bool
    plan: dict[str, Any]

    @property
    def budget(self) -> dict[str, Any]:
        """Budget vs spent (and the re-plans of a time budget); also in ladder.json."""
        return self.plan.get("budget", {})


def run_ladder(
    data_dir: str | Path,
    out: str | Path,
    budget_flops: float | None = None,
    budget_minutes: float | None = None,
    sizes: list[Shape] | None = None,
    settings: LadderSettings | None = None,
    progress: bool = False,
    clock: Callable[[], float] = time.monotonic,
    mixer: str | None = None,
) -> LadderResult:
    """Plan (or reload) a ladder in `out` and train its unfinished rungs; see the module docstring.

    `clock` (seconds) times the rungs against a time budget. `mixer` is the mixer family of every rung
    (shapes.parse_mixer; default attention); the plan and every rung record name it.
    """
    mixer = parse_mixer(mixer)
    if sizes is not None:
        sizes = with_mixer(sizes, mixer)
    from slmkit.data.shards import load_data_dir

    settings = settings or LadderSettings()
    out = Path(out)
    data = load_data_dir(data_dir)
    if len(data.val) < settings.seq_len + 1:
        raise UserError(
            f"{data_dir}: the val split has {len(data.val)} tokens, fewer than one window of {settings.seq_len + 1}; "
            "prepare the data with a larger --val-fraction"
        )
    fingerprint = data_fingerprint(data.meta)
    request = {
        "budget_flops": budget_flops,
        "budget_minutes": budget_minutes,
        "sizes": [s.name for s in sizes] if sizes else None,
        "settings": settings.recorded(),
    }
    if mixer != DEFAULT_MIXER:  # absent for attention, so ladders planned before families still resume
        request["mixer"] = mixer
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        plan = read_plan(plan_path)
        if plan.get("data_fingerprint") != fingerprint:
            raise UserError(
                f"{out} holds a ladder trained on different data or a different tokenizer than {data_dir} "
                f"(data fingerprint {plan.get('data_fingerprint', '?')[:12]} vs {fingerprint[:12]}); "
                "resume it with its own data dir or use a new --out"
            )
        if plan.get("request") != request:
            raise UserError(
                f"{out} holds a ladder planned with other options ({_describe_request(plan.get('request'))}); "
                "repeat those options to resume it, or use a new --out"
            )
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not a ladder directory (no {PLAN_FILE}); choose a new --out")
        plan = _make_plan(data, fingerprint, request, sizes, settings, budget_flops, budget_minutes, progress, mixer)
        out.mkdir(parents=True, exist_ok=True)
        _write_plan(plan_path, plan)
    rungs = [RungPlan(**r) for r in plan["rungs"]]
    return _train_rungs(data, out, plan, rungs, settings, progress, clock)


def read_plan(path: Path) -> dict[str, Any]:
    """A ladder's ladder.json; UserError naming the file when it is corrupt."""
    try:
        plan = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: not JSON or not UTF-8
        raise UserError(f"{path}: cannot read the ladder plan ({exc}); re-run `slm ladder` into a new --out") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("rungs"), list):
        raise UserError(f"{path}: not a ladder plan (no list of rungs); re-run `slm ladder` into a new --out")
    return plan


def _write_plan(path: Path, plan: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(tmp, path)


def _describe_request(request: Any) -> str:
    if not isinstance(request, dict):
        return "unknown"
    parts = []
    if request.get("budget_flops") is not None:
        parts.append(f"--budget-flops {request['budget_flops']:g}")
    if request.get("budget_minutes") is not None:
        parts.append(f"--budget-minutes {request['budget_minutes']:g}")
    if request.get("sizes"):
        parts.append(f"--sizes {','.join(request['sizes'])}")
    if request.get("mixer"):
        parts.append(f"--mixer {request['mixer']}")
    return " ".join(parts) or "default options"


def _make_plan(
    data, fingerprint, request, sizes, settings, budget_flops, budget_minutes, progress, mixer=DEFAULT_MIXER
) -> dict[str, Any]:
    vocab = data.vocab_size
    if sizes is not None:
        spans = [s.config(vocab, settings.seq_len).num_params(False) for s in sizes]
        if max(spans) / min(spans) < MIN_SPAN:
            raise UserError(
                f"--sizes span only {max(spans) / min(spans):.1f}x in non-embedding parameters "
                f"({min(spans):,} to {max(spans):,}); a ladder needs at least {MIN_SPAN:g}x"
            )
    throughput = None
    budget: dict[str, Any] = {"budget_flops": budget_flops, "train_tokens": len(data.train)}
    if budget_minutes is not None:
        if not (budget_minutes > 0 and math.isfinite(budget_minutes)):
            raise UserError(f"--budget-minutes must be a positive number, got {budget_minutes}")
        throughput = _probe_sizes(sizes or with_mixer(DEFAULT_SIZES, mixer), vocab, settings, progress)
        budget = {
            "budget_seconds": budget_minutes * 60,
            "tokens_per_second": throughput,
            "train_tokens": len(data.train),
        }
    elif budget_flops is None:
        raise UserError("give a ladder budget: --budget-flops or --budget-minutes")
    chosen = sizes or choose_sizes(vocab, settings, mixer=mixer, **budget)
    rungs = plan_rungs(chosen, vocab, settings, **budget)
    return {
        "version": PLAN_VERSION,
        "request": request,
        "data_dir": str(Path(data.path).resolve()),
        "data_fingerprint": fingerprint,
        "tokenizer_sha256": data.meta.get("tokenizer_sha256"),
        "vocab_size": vocab,
        "mixer": mixer,
        "sizes": [s.name for s in chosen],
        "tokens_per_second": throughput,
        "rungs": [asdict(r) for r in rungs],
        "total_flops": sum(r.flops for r in rungs),
        "params_definition": "non-embedding parameters",
    }


def _probe_sizes(sizes: list[Shape], vocab: int, settings: LadderSettings, progress: bool) -> dict[str, float]:
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"measuring training throughput of {len(sizes)} sizes on this machine ...")
    return {s.name: measure_train_throughput(s, vocab, settings) for s in sizes}


def _budget_summary(plan: dict[str, Any], rungs: list[RungPlan], done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Budget vs spent over the finished rungs (wall-clock seconds: training plus evaluation)."""
    request = plan.get("request", {})
    finished = [r for r in rungs if r.name in done]
    summary = dict(plan.get("budget", {}))
    summary["finished_rungs"] = len(finished)
    summary["spent_flops"] = sum(done[r.name].get("flops", 0.0) for r in finished)
    summary["spent_seconds"] = sum(done[r.name].get("wall_seconds", done[r.name].get("seconds", 0.0)) for r in finished)
    if request.get("budget_minutes") is not None:
        summary["budget_seconds"] = request["budget_minutes"] * 60
        summary["planned_seconds"] = sum(r.predicted_seconds or 0.0 for r in finished)
    if request.get("budget_flops") is not None:
        summary["budget_flops"] = request["budget_flops"]
    summary.setdefault("replans", [])
    return summary


def _maybe_replan(
    plan: dict[str, Any], rungs: list[RungPlan], done: dict[str, dict[str, Any]], settings: LadderSettings, out: Path
) -> list[RungPlan]:
    """After a rung: the rungs to run from now on (see the module docstring); updates `plan["budget"]`."""
    budget = plan["budget"] = _budget_summary(plan, rungs, done)
    if "budget_seconds" not in budget or budget["planned_seconds"] <= 0:
        return rungs
    pace = budget["spent_seconds"] / budget["planned_seconds"]
    if pace <= REPLAN_BEHIND:
        return rungs
    remaining = [r for r in rungs if r.name not in done]
    started = frozenset(r.name for r in remaining if (out / "runs" / r.name).exists())
    seconds_left = budget["budget_seconds"] - budget["spent_seconds"]
    new = replan_remaining(remaining, seconds_left, pace, settings, fixed=started)
    if new == remaining:
        return rungs
    kept = {r.name: r for r in new}
    event = {
        "after_rungs": budget["finished_rungs"],
        "spent_seconds": budget["spent_seconds"],
        "planned_seconds": budget["planned_seconds"],
        "seconds_left": seconds_left,
        "pace": pace,
        "dropped": [r.name for r in remaining if r.name not in kept],
        "shrunk": {r.name: [r.tokens, kept[r.name].tokens] for r in remaining if r.name in kept and kept[r.name] != r},
    }
    budget["replans"].append(event)
    log.warning(
        "ladder: %.0f s spent on rungs planned for %.0f s (%.2fx slower than the probe); re-planned the "
        "rest to fit the %.0f s left: %d rung(s) dropped, %d shortened",
        budget["spent_seconds"],
        budget["planned_seconds"],
        pace,
        seconds_left,
        len(event["dropped"]),
        len(event["shrunk"]),
    )
    rungs = [r for r in rungs if r.name in done] + new
    plan["rungs"] = [asdict(r) for r in rungs]
    plan["total_flops"] = sum(r.flops for r in rungs)
    return rungs


def _train_rungs(
    data,
    out: Path,
    plan: dict[str, Any],
    rungs: list[RungPlan],
    settings,
    progress,
    clock: Callable[[], float] = time.monotonic,
) -> LadderResult:
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    results_path = out / RESULTS_FILE
    done = _read_results(results_path)
    records = [done[r.name] for r in rungs if r.name in done]
    reporter = LadderReporter(rungs, set(done), enabled=progress)
    interrupted = False
    try:
        while queue := [r for r in rungs if r.name not in done]:
            rung = queue[0]
            started = clock()
            run_dir = out / "runs" / rung.name
            cfg = TrainConfig(
                preset="tiny",
                model=shape_overrides(rung.width, rung.depth, settings.seq_len, rung.mixer),
                batch_size=settings.batch_size,
                seq_len=settings.seq_len,
                lr=rung.lr,
                warmup_steps=rung.warmup_steps,
                schedule="cosine",
                max_tokens=rung.tokens,
                eval_interval=10**9,
                eval_batches=1,
                save_interval=max(10, rung.steps // 4),
                keep_checkpoints=1,
                seed=settings.seed,
                device=settings.device,
                threads=settings.threads,
                optimizer=settings.optimizer,  # type: ignore[arg-type]  # checked by TrainConfig
                embed_lr_scale=settings.embed_lr_scale,
            )
            from slmkit.interop.checkpoint import WEIGHTS, latest_checkpoint

            final = run_dir / "final"
            reporter.begin(rung)
            if (final / WEIGHTS).is_file() and (final / "trainer_state.json").is_file():
                state = json.loads((final / "trainer_state.json").read_text())
                step, tokens, flops, seconds = state["step"], state["tokens"], state["flops"], state["elapsed"]
                started -= seconds  # trained in an earlier session: its training time still counts
            else:
                resume = latest_checkpoint(run_dir) is not None
                # a rung killed before its first checkpoint left only metrics and config: start it again
                result = train(cfg, data.path, run_dir, resume=resume, reporter=reporter, overwrite=not resume)
                if result.stop_reason == "interrupted":
                    interrupted = True
                    break
                step, tokens, flops, seconds = result.step, result.tokens, result.flops, result.seconds
            loss, bpb, val_tokens = evaluate_rung(final, data, settings)
            record = {
                "name": rung.name,
                "width": rung.width,
                "depth": rung.depth,
                "mixer": rung.mixer,
                "level": rung.level,
                "params": rung.params,
                "params_definition": "non-embedding",
                "total_params": rung.total_params,
                "tokens": tokens,
                "flops": flops,
                "flops_per_token": rung.flops_per_token,
                "steps": step,
                "val_loss": loss,
                "bits_per_byte": bpb,
                "val_tokens": val_tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds > 0 else None,
                "epochs": tokens / max(len(data.train), 1),
                "lr": rung.lr,
                "seq_len": settings.seq_len,
                "batch_size": settings.batch_size,
                "data_dir": plan["data_dir"],
                "data_fingerprint": plan["data_fingerprint"],
                "tokenizer_sha256": plan["tokenizer_sha256"],
                "device": settings.device,
                "wall_seconds": clock() - started,  # training and evaluation, as the time budget counts it
            }
            with results_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            records.append(record)
            done[rung.name] = record
            reporter.finish(rung, record)
            replanned = _maybe_replan(plan, rungs, done, settings, out)
            if replanned is not rungs:
                rungs = replanned
                reporter.set_rungs(rungs)
            _write_plan(out / PLAN_FILE, plan)
    finally:
        reporter.close()
    plan["budget"] = _budget_summary(plan, rungs, done)
    return LadderResult(out=out, records=records, interrupted=interrupted, plan=plan)


class LadderReporter:
    """Trainer reporter that draws the ladder as a whole: one bar over all rungs' FLOPs, one line of status."""

    def __init__(self, rungs: list[RungPlan], done: set[str], enabled: bool) -> None:
        self.rungs = rungs
        self.total = sum(r.flops for r in rungs)
        self.finished = sum(r.flops for r in rungs if r.name in done)
        self.count_done = sum(r.name in done for r in rungs)
        self.current: RungPlan | None = None
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.console = Console(stderr=True, highlight=False)
            self.progress = Progress(
                TextColumn("[bold]ladder[/]"),
                BarColumn(bar_width=24),
                TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("ladder", total=self.total, completed=self.finished, status="")

    def _update(self, fraction: float, status: str) -> None:
        if self.progress is not None and self.current is not None:
            done = self.finished + fraction * self.current.flops
            self.progress.update(self.task, completed=done, status=status)

    def set_rungs(self, rungs: list[RungPlan]) -> None:
        """A re-planned ladder: the bar's total follows the new plan."""
        self.rungs = rungs
        self.total = self.finished + sum(r.flops for r in rungs[self.count_done :])
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)

    def begin(self, rung: RungPlan) -> None:
        self.current = rung
        self._status = f"rung {self.count_done + 1}/{len(self.rungs)} {rung.name} ({rung.params:,} params)"
        self._update(0.0, self._status)

    def finish(self, rung: RungPlan, record: dict[str, Any]) -> None:
        self.finished += rung.flops
        self.count_done += 1
        if self.progress is not None:
            self.progress.console.print(
                f"{rung.name:>10}  N={rung.params:>10,}  D={record['tokens']:>11,}  C={record['flops']:.3g}  "
                f"val {record['val_loss']:.4f} ({record['bits_per_byte']:.3f} bpb)  {record['seconds']:.0f} s"
            )
        self._update(0.0, self._status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    # trainer Reporter protocol
    def start(self, info: dict[str, Any]) -> None:
        pass

    def step(self, m: dict[str, Any]) -> None:
        self._update(float(m["progress"]), f"{self._status} step {m['step']} loss {m['loss']:.3f}")

    def eval(self, m: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            log.info(text)

    def end(self, result: Any) -> None:
        pass
