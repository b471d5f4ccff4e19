"""Ladders: planning under a budget, a tiny ladder end to end, resume, mixed data, bad budgets."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from scaling_helpers import TINY_BUDGET, TINY_SIZES, run_slm, tiny_ladder_fixture, tiny_settings  # noqa: F401

from slmkit.errors import UserError
from slmkit.scaling.fit import load_rungs
from slmkit.scaling.ladder import plan_rungs, run_ladder
from slmkit.scaling.shapes import parse_sizes


def test_plan_spends_the_flop_budget_over_isoflop_levels():
    settings = tiny_settings(seq_len=64, batch_size=8)
    sizes = parse_sizes("32x1,32x2,64x2,64x4")
    rungs = plan_rungs(sizes, 512, settings, budget_flops=5e11)
    total = sum(r.flops for r in rungs)
    assert 0.8 * 5e11 <= total <= 5e11
    for r in rungs:
        assert r.steps >= settings.min_steps and r.tokens == r.steps * settings.tokens_per_step
    # within a level the rungs spend about the same compute; levels are level_ratio apart
    by_level = {}
    for r in rungs:
        by_level.setdefault(r.level, []).append(r.flops)
    top = max(by_level)
    assert max(by_level[top]) / min(by_level[top]) < 1.3
    assert max(by_level[top]) / max(by_level[top - 1]) == pytest.approx(settings.level_ratio, rel=0.2)
    # tokens per parameter spans a wide range
    ratios = [r.tokens / r.params for r in rungs]
    assert max(ratios) / min(ratios) > 10


def test_budget_too_small_for_a_ladder_is_a_user_error():
    with pytest.raises(UserError, match="gives only 0 rung"):
        plan_rungs(parse_sizes("32x1,64x4"), 512, tiny_settings(), budget_flops=1e6)


def test_sizes_must_span_a_decade(data_dir, tmp_path):
    with pytest.raises(UserError, match="at least 10x"):
        run_ladder(
            data_dir, tmp_path / "l", budget_flops=1e10, sizes=parse_sizes("32x1,32x2"), settings=tiny_settings()
        )
    with pytest.raises(UserError, match="WIDTHxDEPTH"):
        parse_sizes("32x1,big")


def test_tiny_ladder_end_to_end(tiny_ladder, data_dir):
    plan = json.loads((tiny_ladder / "ladder.json").read_text())
    lines = (tiny_ladder / "ladder.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["name"] for r in records] == [r["name"] for r in plan["rungs"]]
    assert len(records) >= 7
    meta = json.loads((data_dir / "meta.json").read_text())
    for r in records:
        for key in ("params", "tokens", "flops", "val_loss", "bits_per_byte", "seconds", "data_fingerprint"):
            assert key in r
        assert r["tokenizer_sha256"] == meta["tokenizer_sha256"]
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert r["flops"] == pytest.approx(r["tokens"] * r["flops_per_token"])
        assert (tiny_ladder / "runs" / r["name"] / "final" / "model.safetensors").is_file()
        assert r["val_tokens"] == 16 * 32  # the same val windows for every rung
    # more compute for the same size gives a lower loss
    small = sorted((r for r in records if r["width"] == 32), key=lambda r: r["flops"])
    assert small[-1]["val_loss"] < small[0]["val_loss"]
    assert len(load_rungs(tiny_ladder)) == len(records)


def test_interrupted_ladder_resumes(tiny_ladder, data_dir, tmp_path, monkeypatch):
    import slmkit.train.loop as loop

    ladder = tmp_path / "copy"
    shutil.copytree(tiny_ladder, ladder)
    records = [json.loads(x) for x in (ladder / "ladder.jsonl").read_text().splitlines()]
    # the last rung "crashed" after its last periodic checkpoint; the one before before finishing at all
    unfinished = max(records, key=lambda r: r["steps"])
    run_dir = ladder / "runs" / unfinished["name"]
    assert any((run_dir / "checkpoints").iterdir()), "the rung saved periodic checkpoints"
    shutil.rmtree(run_dir / "final")
    kept = [r for r in records if r["name"] != unfinished["name"]]
    (ladder / "ladder.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    calls = []
    real_train = loop.train

    def spy(cfg, data, run_dir, resume=False, **kw):
        calls.append((run_dir.name, resume))
        return real_train(cfg, data, run_dir, resume=resume, **kw)

    monkeypatch.setattr(loop, "train", spy)
    result = run_ladder(
        data_dir, ladder, budget_flops=TINY_BUDGET, sizes=parse_sizes(TINY_SIZES), settings=tiny_settings()
    )
    assert calls == [(unfinished["name"], True)]  # only the unfinished rung ran, from its checkpoint
    again = {r["name"]: r for r in result.records}[unfinished["name"]]
    assert again["steps"] == unfinished["steps"] and again["tokens"] == unfinished["tokens"]
    assert len(result.records) == len(records)


def test_resume_with_other_data_or_options_is_refused(tiny_ladder, tmp_path, corpus_file):
    from slmkit.data.prepare import prepare

    other = tmp_path / "other"
    prepare([str(corpus_file)], other, vocab_size=300, val_fraction=0.1)
    with pytest.raises(UserError, match="different data or a different tokenizer"):
        run_ladder(
            other, tiny_ladder, budget_flops=TINY_BUDGET, sizes=parse_sizes(TINY_SIZES), settings=tiny_settings()
        )


def test_cli_ladder_bad_budget_exits_2(data_dir, tmp_path):
    result = run_slm(
        "ladder", "--data", data_dir, "--out", tmp_path / "l", "--budget-flops", "1000", "--sizes", TINY_SIZES
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "raise the budget" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_slm("ladder", "--data", data_dir, "--out", tmp_path / "l")
    assert result.returncode == 2 and "--budget-flops or --budget-minutes" in result.stderr
