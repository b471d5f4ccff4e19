"""`slm build`: from a budget and targets to a measured, shipped model, in stages that each resume.

Stages (each a list of steps; a finished step is recorded in OUT/build.json before the next one starts):

1. data     use a prepared data dir as it is, or prepare the sources into OUT/work/data.
2. plan     measure this machine (`build.machine`); refuse infeasible targets (the smallest model the planner
            may pick is too slow or too big even compressed) before any training; time the post-training work on
            a tiny model (`build.costs`) and refuse a budget that cannot hold it; run a small ladder within
            LADDER_SHARE of the budget (or use `--fit` ladders); `scaling.planner.plan` picks shape and tokens
            for what the budget leaves after the work so far and the reserved post-training work.
3. train    `train.loop.train` with the plan's config (the ladder's recipe, so the predicted loss applies), stopped
            by the deadline the reservation leaves (not in a `--machine` replay); a killed run resumes from its
            last checkpoint through the loop's own resume.
4. compress only when the float model misses a target: int8, int4 and GPTQ int4 through
            `compress.pipeline.compress`, each measured (held-out loss, decode latency, size); the candidate
            with the least loss among those meeting the targets is kept.
5. verify   held-out bits per byte with a bootstrap interval, `eval.runner.run_eval` (tasks, contamination of
            the tasks against the training data, efficiency in a fresh process).
6. ship     OUT/model (what slmkit loads), OUT/hf (transformers), OUT/model.gguf, the model card (README.md),
            OUT/build.json and OUT/report.html.

Each stage's wall-clock spend is added to build.json as it goes, next to its planned seconds (the plan's
`stage_seconds`); compress and verify shrink their work when the budget left is short (not in a replay).
`SLMKIT_BUILD_STOP_AFTER=STAGE` (or `train:STEP`, or `STAGE:STEP`) stops a build after that point, as a kill
would: tests use it to check resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmkit.build.options import STOP_ENV, BuildRequest, BuildStopped
from slmkit.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "build.json"
STATE_VERSION = 1
STAGES = ("data", "plan", "train", "compress", "verify", "ship")
__all__ = ["STAGES", "BuildRequest", "BuildStopped", "build", "summary_lines"]


# ---- state --------------------------------------------------------------------------------------------
class BuildState:
    """build.json: the request, the machine, the plan, each stage's finished steps, spend and decisions."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out = out
        self.data = data

    @property
    def path(self) -> Path:
        return self.out / STATE_FILE

    @classmethod
    def new(cls, out: Path, request: BuildRequest) -> BuildState:
        stages = {name: {"done": False, "steps": {}, "seconds": 0.0, "sessions": 0} for name in STAGES}
        data = {
            "version": STATE_VERSION,
            "request": request.to_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": stages,
            "decisions": [],
        }
        return cls(out, data)

    @classmethod
    def load(cls, out: Path) -> BuildState:
        path = out / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"--resume: {out} holds no {STATE_FILE}; start the build without --resume") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the build state ({exc}); start again with --overwrite") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION or "stages" not in data:
            raise UserError(f"{path}: not a build state of this slmkit; start again with --overwrite")
        return cls(out, data)

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"][name]

    def step_done(self, stage: str, step: str) -> bool:
        return step in self.stage(stage)["steps"]

    def step_result(self, stage: str, step: str) -> Any:
        return self.stage(stage)["steps"][step]

    def decide(self, stage: str, text: str) -> None:
        self.data["decisions"].append({"stage": stage, "decision": text})

    def spent_seconds(self) -> float:
        return sum(s["seconds"] for s in self.data["stages"].values())


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, tuple | set):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


class _Stages:
    """Runs steps of stages, records their results and spend, and honours the stop hook."""

    def __init__(self, state: BuildState, stop_after: str | None, say: Callable[[str], None]) -> None:
        self.state = state
        self.stop_after = stop_after
        self.say = say
        self.current: str | None = None
        self.started = 0.0

    def begin(self, stage: str) -> bool:
        """True when the stage still has work; starts its clock."""
        info = self.state.stage(stage)
        if info["done"]:
            return False
        self.current, self.started = stage, time.perf_counter()
        info["sessions"] += 1
        self.state.save()
        return True

    def tick(self) -> None:
        """Adds the time since the last tick to the current stage's spend and saves."""
        if self.current is None:
            return
        now = time.perf_counter()
        self.state.stage(self.current)["seconds"] += now - self.started
        self.started = now
        self.state.save()

    def step(self, stage: str, name: str, fn: Callable[[], Any]) -> Any:
        if self.state.step_done(stage, name):
            return self.state.step_result(stage, name)
        result = fn()
        self.state.stage(stage)["steps"][name] = result
        self.tick()
        self._maybe_stop(f"{stage}:{name}")
        return result

    def end(self, stage: str) -> None:
        self.state.stage(stage)["done"] = True
        self.tick()
        self.current = None
        self._maybe_stop(stage)

    def _maybe_stop(self, point: str) -> None:
        if self.stop_after and self.stop_after == point:
            raise BuildStopped(f"stopped after {point} ({STOP_ENV})")


# ---- the build ----------------------------------------------------------------------------------------
def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an existing --out unless resuming or overwriting, before any work."""
    from slmkit.interop.outputs import check_output

    if resume and overwrite:
        raise UserError("--resume continues the build in --out and --overwrite replaces it: choose one")
    if resume:
        if not (out / STATE_FILE).is_file():
            raise UserError(f"--resume: {out} holds no {STATE_FILE}; start the build without --resume")
        return
    exists = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if exists and not overwrite:
        raise UserError(
            f"--out {out}: already exists; pass --resume to continue the build in it or --overwrite to replace it"
        )
    check_output(out, "dir", overwrite=overwrite)
    if exists and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build(
    request: BuildRequest,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    machine: dict[str, Any] | None = None,
    console: Any = None,
    stop_after: str | None = None,
    train_reporter: Any = None,
    startup_seconds: float = 0.0,
) -> dict[str, Any]:
    """Plan, train, compress, verify and ship a model within `request.budget_seconds`; see the module docstring.

    machine: a profile (`build.machine`) to plan from instead of measuring this machine (a replay). console: a
    rich Console for progress lines (logging when None). stop_after: the stop hook (default: $SLMKIT_BUILD_STOP_AFTER).
    startup_seconds: wall time the caller spent before this call (the CLI: its process start-up, `process_age`),
    added to the data stage's spend so that the budget counts the whole command.
    Returns build.json's contents."""
    from slmkit.build import stages

    out = Path(out)
    sources = request.data
    if not (len(sources) == 1 and (Path(sources[0]) / "meta.json").is_file()):
        from slmkit.data.sources import resolve_sources

        resolve_sources(sources)  # a missing file fails here, before --out is touched
    prepare_out(out, resume, overwrite)
    if resume:
        state = BuildState.load(out)
        if state.data["request"] != request.to_dict():
            old = BuildRequest(**state.data["request"])
            changed = [k for k, v in request.to_dict().items() if old.to_dict().get(k) != v]
            raise UserError(
                f"--resume: {out} holds a build asked with other options ({', '.join(changed)} differ); repeat the "
                "first command's options with --resume, or start a new build"
            )
    else:
        state = BuildState.new(out, request)
        if machine is not None:
            from slmkit.build.machine import check_profile

            # a copy: the build adds the post-training costs it times to its profile, not to the caller's
            state.data["machine"] = json.loads(json.dumps(check_profile(machine, "--machine")))
            state.data["machine_replayed"] = True
            state.decide("plan", "machine measurements replayed from --machine (no timing here)")
        state.save()

    def say(text: str) -> None:
        if console is not None:
            console.print(text)
        else:
            log.info(text)

    if request.threads is not None:
        import torch

        torch.set_num_threads(request.threads)
    runner = _Stages(state, stop_after if stop_after is not None else os.environ.get(STOP_ENV), say)
    state.stage("data")["seconds"] += max(startup_seconds, 0.0)
    context = stages.BuildContext(request=request, out=out, state=state, runner=runner, say=say, console=console)
    context.train_reporter = train_reporter
    try:
        for index, name in enumerate(STAGES, 1):
            if console is not None:
                console.rule(f"[bold]{index}/{len(STAGES)} {name}")
            if not runner.begin(name):
                say(f"{name}: done in an earlier session")
                continue
            try:
                getattr(stages, f"stage_{name}")(context)
            finally:
                runner.tick()
            runner.end(name)
            say(_spend_line(state.data, name))
    except UserError:
        # refused before anything worth keeping (no ladder, no training): leave no --out that a corrected command
        # would then have to --overwrite
        if not resume and not state.step_done("plan", "ladder"):
            shutil.rmtree(out, ignore_errors=True)
        raise
    state.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state.data["spent_seconds"] = state.spent_seconds()
    state.save()
    return state.data


def _planned(data: dict[str, Any], name: str) -> float | None:
    return (data.get("plan") or {}).get("stage_seconds", {}).get(name)


def _spend_line(data: dict[str, Any], name: str) -> str:
    spent = data["stages"][name]["seconds"]
    planned = _planned(data, name)
    total = sum(s["seconds"] for s in data["stages"].values())
    budget = data["request"]["budget_seconds"]
    plan_text = f"planned {planned:.1f} s, " if planned is not None else ""
    return f"{name}: {plan_text}spent {spent:.1f} s; the build has spent {total:.1f} of its {budget:.0f} s budget"


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown): the CLI's start-up, which the budget
    of `slm build` counts."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def summary_lines(data: dict[str, Any]) -> list[str]:
    """Lines for the terminal at the end of a build: planned and spent seconds per stage, total against the
    budget, the result."""
    budget = data["request"]["budget_seconds"]
    spent = data.get("spent_seconds", 0)
    lines = [f"budget {budget / 60:.1f} min; spent {spent / 60:.2f} min ({spent / budget:.0%} of the budget)"]
    lines.append(f"  {'stage':<9} {'planned':>9} {'spent':>9}")
    for name in STAGES:
        s = data["stages"][name]["seconds"]
        planned = _planned(data, name)
        text = f"{planned:7.1f} s" if planned is not None else f"{'-':>9}"
        lines.append(f"  {name:<9} {text} {s:7.1f} s  ({s / budget:5.1%} of the budget)")
    result = data.get("result", {})
    if result:
        lines.append(
            f"shipped {result.get('method')}: val {result.get('bits_per_byte', math.nan):.4f} bits/byte "
            f"[{result.get('bits_per_byte_interval', [math.nan, math.nan])[0]:.4f}, "
            f"{result.get('bits_per_byte_interval', [math.nan, math.nan])[1]:.4f}], "
            f"{result.get('decode_ms_per_token', math.nan):.2f} ms/token, {result.get('size_bytes', 0) / 1e6:.2f} MB"
        )
    return lines
