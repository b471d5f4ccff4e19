"""A time-budgeted ladder re-plans when the machine runs slower than its start-up probe said."""

from __future__ import annotations

import json

import pytest
from scaling_helpers import TINY_SIZES, tiny_ladder_fixture, tiny_settings  # noqa: F401

import slmkit.scaling.ladder as ladder_module
from slmkit.scaling.ladder import RungPlan, replan_remaining, run_ladder
from slmkit.scaling.shapes import parse_sizes


def rung(name: str, steps: int, seconds: float) -> RungPlan:
    return RungPlan(
        name=name,
        width=32,
        depth=1,
        level=0,
        tokens=steps * 128,
        steps=steps,
        params=1000,
        total_params=2000,
        flops_per_token=1e4,
        lr=1e-2,
        warmup_steps=1,
        predicted_seconds=seconds,
    )


def test_on_pace_keeps_the_plan():
    settings = tiny_settings()  # 128 tokens per step, min_steps 3
    rungs = [rung("a", 10, 1.0), rung("b", 20, 2.0)]
    assert replan_remaining(rungs, seconds_left=3.0, pace=1.0, settings=settings) == rungs
    assert replan_remaining(rungs, seconds_left=6.0, pace=2.0, settings=settings) == rungs


def test_behind_shrinks_by_one_factor_and_drops_short_rungs():
    settings = tiny_settings()
    rungs = [rung("a", 10, 1.0), rung("b", 40, 4.0), rung("c", 100, 10.0)]
    new = replan_remaining(rungs, seconds_left=15.0, pace=3.0, settings=settings)  # 45 s of work for 15 s
    assert [r.name for r in new] == ["a", "b", "c"]
    assert [r.steps for r in new] == [3, 13, 33]  # a third of the steps, rounded down
    for r in new:
        assert r.tokens == r.steps * settings.tokens_per_step
        assert r.predicted_seconds == pytest.approx({"a": 0.3, "b": 1.3, "c": 3.3}[r.name])
    assert 3.0 * sum(r.predicted_seconds for r in new) <= 15.0
    fewer = replan_remaining(rungs, seconds_left=6.0, pace=3.0, settings=settings)  # 2/15: "a" under min_steps
    assert [(r.name, r.steps) for r in fewer] == [("b", 5), ("c", 13)]


def test_started_rungs_keep_their_length_and_costliest_go_first():
    settings = tiny_settings()
    rungs = [rung("a", 10, 1.0), rung("b", 40, 4.0), rung("c", 100, 10.0)]
    new = replan_remaining(rungs, seconds_left=10.0, pace=1.0, settings=settings, fixed=frozenset({"c"}))
    assert [(r.name, r.steps) for r in new] == [("c", 100)]  # c fills the time left; a and b are dropped
    assert replan_remaining(rungs, seconds_left=0.0, pace=5.0, settings=settings) == []


class SlowClock:
    """Each reading is `per_call` seconds after the last: every rung takes `per_call` seconds."""

    def __init__(self, per_call: float) -> None:
        self.now, self.per_call = 0.0, per_call

    def __call__(self) -> float:
        self.now += self.per_call
        return self.now


def test_slow_machine_replans_and_reports_spent_vs_budget(data_dir, tmp_path, monkeypatch):
    # the probe says 1,000 tokens/s for every size, so the plan is the same on any machine
    monkeypatch.setattr(ladder_module, "measure_train_throughput", lambda *a, **k: 1000.0)
    budget_minutes = 0.5
    out = tmp_path / "ladder"
    result = run_ladder(
        data_dir,
        out,
        budget_minutes=budget_minutes,
        sizes=parse_sizes(TINY_SIZES),
        settings=tiny_settings(),
        clock=SlowClock(4.0),  # the machine got busy: every rung takes 4 s, far beyond its plan
    )
    assert not result.interrupted
    planned = json.loads((out / "ladder.json").read_text())
    budget = planned["budget"]
    assert budget == result.budget
    assert budget["budget_seconds"] == budget_minutes * 60
    assert budget["replans"], "the ladder fell behind its plan and should have re-planned"
    first = budget["replans"][0]
    assert first["after_rungs"] == 1 and first["pace"] > 1.1
    assert first["dropped"] or first["shrunk"]
    # it stops within one rung of the budget instead of running the whole original plan
    assert budget["spent_seconds"] == pytest.approx(4.0 * len(result.records))
    assert budget["spent_seconds"] <= budget["budget_seconds"] + 4.0
    assert [r["name"] for r in result.records] == [r["name"] for r in planned["rungs"]]
    records = [json.loads(x) for x in (out / "ladder.jsonl").read_text().splitlines()]
    assert all(r["wall_seconds"] == pytest.approx(4.0) for r in records)


def test_flop_budget_reports_spent_flops(tiny_ladder):
    budget = json.loads((tiny_ladder / "ladder.json").read_text())["budget"]
    records = [json.loads(x) for x in (tiny_ladder / "ladder.jsonl").read_text().splitlines()]
    assert budget["spent_flops"] == pytest.approx(sum(r["flops"] for r in records))
    assert budget["spent_flops"] <= budget["budget_flops"] and budget["replans"] == []
