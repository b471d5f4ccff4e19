"""`slm quickstart` end to end with a few seconds of training (the real job trains for 5 minutes)."""

import json

import pytest

from slmkit_testing import run_slm


@pytest.mark.timeout(1200)
def test_quickstart_runs_end_to_end(tmp_path):
    r = run_slm("quickstart", "--out", tmp_path / "qs", "--minutes", "0.05", "--preset", "tiny", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["steps"] >= 1
    assert summary["val"]["bits_per_byte"] > 0
    assert set(summary["baselines_bits_per_byte"]) == {"gzip -9", "xz -9e"}
    assert "gzip -9" in r.stdout and "xz -9e" in r.stdout
    assert (tmp_path / "qs" / "run" / "final" / "tokenizer.json").is_file()
    # a second run reuses the prepared data and keeps the earlier run
    r = run_slm("quickstart", "--out", tmp_path / "qs", "--minutes", "0.02", "--preset", "tiny", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing" in r.stdout
    assert (tmp_path / "qs" / "run.previous" / "final").is_dir()
