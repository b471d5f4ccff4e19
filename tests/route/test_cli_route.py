"""`slm route train / eval / generate` as a user runs them, and their bad inputs."""

from __future__ import annotations

import json

import pytest

from slmkit.cli import run


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_slm(*args: object) -> Result:
    """The CLI in this process (`slm` without the interpreter start and imports): exit code, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, weak_dir, strong_dir, mc_task):
    out = tmp_path_factory.mktemp("router") / "router"
    r = run_slm("route", "train", "--weak", weak_dir, "--strong", strong_dir, "--tasks", mc_task, "--out", out,
                "--target-strong-share", "0.4", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["classifier"] == "logreg" and meta["target_strong_share"] == 0.4
    assert abs(meta["held_out"]["strong_share"] - 0.4) < 0.05
    return out


def test_train_writes_a_router_and_refuses_to_overwrite_it(router_dir, weak_dir, strong_dir, mc_task):
    from slmkit.route.router import load_router

    router = load_router(router_dir)
    router.check_models(weak_dir, strong_dir)
    r = run_slm("route", "train", "--weak", weak_dir, "--strong", strong_dir, "--tasks", mc_task, "--out", router_dir)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_eval_reports_every_router_on_held_out_items(router_dir, weak_dir, strong_dir, mc_task, tmp_path):
    r = run_slm("route", "eval", "--weak", weak_dir, "--strong", strong_dir, "--tasks", mc_task, "--router",
                router_dir, "--resamples", "200", "--json", "--report", tmp_path / "report")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["routers"]) == {"random", "cascade", "learned", "oracle"}
    assert result["held_out_only"] and 0 < result["items"] < 160
    assert result["strong"] == 1.0  # the task's answers are the strong model's picks
    oracle = result["routers"]["oracle"]["curve"]
    for name, entry in result["routers"].items():
        assert all(a <= b + 1e-12 for a, b in zip(entry["curve"], oracle, strict=True)), name
        assert entry["curve"][0] == pytest.approx(result["weak"]) and entry["curve"][-1] == pytest.approx(1.0)
    html = (tmp_path / "report" / "routing.html").read_text()
    assert "data:image/png;base64," in html and "APGR" in html
    assert json.loads((tmp_path / "report" / "routing.json").read_text())["items"] == result["items"]


def test_eval_refuses_a_router_trained_for_other_models(router_dir, other_weak_dir, strong_dir, mc_task):
    r = run_slm("route", "eval", "--weak", other_weak_dir, "--strong", strong_dir, "--tasks", mc_task,
                "--router", router_dir)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error:") and "another weak model" in r.stderr


@pytest.mark.parametrize("problem", ["missing", "corrupt"])
def test_eval_with_a_missing_or_corrupt_router(problem, tmp_path, weak_dir, strong_dir, mc_task):
    path = tmp_path / "router"
    if problem == "corrupt":
        path.mkdir()
        (path / "router.json").write_text("{")
    r = run_slm("route", "eval", "--weak", weak_dir, "--strong", strong_dir, "--tasks", mc_task, "--router", path)
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_extremes_and_other_tokenizer(weak_dir, strong_dir, other_tokenizer_model):
    r = run_slm("route", "generate", "--small", weak_dir, "--large", strong_dir, "--prompt", "The model",
                "--threshold", "1.5", "--max-new-tokens", "6", "--compare", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["stats"][0]["tokens_from_large"] == result["stats"][0]["new_tokens"]
    assert result["compare"]["same_as_large_prefix_share"] == 1.0
    r = run_slm("route", "generate", "--small", weak_dir, "--large", other_tokenizer_model, "--prompt", "x")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "one tokenizer" in r.stderr
