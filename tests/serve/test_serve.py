"""The OpenAI-compatible server, through FastAPI's TestClient (in-process) and one live `slm serve` process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from slmkit.infer.engine import Engine
from slmkit.serve.app import create_app
from slmkit_testing import SRC, run_slm


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The tiny model with its weights shaken: the briefly trained one repeats one token for every prompt, which
    could not tell one request's output from another's; these weights give varied, prompt-dependent text."""
    import torch

    engine = Engine.load(tiny_model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return engine


@pytest.fixture(scope="module")
def client(engine, tiny_model_dir):
    with TestClient(create_app(engine, model_name=tiny_model_dir.name)) as c:
        yield c


@pytest.fixture(scope="module")
def name(tiny_model_dir):
    return tiny_model_dir.name


def healthy(client):
    r = client.get("/health")
    return r.status_code == 200 and r.json()["status"] == "ok"


def test_models_and_completion_match_engine(client, engine, name):
    r = client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [name]
    r = client.post("/v1/completions", json={"model": name, "prompt": "The cat", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = engine.generate("The cat", max_new_tokens=8)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    n_prompt = len(engine.tokenizer.encode("The cat").ids)
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(expected.token_ids),
        "total_tokens": n_prompt + len(expected.token_ids),
    }


def test_chat_uses_default_template(client, engine, name):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.post(
        "/v1/chat/completions", json={"model": name, "messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = engine.generate("<|user|>\nHello\n<|assistant|>\n", max_new_tokens=6)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)


def test_chat_template_from_tokenizer_config(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "chatty"
    shutil.copytree(tiny_model_dir, model)
    (model / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}A:"})
    )
    with TestClient(create_app(model)) as c:
        body = {"model": "chatty", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    [expected] = Engine.load(model).generate("[user] Hi A:", max_new_tokens=5)
    assert r.json()["choices"][0]["message"]["content"] == expected.text


def parse_sse(text):
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_completion_and_chat(client, engine, name):
    body = {"model": name, "prompt": "The cat", "max_tokens": 10, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = parse_sse(r.read().decode())
    [expected] = engine.generate("The cat", max_new_tokens=10)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)
    assert all(c["object"] == "text_completion" for c in chunks)

    body = {
        "model": name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "stream": True,
        "temperature": 0,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = parse_sse(r.read().decode())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    [expected] = engine.generate("<|user|>\nHi\n<|assistant|>\n", max_new_tokens=6)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_seed_reproducibility(client, name):
    body = {"model": name, "prompt": "Once upon", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    outs = {client.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"] for s in range(8, 12)}
    assert a == b
    assert len(outs | {a}) > 1  # different seeds give different samples


def test_stop_sequence(client, engine, name):
    [full] = engine.generate("The cat", max_new_tokens=20)
    stop = next(ch for ch in full.text[2:] if ch.isalnum())
    r = client.post(
        "/v1/completions", json={"model": name, "prompt": "The cat", "max_tokens": 20, "temperature": 0, "stop": [stop]}
    )
    choice = r.json()["choices"][0]
    assert choice["text"] == full.text[: full.text.index(stop)]
    assert choice["finish_reason"] == "stop"


def test_concurrent_requests_batch_and_match_alone(client, engine, name):
    prompts = ["The cat", "Once upon a time", "A", "The dog sat on the mat and", "Hello", "It was"]
    alone = [engine.generate(p, max_new_tokens=10)[0].text for p in prompts]
    assert len(set(alone)) == len(prompts)
    scheduler = client.app.state.scheduler
    gate, sizes, original = threading.Event(), [], scheduler._run_batch

    def recorded(jobs):
        gate.wait(30)  # the first round holds the worker until all six requests wait in the queue
        sizes.append(len(jobs))
        original(jobs)

    scheduler._run_batch = recorded
    results: dict[int, str] = {}

    def call(i, prompt):
        body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        results[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    try:
        blocker = threading.Thread(target=call, args=(-1, "x"))
        blocker.start()
        while scheduler.running == 0:
            time.sleep(0.01)
        threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        while scheduler.queue_depth < len(prompts):
            time.sleep(0.01)
        gate.set()
        for t in [blocker, *threads]:
            t.join(60)
    finally:
        scheduler._run_batch = original
    assert sizes == [1, len(prompts)]  # the six waiting requests ran as one batch
    assert [results[i] for i in range(len(prompts))] == alone
    metrics = client.get("/metrics").text
    assert 'slm_requests_total{path="/v1/completions",status="200"}' in metrics
    assert "slm_queue_depth 0" in metrics
    assert f"slm_last_batch_size {len(prompts)}" in metrics


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", "not json", 400, None),
        ("/v1/completions", {"prompt": "x"}, 400, "model"),
        ("/v1/completions", {"model": "NAME", "prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": "NAME", "prompt": "word " * 500}, 400, "prompt"),
        ("/v1/completions", {"model": "NAME", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "seed": 2**70, "temperature": 1}, 400, "seed"),
        ("/v1/completions", {"model": "NAME", "prompt": ["x"] * 33}, 400, "prompt"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "stop": ["a"] * 5}, 400, "stop"),
        ("/v1/completions", [1, 2], 400, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/chat/completions", {"model": "NAME", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "NAME", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ("/v1/chat/completions", {"model": "NAME", "messages": "hi"}, 400, "messages"),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors(client, name, path, body, status, param):
    if isinstance(body, dict) and body.get("model") == "NAME":
        body = {**body, "model": name}
    if isinstance(body, str):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    assert healthy(client)


def test_api_key(engine, name):
    with TestClient(create_app(engine, api_key="s3cret", model_name=name)) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for load balancers


def test_queue_full_gives_503_with_retry_after(engine, name):
    app = create_app(engine, max_queue=1, model_name=name)
    scheduler = app.state.scheduler
    with TestClient(app) as c:
        gate = threading.Lock()
        gate.acquire()
        original = scheduler._run_batch

        def blocked(jobs):
            with gate:
                original(jobs)

        scheduler._run_batch = blocked
        body = {"model": name, "prompt": "x", "max_tokens": 2}
        first = threading.Thread(target=lambda: c.post("/v1/completions", json=body))  # taken by the worker, blocks
        first.start()
        while scheduler.running == 0:
            time.sleep(0.01)
        second = threading.Thread(target=lambda: c.post("/v1/completions", json=body))  # waits in the queue
        second.start()
        while scheduler.queue_depth == 0:
            time.sleep(0.01)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        gate.release()
        first.join(30)
        second.join(30)
        assert healthy(c)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tiny_model_dir):
    """`slm serve` as a user starts it, on a free loopback port, with an API key."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmkit", "serve", str(tiny_model_dir), "--port", str(port), "--api-key", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def test_openai_client_against_live_server(live_server, tiny_model_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{live_server}/v1", api_key="k", max_retries=0)
    name = tiny_model_dir.name
    assert [m.id for m in client.models.list()] == [name]

    out = client.completions.create(model=name, prompt="The cat", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=name, prompt="The cat", max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=1, seed=3)
    again = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=1, seed=3)
    assert chat.choices[0].message.content == again.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=1, seed=3, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=name, prompt="x", max_tokens=10**6)
    assert urllib.request.urlopen(f"{live_server}/health", timeout=5).status == 200


def test_slm_serve_bad_model(tmp_path):
    r = run_slm("serve", tmp_path / "missing")
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def test_cancelled_stream_stops_and_worker_goes_on(engine):
    import asyncio

    from slmkit.infer.sampling import SamplingParams
    from slmkit.serve.scheduler import Job, Scheduler

    class ClientLeavesAfterFirstDelta(Job):
        def put(self, kind, value):
            super().put(kind, value)
            if kind == "delta":
                self.cancelled.set()  # as the SSE generator's `finally` does when the client disconnects

    async def scenario():
        scheduler = Scheduler(engine)
        loop = asyncio.get_running_loop()
        ids = engine.tokenizer.encode("The cat").ids
        left = ClientLeavesAfterFirstDelta(ids, 60, SamplingParams(), (), True, loop)
        scheduler.submit(left)
        kinds = [(await asyncio.wait_for(left.events.get(), 60))[0]]
        after = Job(ids, 4, SamplingParams(), (), False, loop)  # queued behind the cancelled stream
        scheduler.submit(after)
        kind, result = await asyncio.wait_for(after.events.get(), 60)
        assert kind == "done" and result.completion_tokens == 4
        while not left.events.empty():
            kinds.append(left.events.get_nowait()[0])
        scheduler.close()
        return kinds

    [full] = engine.generate("The cat", max_new_tokens=60)
    assert len(full.text) > 5  # more than one delta would come without the cancellation
    assert asyncio.run(scenario()) == ["delta"]  # one delta, then nothing: no "done", generation stopped


def test_fuzzed_bodies_never_give_5xx(client, name):
    """Random JSON under the real field names (and junk ones): every answer is 2xx/4xx in OpenAI's shape."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )
    keys = st.sampled_from(
        [
            "model",
            "prompt",
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "logprobs",
            "response_format",
            "junk",
        ]
    )
    small = {"max_tokens": st.integers(-2, 4) | values, "stream": st.booleans()}
    body = st.fixed_dictionaries(
        {"model": st.just(name) | values},
        optional={
            "prompt": st.text(max_size=20) | values,
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["user", "assistant", "system", "bogus"]) | values,
                        "content": st.text(max_size=20) | values,
                    }
                ),
                max_size=3,
            )
            | values,
            **small,
        },
    ).flatmap(lambda d: st.dictionaries(keys, values, max_size=3).map(lambda extra: {**extra, **d}))

    @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @hypothesis.given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=body)
    def check(path, body):
        if "max_tokens" not in body or not isinstance(body["max_tokens"], int):
            body = {**body, "max_tokens": 2}  # keep generation short
        r = client.post(path, json=body)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert healthy(client)


def test_response_format_json_schema(client, name):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**body, "response_format": fmt})
    assert r.status_code == 200, r.text
    out = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(out) == {"ok", "n"} and isinstance(out["ok"], bool) and 0 <= out["n"] <= 9
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(plain)  # without the constraint the same request is no JSON

    with client.stream("POST", "/v1/chat/completions", json={**body, "response_format": fmt, "stream": True}) as s:
        chunks = parse_sse(s.read().decode())
    assert json.loads("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)) == out

    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}
    r = client.post("/v1/chat/completions", json={**body, "response_format": bad})
    assert r.status_code == 400 and "JSON schema" in r.json()["error"]["message"]
    for fmt in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        r = client.post("/v1/chat/completions", json={**body, "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert healthy(client)
