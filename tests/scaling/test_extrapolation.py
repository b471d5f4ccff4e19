"""The planner's interval widened for extrapolation in compute (fit.extrapolation_check / FitResult.predict_far)."""

from __future__ import annotations

import math

import pytest

from slmkit.scaling.fit import Law, analyse, extrapolation_check, extrapolation_width, rungs_from_records

KNOWN = Law(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
SIZES = (2.5e4, 8.6e4, 1.7e5, 4.4e5)  # non-embedding parameters, as the build's ladder (32x2 .. 96x4)


def isoflop_records(law: Law = KNOWN, top_shift: float = 0.0) -> list[dict]:
    """Four compute levels a factor 2 apart, every size at every level (C = 6 N D); the top level's losses are
    multiplied by exp(top_shift) (a ladder whose law bends over its last step in compute)."""
    records = []
    for level in range(4):
        compute = 1e11 * 2**level
        for n in SIZES:
            d = compute / (6 * n)
            loss = float(law(n, d)) * (math.exp(top_shift) if level == 3 else 1.0)
            records.append(
                {
                    "name": f"{n:g}-c{level}",
                    "params": n,
                    "tokens": d,
                    "flops": compute,
                    "val_loss": loss,
                    "level": level,
                }
            )
    return records


def test_a_ladder_on_its_law_measures_no_extrapolation_error():
    check = extrapolation_check(rungs_from_records(isoflop_records()))
    assert check is not None
    assert check["rungs"] == [f"{n:g}-c3" for n in SIZES]
    assert check["log_distance"] == pytest.approx(math.log(2))
    assert check["rms_log_error"] < 1e-4


def test_the_error_per_log_compute_is_the_top_levels_miss_over_its_distance():
    """The rest of the ladder lies on KNOWN exactly, so the refit is KNOWN and every top rung is missed by exactly
    -0.05 in log loss: 0.05 per log(2) of compute."""
    check = extrapolation_check(rungs_from_records(isoflop_records(top_shift=-0.05)))
    assert check["log_errors"] == pytest.approx([0.05] * len(SIZES), abs=1e-4)
    assert check["per_log_compute"] == pytest.approx(0.05 / math.log(2), rel=1e-3)


def test_predict_far_widens_with_log_compute_beyond_the_top_rung_and_not_inside():
    rungs = rungs_from_records(isoflop_records(top_shift=-0.05))
    fit = analyse(rungs, bootstrap=10, holdout=False, extrapolation=True, seed=0)
    top = float(rungs.flops.max())
    per = fit.extrapolation["per_log_compute"]
    n = 4.4e5
    for factor in (10.0, 100.0):
        flops = top * factor
        d = flops / (6 * n)
        loss, low, high = fit.predict_far(n, d, flops)
        _, boot_low, boot_high = fit.predict(n, d)
        width = per * math.log(factor)
        assert extrapolation_width(fit.extrapolation, top, flops) == pytest.approx(width)
        assert low == pytest.approx(min(boot_low, loss * math.exp(-width)))
        assert high == pytest.approx(max(boot_high, loss * math.exp(width)))
        assert low < boot_low and high > boot_high  # the widening is what sets the interval here
    # at the ladder's own compute the interval is the bootstrap's
    d = top / 2 / (6 * n)
    assert fit.predict_far(n, d, top / 2) == fit.predict(n, d)
    assert extrapolation_width(fit.extrapolation, top, top / 2) == 0.0


def test_no_check_without_enough_rungs_below_the_top_level():
    records = [r for r in isoflop_records() if r["level"] >= 2]  # 4 rungs left below the top: too few to fit
    assert extrapolation_check(rungs_from_records(records)) is None
    fit = analyse(rungs_from_records(records), bootstrap=5, holdout=False, extrapolation=True)
    n, d = 4.4e5, 1e8
    assert fit.predict_far(n, d, 1e16) == fit.predict(n, d)


def test_rungs_without_levels_hold_out_the_top_compute():
    records = isoflop_records(top_shift=-0.05)
    for r in records:
        del r["level"]
    check = extrapolation_check(rungs_from_records(records))
    assert len(check["rungs"]) == len(SIZES)
    assert check["per_log_compute"] == pytest.approx(0.05 / math.log(2), rel=1e-3)
