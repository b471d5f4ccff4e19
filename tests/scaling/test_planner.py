"""The planner: sizes match the optimum, caps bind, the YAML trains, bad budgets; the fit and plan CLIs."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from scaling_helpers import run_slm, tiny_ladder_fixture  # noqa: F401

from slmkit.config import PRESETS
from slmkit.errors import UserError
from slmkit.scaling.fit import Law, analyse, load_rungs
from slmkit.scaling.planner import candidates, config_for_params, plan, write_config
from slmkit.scaling.shapes import Shape
from slmkit.train.config import TrainConfig


@pytest.mark.parametrize("target", [1e5, 3.3e5, 1e6, 4.2e6, 2.5e7, 1.1e8])
def test_config_for_params_is_within_ten_percent(target):
    pool = candidates(8192, 256)
    chosen = config_for_params(target, pool)
    assert abs(chosen.params / target - 1) <= 0.10
    cfg = chosen.shape.config(8192, 256)
    assert cfg.num_params(False) == chosen.params
    assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.d_model % cfg.n_heads == 0
    assert 12 <= cfg.d_model / cfg.n_layers <= 64


@pytest.fixture(scope="module")
def flop_plan(tiny_ladder):
    return plan(tiny_ladder, budget_flops=1e13, bootstrap=10, measure_decode=False)


def test_plan_matches_the_optimum_and_spends_the_budget(flop_plan):
    p = flop_plan
    assert abs(p.params / p.optimal_params - 1) <= 0.10
    assert p.flops == pytest.approx(1e13, rel=1e-3)
    assert p.tokens * p.flops / p.tokens == pytest.approx(p.flops)
    low, high = p.loss_interval
    assert math.isfinite(low) and math.isfinite(high) and low < high
    assert p.n_heads % p.n_kv_heads == 0 and p.width % p.n_heads == 0


KNOWN = Law(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)


@pytest.fixture(scope="module")
def known_ladder(tiny_ladder, tmp_path_factory):
    """The tiny ladder's metadata with rungs whose losses follow a known law exactly, each rung a member of the
    shape family with its exact FLOPs (so the law's optimum lies inside the family, above the rungs)."""
    meta = json.loads((tiny_ladder / "ladder.json").read_text())
    vocab, context = int(meta["vocab_size"]), int(meta["request"]["settings"]["seq_len"])
    out = tmp_path_factory.mktemp("known") / "ladder"
    out.mkdir()
    (out / "ladder.json").write_text(json.dumps(meta))
    rows = []
    for width, depth in ((32, 1), (32, 2), (64, 2), (64, 4), (96, 4)):
        cfg = Shape(width, depth).config(vocab, context)
        n = cfg.num_params(False)
        for ratio in (2, 5, 10, 20):
            d = n * ratio
            rows.append(
                {"name": f"{width}x{depth}-{ratio}", "params": n, "tokens": d,
                 "flops": d * cfg.flops_per_token(context), "val_loss": float(KNOWN(n, d))}
            )  # fmt: skip
    (out / "ladder.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, vocab, context


@pytest.mark.parametrize("budget", [1e14, 1e15])
def test_plan_is_the_member_with_the_lowest_predicted_loss_at_its_exact_flops(known_ladder, budget):
    """Brute force over the shape family: each member trained on the budget at its own exact FLOPs per token
    (ModelConfig's count), scored by the law; the plan is the argmin and trains exactly those tokens. The
    planner once searched a grid with the ladder's fitted C/D = k N^gamma line instead, which under-counts the
    FLOPs of members bigger than the rungs and so chose members the budget could not train."""
    ladder, vocab, context = known_ladder
    p = plan(ladder, budget_flops=budget, bootstrap=0, measure_decode=False)
    law = analyse(load_rungs(ladder), bootstrap=0, holdout=False).law
    smallest = Shape(PRESETS["tiny"]["d_model"], PRESETS["tiny"]["n_layers"]).config(vocab, context)
    pool = candidates(vocab, context, min_params=smallest.num_params(False), max_params=4 * math.sqrt(budget / 6))
    best = min(pool, key=lambda c: (float(law(c.params, budget / c.flops_per_token)), c.total_params))
    assert best.params > 2 * max(load_rungs(ladder).params)  # an extrapolation, as a plan is
    assert (p.width, p.depth) == (best.shape.width, best.shape.depth)
    assert p.tokens == int(budget / best.shape.config(vocab, context).flops_per_token(context))
    assert p.predicted_loss == pytest.approx(float(law(best.params, p.tokens)), rel=1e-9)
    assert p.optimal_params == best.params == p.unconstrained_params and not p.binding


def test_max_params_caps_the_recommendation(tiny_ladder, flop_plan):
    cap = 150_000
    p = plan(tiny_ladder, budget_flops=1e15, max_params=cap, bootstrap=5, measure_decode=False)
    assert p.total_params <= cap
    assert abs(p.params / p.optimal_params - 1) <= 0.10


def test_written_config_is_accepted_by_the_trainer(tiny_ladder, flop_plan, tmp_path, data_dir):
    path = write_config(flop_plan, tmp_path / "plan.yaml")
    cfg = TrainConfig.from_yaml(path)
    model = cfg.model_config(vocab_size=json.loads((tiny_ladder / "ladder.json").read_text())["vocab_size"])
    assert model.num_params(False) == flop_plan.params
    assert model.d_model == flop_plan.width and model.n_layers == flop_plan.depth
    assert cfg.max_tokens == flop_plan.tokens and cfg.seq_len == flop_plan.context
    assert "model" in yaml.safe_load(path.read_text())


def test_budget_too_small_for_the_smallest_preset(tiny_ladder):
    with pytest.raises(UserError, match="too small for the smallest preset 'tiny'"):
        plan(tiny_ladder, budget_flops=1e6, bootstrap=0, measure_decode=False)
    with pytest.raises(UserError, match="exactly one budget"):
        plan(tiny_ladder, bootstrap=0, measure_decode=False)


def test_cli_fit_json_and_plots(tiny_ladder, tmp_path):
    result = run_slm("scaling", "fit", tiny_ladder, "--json", "--bootstrap", "5", "--plots", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("E", "A", "B", "alpha", "beta", "holdout_relative_error", "confidence_intervals", "frontier"):
        assert key in summary
    h = summary["holdout"]
    assert summary["holdout_relative_error"] == pytest.approx(
        (h["predicted_loss"] - h["actual_loss"]) / h["actual_loss"]
    )
    for name in ("loss_vs_compute.png", "loss_vs_params.png", "isoflop.png", "residuals.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_fit_bad_input_exits_2(tmp_path):
    lines = [
        {"name": f"r{i}", "params": 1e4 * (i + 1), "tokens": 1e5, "flops": 1e11, "val_loss": 3.0} for i in range(4)
    ]
    (tmp_path / "ladder.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run_slm("scaling", "fit", tmp_path)
    assert result.returncode == 2 and "needs at least 6" in result.stderr and "Traceback" not in result.stderr
    lines[1]["val_loss"] = float("inf")
    (tmp_path / "ladder.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = run_slm("scaling", "fit", tmp_path / "ladder.jsonl")
    assert result.returncode == 2 and "finite positive" in result.stderr


def test_cli_plan_writes_a_config(tiny_ladder, tmp_path):
    out = tmp_path / "plan.yaml"
    result = run_slm(
        "plan", "--ladder", tiny_ladder, "--budget-flops", "1e12", "--bootstrap", "5", "--write-config", out, "--json"
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["measured_decode_ms"] > 0 and shown["predicted_decode_ms"] > 0
    assert TrainConfig.from_yaml(out).max_tokens == shown["tokens"]
    result = run_slm("plan", "--ladder", tiny_ladder, "--budget-flops", "10", "--bootstrap", "0")
    assert result.returncode == 2 and "too small for the smallest preset" in result.stderr


def test_latency_cap_no_model_can_meet_is_a_user_error(tiny_ladder):
    with pytest.raises(UserError, match="no model meets --max-decode-ms"):
        plan(tiny_ladder, budget_flops=1e13, max_decode_ms=1e-6, bootstrap=0)


def _per_layer_ms(total_params: float, depth: int) -> float:
    """A machine where each layer costs more than a million parameters: small models decode at the speed of their
    depth (as on a 2-core CPU, where 64x8 decodes 3.4x slower than 64x2)."""
    return 0.1 + 0.2 * total_params / 1e6 + 0.25 * depth


def test_decode_line_separates_depth_from_parameters():
    from slmkit.scaling.planner import decode_line, decode_point

    def point(width: int, depth: int) -> dict:
        total = Shape(width, depth).config(4096, 256).num_params()
        return decode_point(Shape(width, depth), 4096, 256, _per_layer_ms(total, depth))

    line = decode_line([point(64, 2), point(128, 4), point(256, 6), point(64, 8)])
    for width, depth in ((80, 6), (256, 2), (384, 12)):
        total = Shape(width, depth).config(4096, 256).num_params()
        assert line(total, depth) == pytest.approx(_per_layer_ms(total, depth), rel=1e-6)
    # without depths (profiles written before they were recorded), or with one depth only: by parameters alone
    flat = [{k: v for k, v in point(w, d).items() if k != "depth"} for w, d in ((64, 2), (128, 4), (256, 6))]
    by_params = decode_line(flat)
    assert by_params(1e6, 2) == by_params(1e6, 12) > 0
    same_depth = decode_line([point(64, 4), point(128, 4), point(256, 4)])
    assert same_depth(1e6, 2) == same_depth(1e6, 12)


def test_latency_cap_counts_depth(known_ladder):
    """On a machine where depth costs time, the capped plan is the lowest-loss member whose true latency meets the
    cap: the planner times probes (one of them deep and thin), fits a + b params + c depth, and filters by it. With
    a line by parameters alone, deep members pass a cap they miss."""
    ladder, vocab, context = known_ladder
    budget = 1e15
    timed = []

    def timer(shape, vocab_size, ctx):
        timed.append(shape)
        return _per_layer_ms(shape.config(vocab_size, ctx).num_params(), shape.depth)

    free = plan(ladder, budget_flops=budget, bootstrap=0, decode_timer=timer)
    cap = 0.8 * _per_layer_ms(free.total_params, free.depth)
    p = plan(ladder, budget_flops=budget, bootstrap=0, max_decode_ms=cap, decode_timer=timer)
    assert any(s.depth >= 8 and s.width <= 64 for s in timed)  # the deep, thin probe
    law = analyse(load_rungs(ladder), bootstrap=0, holdout=False).law
    smallest = Shape(PRESETS["tiny"]["d_model"], PRESETS["tiny"]["n_layers"]).config(vocab, context)
    pool = candidates(vocab, context, min_params=smallest.num_params(False), max_params=4 * math.sqrt(budget / 6))
    meets = [c for c in pool if _per_layer_ms(c.total_params, c.shape.depth) <= cap]
    best = min(meets, key=lambda c: (float(law(c.params, budget / c.flops_per_token)), c.total_params))
    assert (p.width, p.depth) == (best.shape.width, best.shape.depth) != (free.width, free.depth)
    assert p.predicted_decode_ms == pytest.approx(_per_layer_ms(p.total_params, p.depth), rel=1e-6)
    assert p.predicted_decode_ms <= cap
    assert "max_decode_ms" in p.binding


@pytest.mark.parametrize("batch", [None, 8])
def test_the_plan_trains_at_the_run_batch_not_the_ladders(tiny_ladder, batch):
    """`slm build` ladders at a quarter of its run's batch and plans the run at its own (planner batch_size)."""
    p = plan(tiny_ladder, budget_flops=1e12, bootstrap=0, measure_decode=False, batch_size=batch)
    options = p.train_config()
    expected = batch or 4  # the tiny ladder's batch
    assert options["batch_size"] == expected
    steps = p.tokens // (options["seq_len"] * expected)
    assert options["warmup_steps"] == max(1, min(100, steps // 10))


def test_ladder_settings_record_embed_lr_scale_only_when_set_and_the_plan_trains_with_it(tiny_ladder):
    from slmkit.scaling.ladder import LadderSettings

    assert "embed_lr_scale" not in LadderSettings().recorded()  # ladders planned before the knob resume as they were
    assert LadderSettings(embed_lr_scale=3.0).recorded()["embed_lr_scale"] == 3.0
    with pytest.raises(UserError, match="embed_lr_scale"):
        LadderSettings(embed_lr_scale=0.0)
    assert "embed_lr_scale" not in plan(tiny_ladder, budget_flops=1e13, bootstrap=0, measure_decode=False).train_options
    meta = json.loads((tiny_ladder / "ladder.json").read_text())
    meta["request"]["settings"]["embed_lr_scale"] = 3.0
    (tiny_ladder / "ladder.json").write_text(json.dumps(meta))
    try:
        options = plan(tiny_ladder, budget_flops=1e13, bootstrap=0, measure_decode=False).train_options
    finally:
        del meta["request"]["settings"]["embed_lr_scale"]
        (tiny_ladder / "ladder.json").write_text(json.dumps(meta))
    assert options["embed_lr_scale"] == 3.0


def _convex_ms(total_params: float, depth: int) -> float:
    """A machine whose decode time grows faster than linearly in parameters (weights leaving the cache): a line
    through a small, a mid and a large timed shape over-predicts the members between them."""
    millions = total_params / 1e6
    return 0.1 + 0.05 * millions + 0.04 * millions**2 + 0.01 * depth


def test_a_binding_latency_cap_is_checked_by_timing_the_members_near_it(known_ladder):
    """The decode line only says where to look: members it puts just over the cap are timed themselves (best
    predicted loss first) and the first that meets the cap wins, over the line's own pick. Without the check the
    plan is the line's pick, a member with a higher predicted loss."""
    from slmkit.scaling.planner import BOUNDARY_CHECKS, BOUNDARY_SLACK, decode_line

    ladder, vocab, context = known_ladder
    budget = 1e15

    def probe_timer(shape, vocab_size, ctx):  # the few shapes the line is fitted on
        return _convex_ms(shape.config(vocab_size, ctx).num_params(), shape.depth)

    def check_timer(shape, vocab_size, ctx):  # a member's own timing
        return probe_timer(shape, vocab_size, ctx)

    free = plan(ladder, budget_flops=budget, bootstrap=0, decode_timer=probe_timer, check_timer=check_timer)
    cap = 0.5 * _convex_ms(free.total_params, free.depth)
    timers = dict(decode_timer=probe_timer, check_timer=check_timer)
    p = plan(ladder, budget_flops=budget, bootstrap=0, max_decode_ms=cap, **timers)
    law = analyse(load_rungs(ladder), bootstrap=0, holdout=False).law
    smallest = Shape(PRESETS["tiny"]["d_model"], PRESETS["tiny"]["n_layers"]).config(vocab, context)
    pool = candidates(vocab, context, min_params=smallest.num_params(False), max_params=4 * math.sqrt(budget / 6))
    line = decode_line(p.decode_measurements)

    def loss(c):
        return (float(law(c.params, budget / c.flops_per_token)), c.total_params)

    line_pick = min((c for c in pool if line(c.total_params, c.shape.depth) <= cap), key=loss)
    reach = [c for c in pool if line(c.total_params, c.shape.depth) <= cap * BOUNDARY_SLACK]
    best = min((c for c in reach if _convex_ms(c.total_params, c.shape.depth) <= cap), key=loss)
    assert loss(best) < loss(line_pick)  # the line over-predicts here: the check has something to find
    assert (p.width, p.depth) == (best.shape.width, best.shape.depth)
    assert _convex_ms(p.total_params, p.depth) <= cap and "max_decode_ms" in p.binding
    assert 1 <= len(p.decode_checked) <= BOUNDARY_CHECKS
    *over, last = p.decode_checked
    assert last["shape"] == best.shape.name and last["meets"] and last["ms"] <= cap
    assert all(not c["meets"] and c["ms"] > cap for c in over)
    assert p.measured_decode_ms == pytest.approx(last["ms"])
    # the line's own estimate of the winner was over the cap: the plan reports it, and the timing that let it in
    assert p.predicted_decode_ms > cap
