"""`slm data mix-search`: a tiny end-to-end RegMix run, its resume, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from slmkit.errors import UserError
from slmkit.scaling.mixsearch import MixSearchSettings, run_mix_search, sample_mixtures
from slmkit.train.config import TrainConfig
from slmkit_testing import mixed_data_dir, run_slm

TINY = ["--size", "32x2", "--seq-len", "32", "--batch-size", "4", "--val-windows", "8", "--bootstrap", "10"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, corpus_file):
    return mixed_data_dir(tmp_path_factory.mktemp("mixed"), corpus_file)


def tiny_settings() -> MixSearchSettings:
    return MixSearchSettings(size="32x2", seq_len=32, batch_size=4, val_windows=8)


def test_sampled_mixtures_are_on_the_simplex_and_vary():
    natural = np.array([0.6, 0.3, 0.1])
    m = sample_mixtures(natural, 64, seed=1)
    assert np.allclose(m.sum(axis=1), 1, atol=1e-5) and m.min() >= 0
    assert np.all((m == 0) | (m >= 1e-3))
    assert m.std(axis=0).min() > 0.05  # spread over the simplex, not one point
    np.testing.assert_array_equal(m, sample_mixtures(natural, 64, seed=1))


def test_end_to_end_writes_its_outputs_and_config(mixed, tmp_path):
    out = tmp_path / "search"
    config = tmp_path / "mix.yaml"
    done = run_slm(
        "data", "mix-search", mixed, "--target", "papers", "--proxies", "4", "--steps", "4", "--law", "quadratic",
        "--domains", "code,papers", "--out", out, "--write-config", config, *TINY,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "best mixture for papers: --mix" in done.stdout
    records = [json.loads(line) for line in (out / "mixsearch.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(set(r["realised"]) == {"code", "papers"} for r in records)
    assert all(set(r["val_loss"]) == {"code", "papers", "numbers"} for r in records)
    result = json.loads((out / "result.json").read_text())
    assert result["fit"]["law"] == "quadratic" and result["proxies"] == 4
    assert sum(result["best"]["mix"].values()) == pytest.approx(1, abs=1e-3)
    assert (out / "mixsearch.png").stat().st_size > 1000
    cfg = TrainConfig.from_yaml(config)
    assert cfg.mix == result["best"]["mix"]
    # re-running resumes: nothing is trained again, the same result comes out
    mtime = (out / "runs" / "proxy-00" / "final" / "model.safetensors").stat().st_mtime
    again = run_mix_search(mixed, out, "papers", proxies=4, steps=4, domains=["code", "papers"], law="quadratic",
                           bootstrap=10, settings=tiny_settings())  # fmt: skip
    assert (out / "runs" / "proxy-00" / "final" / "model.safetensors").stat().st_mtime == mtime
    assert again.result["best"] == result["best"]


def test_a_proxy_finished_before_its_record_is_not_trained_again(mixed, tmp_path):
    def search():
        return run_mix_search(mixed, tmp_path / "s", "numbers", proxies=4, steps=3, law="exp", bootstrap=0,
                              settings=tiny_settings(), domains=["code", "papers"])  # fmt: skip

    first = search()
    assert first.result["target"] == "numbers"  # held out of the training domains
    path = tmp_path / "s" / "mixsearch.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")  # as if it died after proxy-03's training, before its record
    shutil.rmtree(tmp_path / "s" / "runs" / "proxy-03" / "checkpoints", ignore_errors=True)
    final = tmp_path / "s" / "runs" / "proxy-03" / "final" / "model.safetensors"
    mtime = final.stat().st_mtime
    again = search()
    assert final.stat().st_mtime == mtime
    assert json.loads(path.read_text().splitlines()[3]) == json.loads(lines[3])
    assert again.result["best"] == first.result["best"]


def test_bad_input(mixed, tmp_path):
    s = tiny_settings()
    with pytest.raises(UserError, match="not a domain"):
        run_mix_search(mixed, tmp_path / "a", "poetry", steps=2, settings=s)
    with pytest.raises(UserError, match="unknown domain"):
        run_mix_search(mixed, tmp_path / "b", "papers", steps=2, domains=["code", "poetry"], settings=s)
    with pytest.raises(UserError, match="at least two different domains"):
        run_mix_search(mixed, tmp_path / "c", "papers", steps=2, domains=["code"], settings=s)
    with pytest.raises(UserError, match="exactly one proxy budget"):
        run_mix_search(mixed, tmp_path / "d", "papers", settings=s)
    with pytest.raises(UserError, match="--proxies"):
        run_mix_search(mixed, tmp_path / "e", "papers", proxies=1, steps=2, settings=s)
    with pytest.raises(UserError, match="quadratic mixing law over 3 domains needs at least 7 proxies"):
        run_mix_search(mixed, tmp_path / "e", "papers", proxies=6, steps=2, law="quadratic", settings=s)
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="fewer than 10"):
        run_mix_search(mixed, tmp_path / "f", "papers", proxies=1000, budget_minutes=0.01, settings=s)
    old = tmp_path / "old"
    shutil.copytree(mixed, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["domains"]
    (old / "meta.json").write_text(json.dumps(meta))
    done = run_slm("data", "mix-search", old, "--target", "all", "--steps", "2", "--out", tmp_path / "g", *TINY)
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "records no domains" in done.stderr
