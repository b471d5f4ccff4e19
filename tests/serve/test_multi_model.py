"""Several models in one server (`slm serve --model small=DIR --model large=DIR`) and the cascade router over them
(`slmkit.serve.cascade`): each model's own greedy output, the router at its threshold extremes, strong-call share
against the threshold, per-model memory and metrics, bad inputs."""

from __future__ import annotations

import json
import math
import socket

import pytest
from fastapi.testclient import TestClient

from slmkit.errors import UserError
from slmkit.serve.app import create_app, parameter_bytes
from slmkit.serve.cascade import DEFAULT_CASCADE_THRESHOLD, cascade, confidence, strong_share
from slmkit_testing import run_slm

PROMPTS = ["The cat sat on the mat", "A", "language models compress text", "one two three one two three"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def large_model_dir(shaken_model_dir, tmp_path_factory):
    """A second model with the same tokenizer: one layer more than the small one, other (shaken) weights."""
    import dataclasses

    import torch

    from slmkit.api import load
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    small = load(shaken_model_dir, device="cpu").model
    torch.manual_seed(1)
    model = build_model(dataclasses.replace(small.config, n_layers=small.config.n_layers + 1))
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return save_model(model, tmp_path_factory.mktemp("multi") / "large", tokenizer_dir=shaken_model_dir)


@pytest.fixture(scope="module")
def engines(shaken_model_dir, large_model_dir):
    from slmkit.infer.engine import Engine

    return {"small": Engine.load(shaken_model_dir, device="cpu"), "large": Engine.load(large_model_dir, device="cpu")}


@pytest.fixture(scope="module")
def client(shaken_model_dir, large_model_dir):
    with TestClient(create_app({"small": shaken_model_dir, "large": large_model_dir}, max_batch=4)) as c:
        yield c


def greedy(engine, prompt: str) -> str:
    return engine.generate(prompt, max_new_tokens=MAX_TOKENS)[0].text


def complete(client, model: str, prompt: str, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body)


def test_models_lists_every_model_and_the_router(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["small", "large", "router"]
    assert all(m["parent"] is None for m in data)
    assert data[2]["slmkit_router"] == {"kind": "cascade", "models": ["small", "large"], "threshold": -1.0}


def test_each_model_answers_with_its_own_greedy_output(client, shaken_model_dir, large_model_dir):
    import slmkit

    differ = False
    for prompt in PROMPTS[:3]:
        expected = {
            "small": slmkit.generate(str(shaken_model_dir), prompt, max_new_tokens=MAX_TOKENS, temperature=0),
            "large": slmkit.generate(str(large_model_dir), prompt, max_new_tokens=MAX_TOKENS, temperature=0),
        }
        for name, text in expected.items():
            r = complete(client, name, prompt)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name and r.json()["choices"][0]["text"] == text
        differ |= expected["small"] != expected["large"]
    assert differ  # else a server answering every request with one model would pass


def test_chat_picks_the_model(client, engines):
    messages = [{"role": "user", "content": "Hello"}]
    for name, engine in engines.items():
        body = {"model": name, "messages": messages, "max_tokens": 6, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        [expected] = engine.generate("<|user|>\nHello\n<|assistant|>\n", max_new_tokens=6)
        assert r.json()["choices"][0]["message"]["content"] == expected.text


def test_unknown_model_is_openai_shaped_404(client):
    r = complete(client, "medium", "The cat")
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "'medium'" in error["message"] and "'small'" in error["message"] and "'router'" in error["message"]
    r = client.post("/v1/chat/completions", json={"model": "medium", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def stream_text(client, body) -> tuple[str, dict, list[dict]]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        route = json.loads(r.headers["slmkit-route"])
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks), route, chunks


@pytest.mark.parametrize("threshold, answers", [(-math.inf, "small"), (math.inf, "large")])
def test_cascade_extremes_reproduce_each_model_alone(engines, threshold, answers):
    with TestClient(create_app(engines, max_batch=4, cascade_threshold=threshold)) as c:
        for prompt in PROMPTS[:3]:
            r = complete(c, "router", prompt)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == answers
            assert body["choices"][0]["text"] == greedy(engines[answers], prompt)
            route = body["slmkit_route"]
            assert route["answered_by"] == answers and json.loads(r.headers["slmkit-route"]) == route
            assert [s["model"] for s in route["chain"]] == (["small"] if answers == "small" else ["small", "large"])
            assert route["chain"][0]["accepted"] == (answers == "small")
            assert body["choices"][0]["logprobs"] is None  # computed for the decision, not asked for
            n_tokens = len(engines[answers].generate(prompt, max_new_tokens=MAX_TOKENS)[0].token_ids)
            assert body["usage"]["completion_tokens"] == n_tokens
            # streamed: the small model's answer buffered, or the large one streamed as it generates
            text, streamed_route, chunks = stream_text(
                c, {"model": "router", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            )
            assert text == greedy(engines[answers], prompt) and streamed_route["answered_by"] == answers
            assert streamed_route["chain"][-1]["completion_tokens"] == (None if answers == "large" else n_tokens)
            assert {ch["model"] for ch in chunks} == {answers} and chunks[-1]["usage"]["completion_tokens"] == n_tokens
        metrics = c.get("/metrics").text
        assert f'slm_router_strong_share{{router="router"}} {1.0 if answers == "large" else 0.0}' in metrics


def test_cascade_chat_and_logprobs(engines):
    with TestClient(create_app(engines, max_batch=4, cascade_threshold=math.inf)) as c:
        body = {"model": "router", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
        r = c.post("/v1/chat/completions", json={**body, "logprobs": True})
        assert r.status_code == 200, r.text
        [expected] = engines["large"].generate("<|user|>\nHi\n<|assistant|>\n", max_new_tokens=5, logprobs=True)
        assert r.json()["model"] == "large" and r.json()["choices"][0]["message"]["content"] == expected.text
        got = [e["logprob"] for e in r.json()["choices"][0]["logprobs"]["content"]]
        assert got == pytest.approx(expected.logprobs, abs=1e-4)
        # the final model's confidence is the mean of the logprobs it reports
        assert r.json()["slmkit_route"]["chain"][-1]["confidence"] == pytest.approx(confidence(got), abs=1e-4)


def test_strong_share_rises_with_the_threshold(engines, client):
    """At a threshold just above the k-th lowest confidence of the small model, exactly k of the prompts go to the
    large model; the server's router decides as the Python cascade does."""
    first = cascade(engines, PROMPTS, threshold=-math.inf, max_new_tokens=MAX_TOKENS)
    values = [a.chain[0].confidence for a in first]
    assert all(v is not None for v in values) and len(set(values)) > 1
    thresholds = [-math.inf, *(v + 1e-6 for v in sorted(values)), math.inf]
    shares = []
    for t in thresholds:
        answers = cascade(engines, PROMPTS, threshold=t, max_new_tokens=MAX_TOKENS)
        shares.append(strong_share(answers))
        assert shares[-1] == sum(v < t for v in values) / len(values)
        for a in answers:  # the kept answer is the greedy one of the model that answered
            assert a.text == greedy(engines[a.model], PROMPTS[answers.index(a)])
    assert shares == sorted(shares) and shares[0] == 0 and shares[-1] == 1
    # the server computes the same confidences
    for prompt, value in zip(PROMPTS, values, strict=True):
        route = complete(client, "router", prompt).json()["slmkit_route"]
        assert route["chain"][0]["confidence"] == pytest.approx(value, abs=1e-4)


def test_per_model_memory_metrics_and_health(client, engines):
    complete(client, "small", "The cat")
    complete(client, "router", "The cat")
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"small", "large"}
    sizes = {name: parameter_bytes(engine.model) for name, engine in engines.items()}
    assert sizes["large"] > sizes["small"]
    metrics = client.get("/metrics").text
    for name in ("small", "large"):
        model = health["models"][name]
        assert model["parameter_bytes"] == sizes[name] and model["kv_cache_bytes"] > 0
        assert f'slm_model_parameter_bytes{{model="{name}"}} {sizes[name]}' in metrics
        assert f'slm_model_kv_cache_bytes{{model="{name}"}} {model["kv_cache_bytes"]}' in metrics
    assert health["models"]["large"]["kv_cache_bytes"] > health["models"]["small"]["kv_cache_bytes"]  # a layer more
    counts = {
        line.split('"')[1]: int(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("slm_model_requests_total{")
    }
    assert counts["small"] >= 2 and set(counts) == {"small", "large"}
    assert 'slm_router_strong_calls_total{router="router"}' in metrics
    assert "slm_router_requests_total{router=" in metrics


def test_router_name_and_refusals(engines, shaken_model_dir, tmp_path):
    with TestClient(create_app(engines, router_name="auto", max_batch=2)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["small", "large", "auto"]
        r = c.post("/v1/completions", json={"model": "auto", "prompt": "The cat", "echo": True, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
        assert complete(c, "router", "x").status_code == 404
    with TestClient(create_app(engines, router_name=None, max_batch=2)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["small", "large"]
    with pytest.raises(UserError, match="also a model's"):
        create_app(engines, router_name="small")
    with pytest.raises(UserError, match="one model"):
        create_app(engines, adapters={"sql": tmp_path})
    with pytest.raises(UserError, match="model 'large'.*no such"):
        create_app({"small": shaken_model_dir, "large": tmp_path / "missing"})


def test_shutdown_stops_every_scheduler(engines):
    with TestClient(create_app(engines, max_batch=2)) as c:
        assert complete(c, "large", "The cat").status_code == 200
        schedulers = c.app.state.schedulers
        assert len(schedulers) == 2 and all(s.alive for s in schedulers)
    assert not any(s.alive for s in schedulers)


def test_cascade_function_needs_two_models(engines):
    with pytest.raises(UserError, match="two or more"):
        cascade({"small": engines["small"]}, "x")
    assert DEFAULT_CASCADE_THRESHOLD == -1.0  # what docs/serve.md and `slm serve --help` say


# ---- the learned router (slmkit.route) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_router(shaken_model_dir, large_model_dir):
    """A logistic router on the small model's features of random prompts (labels: an arbitrary split), marked as
    trained for (small, large)."""
    import numpy as np

    from slmkit.api import load
    from slmkit.route.features import prompt_features
    from slmkit.route.router import fit_router, model_fingerprint

    small = load(shaken_model_dir)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, small.config.vocab_size, size=rng.integers(2, 20)).tolist() for _ in range(60)]
    features = prompt_features(small, prompts)
    router = fit_router(features, (features[:, -1] > np.median(features[:, -1])).astype(float), d_model=64)
    router.models = {"weak": model_fingerprint(shaken_model_dir), "strong": model_fingerprint(large_model_dir)}
    return router


def saved_router(router, path, threshold: float, swap: bool = False):
    import copy

    router = copy.copy(router)
    router.threshold = threshold
    if swap:
        router.models = {"weak": router.models["strong"], "strong": router.models["weak"]}
    return router.save(path)


def test_learned_router_sends_each_prompt_where_it_decides(fitted_router, engines, shaken_model_dir, large_model_dir):
    dirs = {"small": shaken_model_dir, "large": large_model_dir}
    ids = [engines["small"].tokenizer.encode(p).ids for p in PROMPTS]
    probabilities = [fitted_router.strong_probability(engines["small"].model, i) for i in ids]
    assert len(set(probabilities)) > 1
    middle = sorted(probabilities)[len(PROMPTS) // 2]
    root = large_model_dir.parent
    for threshold, name in ((2.0, "never"), (-1.0, "always"), (middle, "middle")):
        path = saved_router(fitted_router, root / f"router-{name}", threshold)
        with TestClient(create_app(dirs, router=path, max_batch=2)) as c:
            entry = c.get("/v1/models").json()["data"][-1]
            assert entry["id"] == "router" and entry["slmkit_router"]["kind"] == "learned"
            assert entry["slmkit_router"]["threshold"] == pytest.approx(threshold, abs=1e-6)
            strong = []
            for prompt, p in zip(PROMPTS, probabilities, strict=True):
                expected = "large" if p >= threshold else "small"
                r = complete(c, "router", prompt)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model"] == expected and body["choices"][0]["text"] == greedy(engines[expected], prompt)
                assert body["slmkit_route"]["strong"] == (expected == "large")
                assert [s["model"] for s in body["slmkit_route"]["chain"]] == [expected]
                strong.append(expected == "large")
            share = sum(strong) / len(strong)
            assert share == {"never": 0.0, "always": 1.0}.get(name, share) and (name != "middle" or 0 < share < 1)
            assert f'slm_router_strong_share{{router="router"}} {share!r}' in c.get("/metrics").text


def test_router_trained_for_other_models_is_refused(
    fitted_router, shaken_model_dir, large_model_dir, busy_port, capsys
):
    from slmkit.cli import run

    path = saved_router(fitted_router, large_model_dir.parent / "router-swapped", 0.5, swap=True)
    with pytest.raises(UserError, match="another weak model"):
        create_app({"small": shaken_model_dir, "large": large_model_dir}, router=path)
    small, large = f"small={shaken_model_dir}", f"large={large_model_dir}"
    cases = {
        "trained for another weak model": ["--model", small, "--model", large, "--router", str(path)],
        "needs two models": ["--model", small, "--router", str(path)],
        "no such router directory": ["--model", small, "--model", large, "--router", str(path.parent / "nope")],
    }
    for expected, args in cases.items():
        code = run(["serve", *args, "--port", str(busy_port)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# ---- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def busy_port():
    """A port already in use: an error that names the models (not the port) shows they were checked first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_bad_model_options_are_one_error_line_before_binding(shaken_model_dir, tmp_path, busy_port, capsys):
    from slmkit.cli import run

    small = f"small={shaken_model_dir}"
    cases = {
        "NAME=DIR": ["--model", str(shaken_model_dir)],
        "given twice": ["--model", small, "--model", small],
        "no such model": ["--model", small, "--model", f"large={tmp_path / 'missing'}"],
        "not both": [str(shaken_model_dir), "--model", small],
        "no --lora": ["--model", small, "--model", f"large={shaken_model_dir}", "--lora", f"a={tmp_path}"],
        "also a model's name": ["--model", small, "--model", f"router={shaken_model_dir}"],
        "give a model": [],
    }
    for expected, args in cases.items():
        code = run(["serve", *args, "--port", str(busy_port)])
        err = capsys.readouterr().err
        assert code == 2, (expected, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (expected, err)


def test_slm_serve_bad_model_value_exits_2(tmp_path):
    r = run_slm("serve", "--model", "small=", "--model", f"large={tmp_path}", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --model 'small='") and len(r.stderr.splitlines()) == 1
