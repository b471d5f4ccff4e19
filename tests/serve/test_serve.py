"""The OpenAI-compatible server, through FastAPI's TestClient (in-process) and one live `slm serve` process."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from slmkit.infer.engine import Engine
from slmkit.serve.app import create_app
from slmkit_testing import run_slm


@pytest.fixture(scope="module")
def client(engine, shaken_model_dir):
    with TestClient(create_app(engine, model_name=shaken_model_dir.name)) as c:
        yield c


@pytest.fixture(scope="module")
def name(shaken_model_dir):
    return shaken_model_dir.name


def hold_steps(scheduler) -> threading.Event:
    """Make the worker's steps wait (at most 30 s) until the returned event is set."""
    gate = threading.Event()
    original = scheduler.batcher.step

    def blocked():
        gate.wait(30)
        return original()

    scheduler.batcher.step = blocked
    return gate


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


def step_sizes(metrics_text):
    """(count of decode steps, count of steps with one sequence) from the step batch size histogram."""
    values = dict(line.rsplit(" ", 1) for line in metrics_text.splitlines() if line.startswith("slm_step_batch_size"))
    return int(values["slm_step_batch_size_count"]), int(values['slm_step_batch_size_bucket{le="1"}'])


def test_concurrent_requests_batch_and_match_alone(client, engine, name):
    prompts = ["The cat", "Once upon a time", "A", "The dog sat on the mat and", "Hello", "It was"]
    alone = [engine.generate(p, max_new_tokens=10)[0].text for p in prompts]
    assert len(set(alone)) == len(prompts)
    scheduler = client.app.state.scheduler
    gate, original = threading.Event(), scheduler.batcher.step

    def gated():
        gate.wait(30)  # the worker holds until all six requests wait, so they decode together
        return original()

    scheduler.batcher.step = gated
    results: dict[int, str] = {}

    def call(i, prompt):
        body = {"model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        results[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    before = step_sizes(client.get("/metrics").text)
    try:
        threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.queue_depth + scheduler.running < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(60)
    finally:
        scheduler.batcher.step = original
    assert [results[i] for i in range(len(prompts))] == alone
    metrics = client.get("/metrics").text
    steps, single = step_sizes(metrics)
    assert steps > before[0] and single - before[1] < steps - before[0]  # some steps decoded several requests
    assert 'slm_requests_total{path="/v1/completions",status="200"}' in metrics
    assert "slm_queue_depth 0" in metrics and "slm_running_requests 0" in metrics
    for histogram in ("slm_time_to_first_token_seconds", "slm_request_latency_seconds", "slm_step_batch_size"):
        assert f"# TYPE {histogram} histogram" in metrics
        assert f'{histogram}_bucket{{le="+Inf"}}' in metrics and f"{histogram}_sum " in metrics
    count = int(
        next(x for x in metrics.splitlines() if x.startswith("slm_time_to_first_token_seconds_count")).split()[1]
    )
    assert count >= len(prompts)


def test_request_joins_while_another_streams(client, engine, name):
    """A request arriving mid-stream joins the running batch at the next step and finishes while the stream goes on."""
    scheduler = client.app.state.scheduler
    original = scheduler.batcher.step
    seen_queued = threading.Event()
    base = scheduler.batcher.stats.new_tokens
    sizes = []

    def held():
        sizes.append(len(scheduler.batcher.rows))
        out = original()
        if scheduler.batcher.stats.new_tokens > base and not seen_queued.is_set():
            # hold the stream after its first tokens until the second request is queued
            deadline = time.monotonic() + 30
            while scheduler.queue_depth == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen_queued.set()
        return out

    scheduler.batcher.step = held
    short = {}

    def second():
        seen = time.monotonic()
        while scheduler.running == 0 and time.monotonic() - seen < 30:
            time.sleep(0.005)
        body = {"model": name, "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        short["text"] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    try:
        thread = threading.Thread(target=second)
        thread.start()
        body = {"model": name, "prompt": "The cat", "max_tokens": 60, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            chunks = parse_sse(r.read().decode())
        thread.join(60)
    finally:
        scheduler.batcher.step = original
    assert short["text"] == engine.generate("Hello", max_new_tokens=6)[0].text
    assert "".join(c["choices"][0]["text"] for c in chunks) == engine.generate("The cat", max_new_tokens=60)[0].text
    assert max(sizes) == 2 and sizes[-1] == 1  # they shared steps, and the stream went on after the other left


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
        ("/v1/completions", {"model": "NAME", "prompt": "x", "n": 0}, 400, "n"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "n": 17}, 400, "n"),
        ("/v1/completions", {"model": "NAME", "prompt": ["x"] * 8, "n": 5}, 400, "n"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "logprobs": True}, 400, "logprobs"),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
        (
            "/v1/chat/completions",
            {"model": "NAME", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": "NAME", "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
            400,
            "logprobs",
        ),
        ("/v1/completions", {"model": "NAME", "prompt": "x", "seed": 1.5, "temperature": 1}, 400, "seed"),
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
    app = create_app(engine, max_queue=1, max_batch=1, model_name=name)
    scheduler = app.state.scheduler
    with TestClient(app) as c:
        gate = hold_steps(scheduler)
        body = {"model": name, "prompt": "x", "max_tokens": 2}
        first = threading.Thread(target=lambda: c.post("/v1/completions", json=body))  # takes the one row, blocks
        second = threading.Thread(target=lambda: c.post("/v1/completions", json=body))  # waits in the queue
        try:
            first.start()
            while scheduler.running == 0:
                time.sleep(0.01)
            second.start()
            while scheduler.queue_depth == 0:
                time.sleep(0.01)
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "queue_full"
        finally:
            gate.set()
            first.join(30)
            second.join(30)
        assert healthy(c)


def test_shutdown_refuses_new_requests_and_drains_running_ones(engine, name):
    app = create_app(engine, model_name=name)
    scheduler = app.state.scheduler
    with TestClient(app) as c:
        gate = hold_steps(scheduler)
        out = {}
        body = {"model": name, "prompt": "The cat", "max_tokens": 8, "temperature": 0}
        running = threading.Thread(target=lambda: out.update(r=c.post("/v1/completions", json=body)))
        running.start()
        while scheduler.running == 0:
            time.sleep(0.01)
        scheduler.begin_shutdown()
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert c.get("/health").status_code == 503
        gate.set()
        running.join(30)
        assert out["r"].status_code == 200
        assert out["r"].json()["choices"][0]["text"] == engine.generate("The cat", max_new_tokens=8)[0].text
    assert not scheduler._thread.is_alive()  # the app's shutdown drained and stopped the worker


def test_slm_serve_bad_model(tmp_path):
    r = run_slm("serve", tmp_path / "missing")
    assert r.returncode == 2 and r.stderr.startswith("error: ")


def run_jobs(engine, scenario, **options):
    """Run `scenario(scheduler, loop)` (a coroutine function) against a Scheduler of its own."""
    import asyncio

    from slmkit.serve.scheduler import Scheduler

    async def main():
        scheduler = Scheduler(engine.model, engine.tokenizer, **options)
        try:
            return await scenario(scheduler, asyncio.get_running_loop())
        finally:
            scheduler.close(5)

    return asyncio.run(main())


def job(engine, loop, prompt, max_tokens, stream=False):
    from slmkit.infer.batcher import GenerationRequest
    from slmkit.serve.scheduler import Job

    return Job(GenerationRequest(engine.tokenizer.encode(prompt).ids, max_tokens), loop, stream)


async def next_event(j, timeout=60):
    import asyncio

    _, kind, value = await asyncio.wait_for(j.events.get(), timeout)
    return kind, value


def test_identical_requests_are_distinct_jobs(engine):
    """Cancelling one of two equal requests leaves the other running (a job's request refers back to the job, so
    comparing jobs by their fields would recurse)."""

    async def scenario(scheduler, loop):
        first, second = (job(engine, loop, "The cat", 30, stream=True) for _ in range(2))
        scheduler.submit([first, second])
        await next_event(first)
        await next_event(second)
        second.cancelled.set()
        while True:
            kind, value = await next_event(first)
            if kind != "delta":
                return kind, value

    kind, result = run_jobs(engine, scenario)
    assert kind == "done" and result.text == engine.generate("The cat", max_new_tokens=30)[0].text


def test_cancelled_stream_frees_its_row_for_a_waiting_request(engine):
    async def scenario(scheduler, loop):
        left = job(engine, loop, "The cat", 100, stream=True)
        after = job(engine, loop, "Hello", 4)
        scheduler.submit([left])
        kinds = [(await next_event(left))[0]]
        scheduler.submit([after])  # one row only: it waits for the stream's row
        left.cancelled.set()  # as the SSE generator's `finally` does when the client disconnects
        kind, result = await next_event(after)
        assert kind == "done" and result.completion_tokens == 4
        assert result.text == engine.generate("Hello", max_new_tokens=4)[0].text
        while not left.events.empty():
            kinds.append(left.events.get_nowait()[1])
        return kinds, len(left.seq.out), left.seq.finish_reason

    kinds, generated, reason = run_jobs(engine, scenario, max_batch=1)
    assert set(kinds) == {"delta"} and "done" not in kinds  # stopped without finishing
    assert generated < 100 and reason == "cancelled"


def test_request_timeout(engine):
    """Past its deadline a running request ends with what it has ("length"); a queued one fails (503)."""
    from slmkit.serve.scheduler import RequestTimeout

    async def scenario(scheduler, loop):
        original = scheduler.batcher.step

        def slow():
            time.sleep(0.02)  # the tiny model is too fast to be caught by a deadline otherwise
            return original()

        scheduler.batcher.step = slow
        running = job(engine, loop, "The cat", 120, stream=True)
        scheduler.submit([running])
        await next_event(running)
        scheduler.request_timeout = 0.3  # the next request has a deadline; the running one has none
        queued = job(engine, loop, "Hello", 4)
        scheduler.submit([queued])
        kind, error = await next_event(queued)
        running.cancelled.set()
        alone = job(engine, loop, "The cat", 120, stream=True)
        scheduler.submit([alone])
        deltas = []
        while True:
            kind_, value = await next_event(alone)
            if kind_ != "delta":
                break
            deltas.append(value.text)
        return kind, error, kind_, value, "".join(deltas)

    kind, error, final, result, streamed = run_jobs(engine, scenario, max_batch=1)
    assert kind == "error" and isinstance(error, RequestTimeout)
    assert final == "done" and result.finish_reason == "length" and 0 < result.completion_tokens < 120
    assert streamed == result.text
    full = engine.generate("The cat", max_new_tokens=120)[0]
    assert result.text == engine.tokenizer.decode(full.token_ids[: result.completion_tokens])


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
            "top_logprobs",
            "frequency_penalty",
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


def test_slm_serve_bad_options(shaken_model_dir):
    r = run_slm("serve", shaken_model_dir, "--max-batch", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--max-batch must be >= 1" in r.stderr
