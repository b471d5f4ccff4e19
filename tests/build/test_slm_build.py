"""`slm build`: the artefacts of a tiny build (the HF dir's logits in transformers), resume after a stop in every
stage equals an uninterrupted build, infeasible targets refused before training, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmkit_testing import run_slm

# A replayed machine (what `--machine build.json` reads): fixed timings make the plan, and so the model, the
# same in every build of these tests whatever the load on the test machine.
PROFILE = {
    "vocab_size": 0,  # set to the data's vocabulary below
    "context": 32,
    "batch_size": 16,
    "train": [
        {"shape": "64x2", "params": 86336, "total_params": 107136, "tokens_per_second": 4e3, "flops_per_second": 2.2e9},
        {"shape": "128x4", "params": 7e5, "total_params": 7.4e5, "tokens_per_second": 8e2, "flops_per_second": 3e9},
    ],
    "decode": [
        {"shape": "64x2", "total_params": 107136, "ms": 1.5},
        {"shape": "128x4", "total_params": 7.4e5, "ms": 4.0},
    ],
    # the post-training work timed on the smallest model (seconds of the order a probe takes here; replayed, so
    # the plan does not depend on the load: the test below times it for real)
    "post": {
        "shape": "64x2",
        "vocab_size": 0,
        "context": 64,
        "total_params": 107136,
        "seconds": {"save": 0.01, "train_evaluate": 0.5, "compress_float": 0.3, "compress_candidates": 0.4}
        | {"select": 0.01, "held_out": 0.1, "evaluate": 5.0, "hf": 0.05, "gguf": 0.1, "card": 0.01, "report": 0.3},
        "tokens": {},
    },
}
BUDGET = 60.0


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """This module's own corpus, the same whether or not ../shared is present: the plans these tests expect (a
    model that fits the budget, whose float form misses --max-size and whose int8 form meets it) depend on the
    vocabulary, which the session corpus changes with the shared folder."""
    import random

    rng = random.Random(0)
    words = "model data train token language small scaling loss compute budget attention layer".split()
    path = tmp_path_factory.mktemp("build-corpus") / "texts.jsonl"
    with path.open("w") as fh:
        for _ in range(200):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120)) + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_file):
    from slmkit.data.prepare import prepare

    out = tmp_path_factory.mktemp("build-data") / "texts"
    prepare([str(corpus_file)], out, vocab_size=512, val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def profile(data_dir):
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    return {**PROFILE, "vocab_size": meta["vocab_size"], "post": {**PROFILE["post"], "vocab_size": meta["vocab_size"]}}


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, data_dir):
    """A tiny fit (seconds) at 16 x 32 tokens per step, so the planned run is a few hundred steps."""
    from slmkit.scaling.ladder import LadderSettings, run_ladder
    from slmkit.scaling.shapes import parse_sizes

    out = tmp_path_factory.mktemp("build-ladder") / "ladder"
    settings = LadderSettings(seq_len=32, batch_size=16, levels=4, min_steps=3, val_windows=16, threads=1, lr=1e-2)
    run_ladder(data_dir, out, budget_flops=1e10, sizes=parse_sizes("32x1,32x2,64x4"), settings=settings)
    return out


@pytest.fixture(scope="module")
def task_file(tmp_path_factory, corpus_file):
    """Six multiple-choice items whose contexts are corpus text (so the contamination check has overlap to find)."""
    texts = [json.loads(line)["text"] for line in Path(corpus_file).read_text().splitlines()[:6]]
    path = tmp_path_factory.mktemp("tasks") / "corpus-words.jsonl"
    with path.open("w") as fh:
        for text in texts:
            words = text.split()
            record = {"context": " ".join(words[:30]), "choices": [" " + words[30], " zebra"], "answer": 0}
            fh.write(json.dumps(record) + "\n")
    return path


def _request(data_dir, ladder, **changes):
    from slmkit.build.options import BuildRequest

    base = dict(
        data=[str(data_dir)],
        budget_seconds=BUDGET,
        max_size_bytes=300_000,  # below the float model, above its int8 form: compression must run
        fit=[str(ladder)],
        threads=1,
    )
    return BuildRequest(**{**base, **changes})


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, data_dir, ladder, profile, task_file):
    from slmkit.build.pipeline import build
    from slmkit.models import native

    # the native kernels are compiled on their first use (once per machine and source): not inside the stages whose
    # wall times test_the_plan_reserves_what_the_post_training_stages_took compares with their reservation
    native.library()
    out = tmp_path_factory.mktemp("build") / "shipped"
    result = build(_request(data_dir, ladder, tasks=[str(task_file)]), out, machine=profile)
    return out, result


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tiny_build_ships_every_artefact(shipped):
    out, result = shipped
    for name in ("model/model.safetensors", "hf/config.json", "model.gguf", "README.md", "build.json", "report.html"):
        assert (out / name).is_file(), name
    state = json.loads((out / "build.json").read_text())
    assert all(stage["done"] and stage["seconds"] > 0 for stage in state["stages"].values())
    plan = state["plan"]
    assert plan["loss_interval"][0] <= plan["predicted_loss"] <= plan["loss_interval"][1]
    # the float model misses --max-size, so candidates were measured and one that meets it shipped
    methods = [c["method"] for c in state["candidates"]]
    assert methods == ["float", "int8", "w8a8", "int4", "gptq-int4"]
    w8a8 = json.loads((Path(state["candidates"][2]["path"]) / "config.json").read_text())
    assert "dynamic" in json.dumps(w8a8)  # activations quantized per call: W8A8, not int8's weight-only
    assert not state["candidates"][0]["meets"]["size"]
    assert state["result"]["method"] != "float" and state["result"]["meets"]["size"]
    assert state["result"]["size_bytes"] <= 300_000
    (task,) = state["stages"]["verify"]["steps"]["evaluate"]["tasks"]  # scored, with its overlap with the train split
    assert task["task"] == "corpus-words" and 0 <= task["metrics"]["acc"]["mean"] <= 1
    assert task["contamination"]["items"] == 6 and task["contamination"]["contaminated"] >= 1
    low, high = state["result"]["bits_per_byte_interval"]
    assert low <= state["result"]["bits_per_byte"] <= high
    card = (out / "README.md").read_text()
    assert "How this model was built" in card and f"{state['result']['bits_per_byte']:.4f}" in card
    html = (out / "report.html").read_text()
    assert "Plan vs actual" in html and "Compression candidates" in html and "Budget per stage" in html
    # the planned run trains its tables and head at BUILD_EMBED_LR_SCALE; the ladder's rungs (the law) do not
    from slmkit.build.stages import BUILD_EMBED_LR_SCALE

    trained = json.loads((out / "work" / "run" / "train_config.json").read_text())
    assert BUILD_EMBED_LR_SCALE != 1.0 and trained["embed_lr_scale"] == BUILD_EMBED_LR_SCALE


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_hf_dir_loads_in_transformers_with_the_shipped_logits(shipped):
    import torch
    from transformers import AutoModelForCausalLM

    from slmkit.interop.checkpoint import load_model

    out, _ = shipped
    ours = load_model(out / "model").eval()  # the compressed model slmkit ships
    theirs = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    from slmkit.models.quantized import dequantized_matmuls

    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dequantized_matmuls():  # the shipped weights' exact math (CPU int kernels round to bf16)
        expected = ours(ids)
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_mixture_of_experts_build_ships_a_mixtral(tmp_path, data_dir, profile):
    """`--mixer moe` (here through its `--fit` ladder, which sets the family): the plan and the model are a
    mixture of experts, the HF dir is transformers' Mixtral with the shipped logits, and the GGUF holds the experts
    stacked as llama.cpp reads them. A --mixer the fit ladders are not of is refused before anything runs."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from slmkit.build.pipeline import build
    from slmkit.errors import UserError
    from slmkit.interop.checkpoint import load_model
    from slmkit.scaling.ladder import LadderSettings, run_ladder
    from slmkit.scaling.shapes import parse_sizes

    fit = tmp_path / "ladder-moe"
    settings = LadderSettings(seq_len=32, batch_size=16, levels=4, min_steps=3, val_windows=16, threads=1, lr=1e-2)
    run_ladder(data_dir, fit, budget_flops=1e10, sizes=parse_sizes("32x1,32x2,64x4"), settings=settings, mixer="moe")
    with pytest.raises(UserError, match="--mixer hybrid but the --fit ladders are of moe"):
        build(_request(data_dir, fit, max_size_bytes=None, mixer="hybrid"), tmp_path / "refused", machine=profile)
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "shipped"
    state = build(_request(data_dir, fit, max_size_bytes=None, budget_seconds=110), out, machine=profile)
    assert state["plan"]["mixer"] == "moe"
    ours = load_model(out / "model").eval()
    assert (ours.config.mlp, ours.config.moe_experts, ours.config.moe_top_k) == ("moe", 8, 2)
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    theirs = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=2e-4, rtol=1e-4)
    names = {t.name for t in GGUFReader(out / "model.gguf").tensors}
    assert {f"blk.{i}.ffn_gate_exps.weight" for i in range(ours.config.n_layers)} <= names


def test_when_no_candidate_meets_the_targets_the_nearest_ships():
    """Measured in a 10-minute build: the float model 2% over the latency target (0.215 vs 0.211 ms) and int8 9x over
    it (1.95 ms: its 112-wide rows do not tile) with a loss lower by 3e-5 nats; the float model must ship. Among
    candidates that meet the targets, a loss within the tie goes to the less aggressive method."""
    from slmkit.build.stages import LOSS_TIE, pick_candidate

    def cand(method, loss, ms, size, latency_ok, size_ok=True):
        return {"method": method, "loss": loss, "decode_ms_per_token": ms, "size_bytes": size,
                "meets": {"size": size_ok, "latency": latency_ok}}  # fmt: skip

    measured = [
        cand("float", 2.806128, 0.2152, 6_368_032, False),
        cand("int8", 2.806099, 1.9474, 1_656_320, False),
        cand("int4", 2.814404, 4.9276, 1_451_280, False),
    ]
    chosen, why = pick_candidate(measured, 0.21115, None)
    assert chosen["method"] == "float" and why.startswith("NO candidate meets every target")
    # one target missed beats two, however near
    both = [cand("float", 2.0, 0.30, 900, False, size_ok=False), cand("int8", 2.5, 5.0, 100, False)]
    assert pick_candidate(both, 0.2, 500)[0]["method"] == "int8"
    # meeting candidates: least loss, a tie to the earlier
    ok = [cand("float", 2.0 + LOSS_TIE / 4, 0.1, 900, True), cand("int8", 2.0, 0.1, 100, True)]
    assert pick_candidate(ok, 0.2, 1000)[0]["method"] == "float"
    ok[1]["loss"] = 2.0 - 2 * LOSS_TIE
    assert pick_candidate(ok, 0.2, 1000)[0]["method"] == "int8"


def _weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resume_after_a_stop_in_every_stage_equals_an_uninterrupted_build(
    tmp_path, data_dir, ladder, profile, task_file, shipped
):
    from slmkit.build.options import BuildStopped
    from slmkit.build.pipeline import build

    out = tmp_path / "resumed"
    request = _request(data_dir, ladder, tasks=[str(task_file)])
    stops = ["data", "plan:feasibility", "plan", "train:60", "train:train", "compress:int8", "verify:held-out"]
    stops.append("ship:hf")
    for i, stop in enumerate(stops):
        with pytest.raises(BuildStopped, match=stop):
            build(request, out, resume=i > 0, machine=profile if i == 0 else None, stop_after=stop)
    state = json.loads((out / "build.json").read_text())
    assert state["stages"]["ship"]["steps"].keys() == {"hf"}  # stopped after the HF dir, before the GGUF file
    result = build(request, out, resume=True, stop_after="")
    assert result["stages"]["train"]["sessions"] == 3  # stopped at step 60 (a checkpoint at 50), then after training
    expected, _ = shipped
    assert _weights(out / "model") == _weights(expected / "model")
    assert _weights(out / "hf") == _weights(expected / "hf")
    assert (out / "model.gguf").read_bytes() == (expected / "model.gguf").read_bytes()


# ---- refused before any training ----------------------------------------------------------------------
def _machine_file(tmp_path, profile) -> Path:
    path = tmp_path / "earlier" / "build.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"machine": profile}))
    return path


def test_infeasible_latency_exits_2_before_training(tmp_path, data_dir, profile):
    out = tmp_path / "out"
    args = ["build", "--data", data_dir, "--budget", "1m", "--out", out, "--machine", _machine_file(tmp_path, profile)]
    result = run_slm(*args, "--max-latency", "0.2ms")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-latency 0.2ms cannot be met")
    assert "nearest feasible target is --max-latency 1.7ms" in lines[0]  # 1.5 ms measured, +10%
    assert not out.exists()  # refused before any work: nothing to --overwrite next time


def _with_slow_moe(profile):
    """The profile with a mixture-of-experts family that decodes at ~4x attention's latency."""
    out = json.loads(json.dumps(profile))
    out["train"] += [{**p, "mixer": "moe", "params": p["params"] * 3} for p in profile["train"]]
    out["decode"] += [{**p, "mixer": "moe", "depth": 2, "ms": p["ms"] * 4} for p in profile["decode"]]
    return out


def test_a_family_that_cannot_meet_the_latency_target_is_dropped_before_its_ladder(tmp_path, data_dir, profile):
    """`--mixer "attention;moe"` (or auto) with a latency target only one family meets: the other is dropped with
    a decision and gets no ladder; a target neither meets is refused as before."""
    from slmkit.build.options import BuildRequest, BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError

    machine = _with_slow_moe(profile)
    request = BuildRequest(data=[str(data_dir)], budget_seconds=60, threads=1, mixer="attention;moe", max_latency_ms=3)
    out = tmp_path / "out"
    with pytest.raises(BuildStopped):
        build(request, out, machine=machine, stop_after="plan:feasibility")
    state = json.loads((out / "build.json").read_text())
    feasible = state["stages"]["plan"]["steps"]["feasibility"]
    assert feasible["families"] == ["attention"]
    assert feasible["smallest_decode_ms_by_family"] == {"attention": 1.5, "moe": 6.0}
    dropped = [d["decision"] for d in state["decisions"] if d["decision"].startswith("family moe dropped")]
    assert dropped == [
        "family moe dropped: its smallest model (64x2) decodes at 6.000 ms/token here, over "
        "--max-latency 3ms (no ladder is run for it)"
    ]
    refused = BuildRequest(**{**request.to_dict(), "max_latency_ms": 1.0})
    with pytest.raises(UserError, match="--max-latency 1ms cannot be met here"):
        build(refused, tmp_path / "refused", machine=machine)


def test_a_slow_first_latency_reading_is_timed_again_before_a_refusal(tmp_path, data_dir, profile, monkeypatch):
    """A measured build whose smallest model read over the target is timed twice more and judged on the fastest
    reading (a first timing in a process read 0.23 ms for a 64x2 that decodes at 0.13), so noise does not refuse
    a target the machine meets; a replay (--machine) times nothing and judges its recorded timings."""
    from slmkit.build import stages
    from slmkit.build.options import BuildRequest, BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError
    from slmkit.scaling import planner

    calls = []
    monkeypatch.setattr(stages.machine_mod, "measure", lambda *a, **k: json.loads(json.dumps(PROFILE_WITH(profile))))
    monkeypatch.setattr(planner, "measure_decode_ms", lambda shape, vocab, context: calls.append(shape) or 1.1)
    request = BuildRequest(data=[str(data_dir)], budget_seconds=60, threads=1, max_latency_ms=1.2)
    out = tmp_path / "out"
    with pytest.raises(BuildStopped):
        build(request, out, stop_after="plan:feasibility")
    feasible = json.loads((out / "build.json").read_text())["stages"]["plan"]["steps"]["feasibility"]
    assert len(calls) == 2 and feasible["smallest_decode_ms_by_family"] == {"attention": 1.1}
    calls.clear()
    with pytest.raises(UserError, match="--max-latency 1.2ms cannot be met here"):
        build(request, tmp_path / "replayed", machine=profile)  # 1.5 ms recorded: refused, nothing timed
    assert calls == []


def test_families_that_cannot_meet_the_latency_target_are_not_timed_in_full(tmp_path, data_dir, profile, monkeypatch):
    """With a latency target and several families, each family's smallest model is decoded first; a family over the
    target (after two more timings) gets no training or decode timings and no ladder: the measurement covers the
    others, and the feasibility check drops it on that timing without timing it again."""
    from slmkit.build import stages
    from slmkit.build.options import BuildRequest, BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.scaling import planner
    from slmkit.scaling.shapes import Shape

    calls, measured = [], []
    speeds = {"attention": 1.0, "moe": 5.0}
    monkeypatch.setattr(planner, "measure_decode_ms", lambda shape, v, c: calls.append(shape) or speeds[shape.mixer])

    def measure(vocab, context, batch, shapes, device, on_status=None):
        measured.extend(shapes)
        timed = json.loads(json.dumps(PROFILE_WITH(profile)))
        timed["decode"][0]["ms"] = 1.0  # 64x2 as the screening read it: within the target, not timed again
        return timed

    monkeypatch.setattr(stages.machine_mod, "measure", measure)
    request = BuildRequest(
        data=[str(data_dir)], budget_seconds=60, threads=1, mixer="attention;moe", max_latency_ms=1.2
    )
    out = tmp_path / "out"
    with pytest.raises(BuildStopped):
        build(request, out, stop_after="plan:feasibility")
    assert measured and {s.mixer for s in measured} == {"attention"}
    assert [s.mixer for s in calls] == ["attention", "moe", "moe", "moe"]  # moe: over, then timed twice more
    state = json.loads((out / "build.json").read_text())
    assert [p for p in state["machine"]["decode"] if p.get("mixer") == "moe"] == [
        {
            "shape": "64x2",
            "mixer": "moe",
            "total_params": Shape(64, 2, "moe").config(profile["vocab_size"], 64).num_params(),
            "depth": 2,
            "ms": 5.0,
            "retimed": True,
        }
    ]
    feasible = state["stages"]["plan"]["steps"]["feasibility"]
    assert feasible["families"] == ["attention"] and feasible["smallest_decode_ms_by_family"]["moe"] == 5.0


def PROFILE_WITH(profile):  # noqa: N802 - the profile a measurement "returns" in the test above
    return {k: v for k, v in profile.items() if k != "post"}


def test_infeasible_size_names_the_nearest_feasible_size(tmp_path, data_dir, ladder, profile):
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError

    with pytest.raises(UserError, match=r"--max-size 0.01MB cannot be met.*nearest feasible target is --max-size"):
        build(_request(data_dir, ladder, max_size_bytes=10_000), tmp_path / "out", machine=profile)
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_resume_or_overwrite(tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = run_slm("build", "--data", data_dir, "--budget", "1m", "--out", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --out") and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert (out / "mine.txt").read_text() == "keep me"
    result = run_slm("build", "--data", data_dir, "--budget", "1m", "--out", out, "--resume")
    assert result.returncode == 2 and "holds no build.json" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "ten minutes"], "give a duration with a unit"),
        (["--budget", "0m"], "more than zero"),
        (["--budget", "5m", "--max-size", "20 parsecs"], "--max-size"),
        (["--budget", "5m", "--max-latency", "-1ms"], "--max-latency"),
    ],
)
def test_bad_options_exit_2(tmp_path, data_dir, args, message):
    result = run_slm("build", "--data", data_dir, "--out", tmp_path / "out", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_and_empty_corpus_exit_2(tmp_path):
    result = run_slm("build", "--data", tmp_path / "nowhere.txt", "--budget", "1m", "--out", tmp_path / "a")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "nowhere.txt" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_slm("build", "--data", empty, "--budget", "1m", "--out", tmp_path / "b")
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr


def test_resume_with_other_options_is_refused(tmp_path, data_dir, ladder, profile):
    from slmkit.build.options import BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError

    out = tmp_path / "out"
    with pytest.raises(BuildStopped):
        build(_request(data_dir, ladder), out, machine=profile, stop_after="data")
    with pytest.raises(UserError, match="budget_seconds"):
        build(_request(data_dir, ladder, budget_seconds=120), out, resume=True)


def test_parsers():
    from slmkit.build.options import parse_duration, parse_latency, parse_size

    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400 and parse_duration("2min") == 120
    assert parse_size("20MB") == 20_000_000 and parse_size("1MiB") == 2**20
    assert parse_latency("5ms") == 5 and parse_latency("800us") == pytest.approx(0.8)


def test_cli_stop_hook_and_resume(tmp_path, data_dir, profile, monkeypatch):
    """SLMKIT_BUILD_STOP_AFTER stops the CLI as a kill would (exit 3, finished steps kept); --resume goes on."""
    out = tmp_path / "out"
    args = ["build", "--data", data_dir, "--budget", "1m", "--out", out, "--machine", _machine_file(tmp_path, profile)]
    monkeypatch.setenv("SLMKIT_BUILD_STOP_AFTER", "data")
    result = run_slm(*args)
    assert result.returncode == 3, result.stderr
    assert "stopped after data" in result.stderr and "--resume" in result.stderr
    monkeypatch.setenv("SLMKIT_BUILD_STOP_AFTER", "plan:feasibility")
    result = run_slm(*args, "--resume")
    assert result.returncode == 3, result.stderr
    state = json.loads((out / "build.json").read_text())
    assert state["stages"]["data"]["done"] and list(state["stages"]["plan"]["steps"]) == ["measure", "feasibility"]
    assert state["machine"]["train"] == profile["train"]  # replayed, not measured


def test_too_small_a_budget_is_refused_before_the_ladder(tmp_path, data_dir, profile):
    from slmkit.build.options import BuildRequest
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError

    request = BuildRequest(data=[str(data_dir)], budget_seconds=10, threads=1)  # no --fit: a ladder would run
    with pytest.raises(UserError, match=r"--budget 10s is too small.*nearest feasible budget is --budget"):
        build(request, tmp_path / "out", machine=profile)
    assert not (tmp_path / "out").exists()


# ---- the budget: post-training work reserved, training's deadline, planned vs spent -----------------------
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_plan_reserves_what_the_post_training_stages_took(tmp_path, shipped, data_dir, ladder, profile):
    from slmkit.build import costs
    from slmkit.build.options import BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.scaling.shapes import Shape

    out, state = shipped
    parts = [p for names in costs.PARTS.values() for p in names]
    plan, budget = state["plan"], state["request"]["budget_seconds"]
    reserved = plan["reserved"]
    assert set(reserved) == set(parts)
    # training's deadline on the build's clock = budget - the reserved post-training work, and the planner trained
    # for the time from the work before training to that deadline, less the run's validations and checkpoints
    assert plan["train_ends_by"] == pytest.approx(budget - sum(reserved.values()))
    assert plan["train_minutes"] * 60 == pytest.approx(
        plan["train_ends_by"] - plan["before_train_seconds"] - plan["train_overhead_seconds"]
    )
    assert plan["before_train_seconds"] == 0  # a replay with --fit: nothing before training is counted
    stages = costs.by_stage(reserved)
    planned = plan["stage_seconds"]
    for name in ("compress", "verify", "ship"):
        assert planned[name] == pytest.approx(stages[name]) and planned[name] > 0
    assert planned["train"] == pytest.approx(plan["train_ends_by"] - plan["before_train_seconds"] + stages["train"])
    # the reservation holds the work it is made for: a build without timings of the post-training work times it
    # here (the same functions on the smallest model), and what that predicts for the shipped build's shape is at
    # least what its stages after training took (the reservation carries costs.MARGIN for the load changing)
    untimed = {k: v for k, v in profile.items() if k != "post"}
    with pytest.raises(BuildStopped):
        build(_request(data_dir, ladder), tmp_path / "probe", machine=untimed, stop_after="plan:post-costs")
    post = json.loads((tmp_path / "probe" / "build.json").read_text())["machine"]["post"]
    assert set(parts) <= set(post["seconds"]) and all(post["seconds"][p] >= 0 for p in parts)
    shape = Shape(plan["width"], plan["depth"], plan["mixer"])
    timed = costs.by_stage(costs.reserve({**profile, "post": post}, shape, profile["vocab_size"], plan["context"], 3))
    after = ("compress", "verify", "ship")
    spent = sum(state["stages"][name]["seconds"] for name in after)
    report = {n: (timed[n], state["stages"][n]["seconds"]) for n in after}
    # wall times of one process: the shipped build paid first-call costs (kernel loads, imports) that the probe,
    # run later in the same process, did not (7% over in a run of tests/build alone); a part left out of the
    # reservation (verify's evaluation is half of it) is far more than the slack allowed here
    assert spent <= 1.25 * sum(timed[name] for name in after), report
    # planned and spent side by side in the terminal summary, the card and the report
    from slmkit.build.pipeline import summary_lines

    lines = summary_lines(state)
    assert "% of the budget)" in lines[0] and "planned" in lines[1] and "spent" in lines[1]
    assert "| planned |" in (out / "README.md").read_text()
    assert "planned seconds" in (out / "report.html").read_text()


def test_reservation_scales_with_the_shape_and_candidates(profile):
    from slmkit.build import costs
    from slmkit.scaling.shapes import Shape

    post = {
        "shape": "64x2",
        "vocab_size": profile["vocab_size"],
        "context": 32,
        "total_params": 107136,
        "seconds": {p: 1.0 for names in costs.PARTS.values() for p in names} | {"save": 0.5},
        "tokens": {p: 0 for names in costs.PARTS.values() for p in names} | {"held_out": 8192, "evaluate": 8192},
    }
    timed = {**profile, "post": post}
    small = costs.reserve(timed, Shape(64, 2), profile["vocab_size"], 32, candidates=0)
    # the probe's own shape: its seconds with the margin; no candidates reserved when the float model ships
    assert small["evaluate"] == pytest.approx(1.0 * costs.MARGIN) and small["compress_candidates"] == 0
    big = costs.reserve(timed, Shape(128, 4), profile["vocab_size"], 32, candidates=3)
    assert big["compress_candidates"] == pytest.approx(3 * costs.MARGIN)  # no scored tokens: kept as timed
    assert big["evaluate"] > small["evaluate"] and big["held_out"] > small["held_out"]  # forward work scales
    assert big["hf"] == small["hf"]  # fixed work does not
    assert costs.by_stage(big)["verify"] == pytest.approx(big["held_out"] + big["evaluate"])


def test_training_deadline_is_the_budget_less_the_reserved_work():
    from slmkit.build import costs

    plan = {"train_ends_by": 100.0, "train_overhead_seconds": 5.0}
    minutes, left = costs.step_minutes(plan, spent=30.0)
    assert left == 65.0 and minutes == pytest.approx(65.0 / 60)
    minutes, _ = costs.step_minutes(plan, spent=60.0, done=20.0)  # a resumed run: its earlier steps count
    assert minutes == pytest.approx((20.0 + 35.0) / 60)
    minutes, left = costs.step_minutes(plan, spent=120.0)  # past the deadline: one second of steps, then ship
    assert left < 0 and minutes == pytest.approx(1 / 60)


def test_a_budget_that_cannot_hold_the_post_training_work_is_refused(tmp_path, data_dir, ladder, profile):
    from slmkit.build import costs
    from slmkit.build.pipeline import build
    from slmkit.errors import UserError

    parts = [p for names in costs.PARTS.values() for p in names]
    post = {
        "shape": "64x2",
        "vocab_size": profile["vocab_size"],
        "context": 64,
        "total_params": 107136,
        "seconds": dict.fromkeys(parts, 10.0),  # 100+ s after training: more than the 60 s budget
        "tokens": dict.fromkeys(parts, 0),
    }
    with pytest.raises(UserError, match=r"--budget 1m is too small.*predicted at \d+ s.*nearest feasible budget is"):
        build(_request(data_dir, ladder), tmp_path / "out", machine={**profile, "post": post})
    assert not (tmp_path / "out").exists()


def test_machine_profile_times_a_deep_thin_shape_for_the_decode_fit():
    """A real (not replayed) measurement: every shape trains and decodes, the deep, thin probe decodes only, and
    each decode timing records its depth, so the planner's decode line can separate layers from parameters."""
    from slmkit.build import machine
    from slmkit.scaling.shapes import Shape

    shapes = [Shape(64, 2), Shape(96, 2)]
    profile = machine.measure(97, 16, 2, shapes)
    assert [p["shape"] for p in profile["train"]] == ["64x2", "96x2"]
    decode = {p["shape"]: p for p in profile["decode"]}
    assert set(decode) == {"64x2", "96x2", machine.DEPTH_PROBE.name}
    assert decode[machine.DEPTH_PROBE.name]["depth"] == 8 and decode["96x2"]["depth"] == 2
    assert all(p["ms"] > 0 for p in profile["decode"])
    timer = machine.decode_timer(profile)
    assert timer(Shape(64, 8), 97, 16) == decode["64x8"]["ms"]  # a timed shape reads its own timing
    assert timer(Shape(80, 4), 97, 16) > 0


def test_latency_checks_are_timed_once_and_kept_for_resumes_and_replays(monkeypatch):
    """The planner's timings of members near a latency cap land in the profile (build.json), so planning again
    (a resume) reads them; a --machine replay times nothing: a member it has no timing of reads the line."""
    from slmkit.build import machine
    from slmkit.scaling import planner
    from slmkit.scaling.shapes import Shape

    calls = []
    monkeypatch.setattr(planner, "checked_decode_ms", lambda shape, vocab, context: calls.append(shape) or 0.5)
    profile = json.loads(json.dumps({**PROFILE, "vocab_size": 97}))
    timer = machine.check_timer(profile)
    assert timer(Shape(96, 3), 97, 32) == 0.5 and timer(Shape(96, 3), 97, 32) == 0.5
    assert calls == [Shape(96, 3)] and profile["decode_checked"] == {"attention:96x3:97:32": 0.5}
    replay = machine.check_timer(json.loads(json.dumps(profile)), replay=True)
    assert replay(Shape(96, 3), 97, 32) == 0.5
    assert replay(Shape(128, 3), 97, 32) == machine.decode_timer(profile)(Shape(128, 3), 97, 32) != 0.5
    assert len(calls) == 1


def test_flops_rate_reads_timed_shapes_and_interpolates_between_them():
    from slmkit.build import machine

    points = [(1e5, 2e10), (4e5, 6e10), (1.6e6, 9e10), (4e5, 4e10)]  # two shapes of one size: their mean
    profile = {"train": [{"shape": f"s{i}", "params": n, "flops_per_second": r} for i, (n, r) in enumerate(points)]}
    rate = machine.flops_rate(profile)
    assert rate(1e5) == pytest.approx(2e10) and rate(1.6e6) == pytest.approx(9e10)
    assert rate(4e5) == pytest.approx((6e10 * 4e10) ** 0.5)  # geometric mean (log-log)
    assert rate(2e5) == pytest.approx((2e10 * rate(4e5)) ** 0.5)  # half-way in log params: half-way in log rate
    assert rate(10.0) == pytest.approx(2e10) and rate(1e9) == pytest.approx(9e10)  # the ends beyond the range


def test_each_mixer_family_reads_its_own_training_rates_and_decode_timings(monkeypatch):
    """A profile timed in several families (`--mixer auto`): flops_rate and decode_timer read each family's own
    points (a mixture of experts' step or decode costs what an attention model of its size does not), points
    without a mixer are attention's, and a shape timed in one family is timed again in another."""
    from slmkit.build import machine
    from slmkit.scaling import ladder
    from slmkit.scaling.shapes import Shape

    profile = json.loads(json.dumps({**PROFILE, "vocab_size": 97}))  # PROFILE's points name no mixer: attention
    profile["train"] += [
        {"shape": "64x2", "mixer": "moe", "params": 3e5, "tokens_per_second": 1e3, "flops_per_second": 5e8},
        {"shape": "128x4", "mixer": "moe", "params": 2.4e6, "tokens_per_second": 2e2, "flops_per_second": 7e8},
    ]
    profile["decode"] += [
        {"shape": "64x2", "mixer": "moe", "total_params": 3.2e5, "depth": 2, "ms": 3.0},
        {"shape": "128x4", "mixer": "moe", "total_params": 2.6e6, "depth": 4, "ms": 9.0},
    ]
    attention, moe = machine.flops_rate(profile), machine.flops_rate(profile, "moe")
    assert attention(86336) == pytest.approx(2.2e9) and attention(7e5) == pytest.approx(3e9)
    assert moe(3e5) == pytest.approx(5e8) and moe(2.4e6) == pytest.approx(7e8) and moe(86336) == pytest.approx(5e8)
    hybrid = machine.flops_rate(profile, "hybrid")  # a family timed nowhere (a --machine replay): every point
    assert hybrid(3e5) == pytest.approx(5e8) and hybrid(7e5) == pytest.approx(3e9)
    timer = machine.decode_timer(profile)
    assert timer(Shape(64, 2), 97, 32) == 1.5 and timer(Shape(64, 2, "moe"), 97, 32) == 3.0
    assert timer(Shape(128, 4, "moe"), 97, 32) == 9.0 and timer(Shape(128, 4), 97, 32) == 4.0
    assert timer(Shape(96, 3, "moe"), 97, 32) > timer(Shape(96, 3), 97, 32)  # each family's own line

    calls = []
    monkeypatch.setattr(ladder, "measure_train_throughput", lambda shape, vocab, s: calls.append(shape) or 100.0)
    moe_128x4 = Shape(128, 4, "moe").config(97, 32).num_params(False)
    profile["train"][-1]["params"] = moe_128x4
    assert machine.check_train_rate(profile, Shape(128, 4, "moe"), "cpu") is None  # timed in its family
    assert machine.check_train_rate(profile, Shape(96, 6, "moe"), "cpu") is not None
    assert profile["train"][-1]["mixer"] == "moe" and calls == [Shape(96, 6, "moe")]
    # a moe point is not read as attention's
    profile["train"].append({**profile["train"][-1], "params": 555555.0})
    attention_555 = machine.flops_rate(profile)(555555.0)
    assert attention_555 != pytest.approx(profile["train"][-1]["flops_per_second"])


def test_the_planned_shapes_training_rate_is_timed_once_and_kept(monkeypatch):
    """machine.check_train_rate times a shape the profile has no training timing of, adds it (so flops_rate reads
    it), and says how far the profile was off; a timed shape or a replay times nothing."""
    from slmkit.build import machine
    from slmkit.scaling import ladder
    from slmkit.scaling.shapes import Shape

    calls = []
    monkeypatch.setattr(
        ladder, "measure_train_throughput", lambda shape, vocab, settings: calls.append(settings) or 1000.0
    )
    profile = json.loads(json.dumps({**PROFILE, "vocab_size": 97}))
    shape = Shape(96, 6)
    estimate = machine.flops_rate(profile)(shape.config(97, 32).num_params(False))
    ratio = machine.check_train_rate(profile, shape, "cpu")
    point = profile["train"][-1]
    assert point["shape"] == "96x6" and point["checked"] and point["tokens_per_second"] == 1000.0
    assert point["flops_per_second"] == 1000.0 * shape.config(97, 32).flops_per_token(32)
    assert ratio == pytest.approx(point["flops_per_second"] / estimate)
    assert machine.flops_rate(profile)(point["params"]) == pytest.approx(point["flops_per_second"])
    assert (calls[0].seq_len, calls[0].batch_size) == (32, 16)  # at the profile's context and batch
    assert machine.check_train_rate(profile, shape, "cpu") is None  # timed once
    assert machine.check_train_rate(profile, Shape(64, 2), "cpu") is None  # a profile shape
    assert machine.check_train_rate(json.loads(json.dumps(profile)), Shape(80, 3), "cpu", replay=True) is None
    assert len(calls) == 1


def test_a_measured_build_plans_on_the_planned_shapes_own_training_rate(
    tmp_path, data_dir, ladder, profile, monkeypatch
):
    """Planning times the planned shape's training steps and plans again with them until the plan is a timed
    shape: the plan's minutes are then its own rate's, not the line's (which a 80x6 plan missed by 21%)."""
    from slmkit.build import machine
    from slmkit.build.options import BuildStopped
    from slmkit.build.pipeline import build
    from slmkit.scaling import ladder as ladder_mod

    monkeypatch.setattr(machine, "measure", lambda *args, **kwargs: json.loads(json.dumps(profile)))
    monkeypatch.setattr(ladder_mod, "measure_train_throughput", lambda shape, vocab, settings: 300.0)  # slow
    with pytest.raises(BuildStopped):
        build(_request(data_dir, ladder, max_size_bytes=None), tmp_path / "out", stop_after="plan")
    state = json.loads((tmp_path / "out" / "build.json").read_text())
    plan, checked = state["plan"], [p for p in state["machine"]["train"] if p.get("checked")]
    assert checked and len(checked) <= 3
    planned = f"{plan['width']}x{plan['depth']}"
    own = next((p for p in state["machine"]["train"] if p["shape"] == planned), None)
    if own is not None:  # settled on a timed shape: its minutes at its own rate
        assert plan["predicted_minutes"] * 60 == pytest.approx(plan["flops"] / own["flops_per_second"], rel=1e-6)
    else:  # three timings and still moving: the last plan read the line through all of them
        assert len(checked) == 3


def test_the_planned_run_takes_the_quickstarts_recipe_on_top_of_the_plans():
    from slmkit.build.stages import BUILD_EMBED_LR_SCALE, run_recipe
    from slmkit.train.config import TrainConfig

    plan = {
        "preset": "tiny",
        "model": {"d_model": 64, "n_layers": 2},
        "seq_len": 128,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 100,
        "schedule": "cosine",
        "optimizer": "muon",
        "max_tokens": 2048 * 3000,
    }
    config = run_recipe(plan, untie=True)
    assert config["schedule"] == "wsd" and config["embed_lr_scale"] == BUILD_EMBED_LR_SCALE
    assert config["warmup_steps"] == 30 and config["decay_fraction"] == 0.3  # the quickstart's
    assert run_recipe({**plan, "warmup_steps": 12}, untie=True)["warmup_steps"] == 12  # a shorter plan's stays
    assert config["seq_len_warmup_steps"] == 100 and config["seq_len_warmup_start"] == 64
    assert config["model"] == {"d_model": 64, "n_layers": 2, "tie_embeddings": False}
    assert plan["model"] == {"d_model": 64, "n_layers": 2} and plan["schedule"] == "cosine"  # the plan is untouched
    TrainConfig.from_dict(config, source="test")  # a valid training config
    # --max-size counts bytes of weights: the head stays tied; a short run warms up over a tenth of its steps
    short = run_recipe({**plan, "max_tokens": 2048 * 200}, untie=False)
    assert "tie_embeddings" not in short["model"] and short["seq_len_warmup_steps"] == 20
    # a context no longer than the warm-up's start has nothing to warm up
    assert "seq_len_warmup_steps" not in run_recipe({**plan, "seq_len": 64}, untie=False)
