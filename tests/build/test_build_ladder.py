"""The ladder `slm build` runs (rung settings and sizes for its budget) and the run it plans from it."""

from __future__ import annotations

from slmkit.build.stages import LADDER_BATCH, LADDER_MIN_STEPS, ladder_design, run_settings
from slmkit.scaling.fit import N_PARAMS
from slmkit.scaling.ladder import MIN_SPAN, plan_rungs

VOCAB, TRAIN_TOKENS = 4096, 3_310_348  # builtin:pystdlib prepared as the build does (4096-token BPE, 5% val)
TEN_MINUTES_FLOPS = 2.39e12  # what the 10-minute builds of docs/build.md gave their ladder


def test_a_ten_minute_build_ladders_at_batch_4_with_rungs_of_30_steps_or_more():
    """The design benchmarks/ladder_predict.py measured (docs/build.md): rungs of 14-30 steps at batch 16 sit in
    the first steps' plateau and made the law ~25% pessimistic at the planned run."""
    run = run_settings(fast=False)
    settings, sizes = ladder_design(run, False, VOCAB, TEN_MINUTES_FLOPS, TRAIN_TOKENS, "attention")
    assert (run.batch_size, settings.batch_size) == (16, LADDER_BATCH) == (16, 4)
    assert settings.min_steps == LADDER_MIN_STEPS[0] == 30
    assert (settings.seq_len, settings.lr, settings.val_windows) == (run.seq_len, run.lr, run.val_windows)
    rungs = plan_rungs(sizes, VOCAB, settings, budget_flops=TEN_MINUTES_FLOPS, train_tokens=TRAIN_TOKENS)
    assert len(rungs) >= N_PARAMS + 2
    assert min(r.steps for r in rungs) >= 30
    assert max(r.params for r in rungs) / min(r.params for r in rungs) >= MIN_SPAN
    assert sum(r.flops for r in rungs) <= TEN_MINUTES_FLOPS
    for s in sizes:  # every size in two compute levels
        assert sum((r.width, r.depth) == (s.width, s.depth) for r in rungs) >= 2


def test_a_smaller_budget_lowers_the_step_floor_rather_than_failing():
    run = run_settings(fast=False)
    flops = TEN_MINUTES_FLOPS / 6
    settings, sizes = ladder_design(run, False, VOCAB, flops, TRAIN_TOKENS, "attention")
    assert settings.min_steps < LADDER_MIN_STEPS[0]
    rungs = plan_rungs(sizes, VOCAB, settings, budget_flops=flops, train_tokens=TRAIN_TOKENS)
    assert len(rungs) >= N_PARAMS + 2 and min(r.steps for r in rungs) >= settings.min_steps


def test_a_short_build_ladders_at_its_own_settings():
    run = run_settings(fast=True)
    settings, _ = ladder_design(run, True, VOCAB, TEN_MINUTES_FLOPS / 20, TRAIN_TOKENS, "attention")
    assert settings == run
