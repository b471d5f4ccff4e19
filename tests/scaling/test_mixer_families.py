"""Ladders per mixer family (`slm ladder --mixer`) and the planner choosing between families."""

from __future__ import annotations

import json
import shutil

import pytest
from scaling_helpers import run_slm, tiny_ladder_fixture, tiny_settings  # noqa: F401

from slmkit.errors import UserError
from slmkit.scaling.fit import load_rungs
from slmkit.scaling.ladder import plan_rungs, run_ladder
from slmkit.scaling.planner import plan
from slmkit.scaling.shapes import DEFAULT_SIZES, Shape, parse_mixer, parse_sizes, with_mixer

EXPECTED_LAYERS = {
    "attention": lambda depth: ["attention"] * depth,
    "mamba2": lambda depth: ["mamba2"] * depth,
    "gla": lambda depth: ["gla"] * depth,
    "based": lambda depth: ["based"] * depth,
    "hybrid": lambda depth: [("mamba2", "mamba2", "mamba2", "attention")[i % 4] for i in range(depth)],
    "mamba2,attention": lambda depth: [("mamba2", "attention")[i % 2] for i in range(depth)],
    "moe": lambda depth: ["attention"] * depth,
}


@pytest.mark.parametrize("mixer", list(EXPECTED_LAYERS))
def test_ladder_shapes_have_the_family_mixers_and_growing_params(mixer):
    sizes = with_mixer(DEFAULT_SIZES[:7], mixer)
    rungs = plan_rungs(sizes, 512, tiny_settings(seq_len=64, batch_size=8), budget_flops=5e12)
    for r in rungs:
        assert r.mixer == mixer
        cfg = Shape(r.width, r.depth, mixer).config(512, 64)
        assert [cfg.mixer_at(i) for i in range(r.depth)] == EXPECTED_LAYERS[mixer](r.depth)
        # the rung carries ModelConfig's exact counts of this family, not attention's
        assert r.params == cfg.num_params(False) and r.flops_per_token == cfg.flops_per_token(64)
        if mixer != "attention":
            assert r.params != Shape(r.width, r.depth).config(512, 64).num_params(False)
    if mixer == "mamba2":
        assert Shape(64, 2, mixer).config(512, 64).mlp == "none"  # the Mamba-2 recipe, as micro-mamba2
    if mixer == "moe":
        _check_moe_member()
    # params grow with width at fixed depth and with depth at fixed width
    params = {(s.width, s.depth): s.config(512, 64).num_params(False) for s in sizes}
    for (w, d), n in params.items():
        for (w2, d2), n2 in params.items():
            if w2 >= w and d2 >= d and (w2, d2) != (w, d):
                assert n2 > n, (mixer, (w, d), (w2, d2))
    ordered = [s.config(512, 64).num_params(False) for s in sizes]
    assert ordered == sorted(ordered)


def _check_moe_member():
    """The moe family is micro-moe's recipe at every shape: 8 experts, top-2, each half the dense MLP's width, so a
    token costs the dense member's FLOPs (plus the router) with 4x its MLP parameters; saved as Mixtral."""
    from slmkit.config import PRESETS, ModelConfig

    for width, depth in ((64, 2), (128, 4), (256, 6)):
        moe, dense = Shape(width, depth, "moe").config(512, 64), Shape(width, depth).config(512, 64)
        assert (moe.mlp, moe.moe_experts, moe.moe_top_k, moe.family) == ("moe", 8, 2, "mixtral")
        assert moe.d_ff * 2 == dense.d_ff and [moe.mixer_at(i) for i in range(depth)] == ["attention"] * depth
        router = 3 * 2 * depth * width * 8  # forward + backward of each layer's router matmul
        assert moe.flops_per_token(64) == dense.flops_per_token(64) + router
        mlp_dense = 3 * width * dense.d_ff * depth
        assert moe.num_params(False) == dense.num_params(False) + 3 * mlp_dense + depth * width * 8
    micro_moe = ModelConfig(**{**PRESETS["micro-moe"], "max_seq_len": 64, "vocab_size": 512})
    assert Shape(128, 4, "moe").config(512, 64).num_params() == micro_moe.num_params()


@pytest.mark.parametrize("bad", ["mamba3", "mamba2,transformer", ","])
def test_unknown_mixer_is_one_clear_error(bad):
    with pytest.raises(UserError, match="--mixer: .* neither a mixer family"):
        parse_mixer(bad)


def test_cli_unknown_mixer_is_one_error_line(tmp_path, data_dir):
    proc = run_slm("ladder", "--data", data_dir, "--out", tmp_path / "l", "--budget-flops", "1e10", "--mixer", "mamba3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --mixer: 'mamba3'"), proc.stderr
    assert not (tmp_path / "l").exists()


def test_mamba2_ladder_records_its_family(tmp_path, data_dir):
    out = tmp_path / "m2"
    result = run_ladder(
        data_dir, out, budget_flops=1e10, sizes=parse_sizes("32x1,64x4"), settings=tiny_settings(), mixer="mamba2"
    )
    assert not result.interrupted and len(result.records) >= 7
    plan_file = json.loads((out / "ladder.json").read_text())
    assert plan_file["mixer"] == "mamba2" and plan_file["request"]["mixer"] == "mamba2"
    assert {r["mixer"] for r in result.records} == {"mamba2"}
    trained = json.loads((out / "runs" / result.records[0]["name"] / "final" / "config.json").read_text())
    assert "mamba2" in json.dumps(trained)
    # a rung's params are the mamba2 count of its shape
    r = result.records[-1]
    assert r["params"] == Shape(r["width"], r["depth"], "mamba2").config(512, 32).num_params(False)
    # resuming with another family is refused (the request differs)
    with pytest.raises(UserError, match="other options"):
        run_ladder(data_dir, out, budget_flops=1e10, sizes=parse_sizes("32x1,64x4"), settings=tiny_settings())


def test_old_single_family_ladder_still_loads_and_resumes(tmp_path, tiny_ladder, data_dir):
    """A ladder written before families existed (no `mixer` anywhere) is an attention ladder."""
    from scaling_helpers import TINY_BUDGET, TINY_SIZES

    old = tmp_path / "old"
    shutil.copytree(tiny_ladder, old)
    meta = json.loads((old / "ladder.json").read_text())
    meta.pop("mixer", None)
    meta["request"].pop("mixer", None)
    for r in meta["rungs"]:
        r.pop("mixer", None)
    (old / "ladder.json").write_text(json.dumps(meta))
    records = [json.loads(line) for line in (old / "ladder.jsonl").read_text().splitlines()]
    (old / "ladder.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "mixer"}) + "\n" for r in records)
    )
    assert len(load_rungs(old)) == len(records)
    p = plan(old, budget_flops=1e13, bootstrap=5, measure_decode=False)
    assert p.mixer == "attention" and p.families == []
    assert "mixer" not in p.train_config()["model"]
    # resuming it with the same options (no --mixer) finds every rung done
    again = run_ladder(data_dir, old, budget_flops=TINY_BUDGET, sizes=parse_sizes(TINY_SIZES), settings=tiny_settings())
    assert len(again.records) == len(records)


# ---- the planner choosing between families, on synthetic ladders whose losses follow known laws --------
def _synthetic_ladder(path, mixer, e, a=300.0, alpha=0.35, b=400.0, beta=0.3):
    vocab, context = 512, 64
    settings = tiny_settings(seq_len=context, batch_size=8)
    sizes = with_mixer([Shape(32, 2), Shape(64, 2), Shape(64, 4), Shape(96, 4), Shape(128, 4)], mixer)
    rungs = plan_rungs(sizes, vocab, settings, budget_flops=2e13)
    request = {"budget_flops": 2e13, "budget_minutes": None, "sizes": None, "settings": vars(settings)}
    if mixer != "attention":
        request["mixer"] = mixer
    meta = {"request": request, "vocab_size": vocab, "mixer": mixer, "data_fingerprint": "x", "rungs": []}
    meta["tokenizer_sha256"] = "y"
    path.mkdir(parents=True)
    (path / "ladder.json").write_text(json.dumps(meta))
    lines = []
    for r in rungs:
        loss = e + a / r.params**alpha + b / r.tokens**beta
        lines.append(
            json.dumps(
                {
                    "name": r.name,
                    "params": r.params,
                    "tokens": r.tokens,
                    "flops": r.flops,
                    "flops_per_token": r.flops_per_token,
                    "val_loss": loss,
                    "seconds": r.flops / 1e9,
                    "seq_len": context,
                    "mixer": mixer,
                }
            )
        )
    (path / "ladder.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_planner_picks_the_family_with_the_lower_predicted_loss_and_flips(tmp_path):
    good = _synthetic_ladder(tmp_path / "a" / "gla", "gla", e=2.0)
    bad = _synthetic_ladder(tmp_path / "a" / "mamba2", "mamba2", e=2.4)
    p = plan([good, bad], budget_flops=1e14, bootstrap=5, measure_decode=False)
    assert p.mixer == "gla" and [f["mixer"] for f in p.families] == ["gla", "mamba2"]
    assert p.families[0]["predicted_loss"] < p.families[1]["predicted_loss"] - 0.2
    assert p.train_config()["model"]["mixer"] == "gla"
    # swap the fits: the other family wins, whatever order the ladders are given in
    good = _synthetic_ladder(tmp_path / "b" / "mamba2", "mamba2", e=2.0)
    bad = _synthetic_ladder(tmp_path / "b" / "gla", "gla", e=2.4)
    for order in ([good, bad], [bad, good]):
        p = plan(order, budget_flops=1e14, bootstrap=5, measure_decode=False)
        assert p.mixer == "mamba2" and p.families[0]["mixer"] == "mamba2"
        assert p.train_config()["model"]["mlp"] == "none"


def test_planner_with_one_family_behaves_as_before(tmp_path):
    one = _synthetic_ladder(tmp_path / "attn", "attention", e=2.0)
    single = plan(one, budget_flops=1e14, bootstrap=5, measure_decode=False)
    listed = plan([one], budget_flops=1e14, bootstrap=5, measure_decode=False)
    assert single.families == [] and single.mixer == "attention"
    assert single.to_dict() == listed.to_dict()


def test_each_family_is_planned_at_its_own_training_rate(tmp_path):
    """`flops_per_second` as a mapping by family (what `slm build` passes): two families with the same law, the
    one whose steps run faster trains more tokens in the time and wins; a family without a rate is an error."""
    attention = _synthetic_ladder(tmp_path / "attention", "attention", e=2.0)
    moe = _synthetic_ladder(tmp_path / "moe", "moe", e=2.0)
    for fast in ("attention", "moe"):
        rates = {m: (lambda n: 5e9) if m == fast else (lambda n: 5e8) for m in ("attention", "moe")}
        p = plan([attention, moe], budget_minutes=30, flops_per_second=rates, bootstrap=5, measure_decode=False)
        assert p.mixer == fast and [f["mixer"] for f in p.families][0] == fast
        slow = p.families[1]
        assert p.tokens * Shape(p.width, p.depth, fast).config(512, 64).flops_per_token(64) == pytest.approx(
            30 * 60 * 5e9, rel=1e-3
        )
        assert slow["tokens"] < p.tokens
    alone = plan(moe, budget_minutes=30, flops_per_second=lambda n: 5e9, bootstrap=5, measure_decode=False)
    assert alone.mixer == "moe" and alone.train_config()["model"]["mlp"] == "moe"
    with pytest.raises(UserError, match="no training rate was measured for the 'moe' family"):
        plan([attention, moe], budget_minutes=30, flops_per_second={"attention": lambda n: 5e9}, measure_decode=False)


def test_planner_refuses_two_ladders_of_one_family(tmp_path):
    a = _synthetic_ladder(tmp_path / "x", "gla", e=2.0)
    b = _synthetic_ladder(tmp_path / "y", "gla", e=2.1)
    with pytest.raises(UserError, match="both 'gla' ladders"):
        plan([a, b], budget_flops=1e14, bootstrap=5, measure_decode=False)


def test_plan_cli_json_is_plain_with_families(tmp_path):
    a = _synthetic_ladder(tmp_path / "gla", "gla", e=2.3)
    b = _synthetic_ladder(tmp_path / "based", "based", e=2.0)
    args = ["plan", "--ladder", a, "--ladder", b, "--budget-flops", "1e14", "--bootstrap", "5", "--json"]
    proc = run_slm(*args, "--max-params", "5e6")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # not a terminal: plain JSON, no colour codes
    assert "\x1b[" not in proc.stdout
    assert out["mixer"] == "based" and [f["mixer"] for f in out["families"]] == ["based", "gla"]
    text = run_slm(*args[:-1])
    assert text.returncode == 0, text.stderr
    assert "chosen: based" in text.stdout and "gla" in text.stdout
