"""`slm serve` as a user runs it (its own process on a loopback port), driven by the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from slmkit_testing import SRC

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

PROMPTS = [
    "The cat", "Once upon a time", "A", "The dog sat on the mat and", "Hello", "It was", "def fib(n):",
    "Scaling laws", "In the beginning", "A small model", "Hello there", "We propose", "The results show",
    "Language models", "import os", "Attention is", "Training data", "Our method", "The loss", "Compute budget",
    "Tokens", "On a laptop", "Small is", "Quantization", "We find that", "Table 1", "Figure 2 shows", "Abstract",
    "Introduction", "Related work", "Conclusion", "Appendix",
]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *options):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "slmkit", "serve", str(model_dir), "--port", str(port), *map(str, options)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def live_server(shaken_model_dir):
    proc, base = start_server(shaken_model_dir, "--api-key", "k", "--max-queue", "128")
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="k", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(shaken_model_dir):
    return shaken_model_dir.name


def metric(base, line_start):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(line_start)]
    return float(values[0]) if values else 0.0


def test_completion_chat_streaming_stop_and_seed(client, engine, name):
    assert [m.id for m in client.models.list()] == [name]
    [expected] = engine.generate("The cat", max_new_tokens=12)
    out = client.completions.create(model=name, prompt="The cat", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(model=name, prompt="The cat", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text

    stop = next(ch for ch in expected.text[2:] if ch.isalnum())
    cut = client.completions.create(model=name, prompt="The cat", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected.text[: expected.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=1, seed=3)
    again = client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=1, seed=3)
    assert chat.choices[0].message.content == again.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=1, seed=3, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    others = {
        client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=1, seed=s)
        .choices[0]
        .message.content
        for s in range(4, 8)
    }
    assert len(others | {chat.choices[0].message.content}) > 1


def test_json_schema_output_validates(client, name):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Give me JSON"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    )
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    with pytest.raises(openai.BadRequestError, match="JSON schema"):
        client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nonsense"}}},
        )  # fmt: skip


def test_n_choices_and_seeds(client, engine, name):
    from slmkit.infer.sampling import SamplingParams

    out = client.completions.create(model=name, prompt="Once upon", max_tokens=10, temperature=1, seed=5, n=3)
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) > 1
    for i, text in enumerate(texts):  # choice i samples with seed + i, as a request alone would
        params = SamplingParams(temperature=1, seed=5 + i)
        assert text == engine.generate("Once upon", max_new_tokens=10, sampling=params)[0].text
    n_prompt = len(engine.tokenizer.encode("Once upon").ids)
    assert out.usage.prompt_tokens == n_prompt
    assert (
        out.usage.completion_tokens
        == sum(len(engine.tokenizer.encode(t).ids) >= 0 and 10 for t in texts if t is not None)
        or out.usage.completion_tokens <= 30
    )
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            temperature=1,
            seed=5,
            n=2,
            stream=True,
        )  # fmt: skip
    )
    streamed = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    full = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=1, seed=5, n=2
    )
    assert streamed == {c.index: c.message.content for c in full.choices}


def test_logprobs(client, engine, name):
    [expected] = engine.generate("It was", max_new_tokens=6, logprobs=True)
    out = client.completions.create(model=name, prompt="It was", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    text = out.choices[0].text
    assert text == expected.text and len(lp.tokens) == len(expected.token_ids)
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):  # "bytes:\\xff": part of a character
        assert token.startswith("bytes:") or text[offset : offset + len(token)] == token
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(x, abs=1e-5) for top, x in
               zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # fmt: skip
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset == [len(engine.tokenizer.decode(expected.token_ids[:i])) for i in range(len(lp.tokens))]
    streamed = list(
        client.completions.create(model=name, prompt="It was", max_tokens=6, temperature=0, logprobs=3, stream=True)
    )
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert tokens == pytest.approx(lp.token_logprobs, abs=1e-6)
    offsets = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model=name, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    if not any(t.token.startswith("bytes:") for t in content):
        assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert t.token.startswith("bytes:") or bytes(t.bytes).decode() == t.token
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
    )
    streamed = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in content], abs=1e-6)


def test_32_simultaneous_streams_match_each_alone(live_server, client, engine, name):
    alone = [engine.generate(p, max_new_tokens=8)[0].text for p in PROMPTS]
    results: dict[int, str] = {}
    errors = []
    start = threading.Barrier(len(PROMPTS))

    def stream(i):
        try:
            start.wait(30)
            chunks = client.completions.create(model=name, prompt=PROMPTS[i], max_tokens=8, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in chunks)
        except Exception as exc:  # reported below
            errors.append(exc)

    steps_before = metric(live_server, "slm_step_batch_size_count")
    single_before = metric(live_server, 'slm_step_batch_size_bucket{le="1"}')
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == alone
    steps = metric(live_server, "slm_step_batch_size_count") - steps_before
    single = metric(live_server, 'slm_step_batch_size_bucket{le="1"}') - single_before
    assert single < steps  # requests shared decode steps
    assert urllib.request.urlopen(f"{live_server}/health", timeout=5).status == 200


def test_disconnect_cancels_and_frees_the_row(engine, name):
    """uvicorn in a thread over an app whose decode steps are slowed, so the stream is surely still running when its
    client leaves."""
    import uvicorn

    from slmkit.serve.app import create_app

    app = create_app(engine, model_name=name)
    scheduler = app.state.scheduler
    original = scheduler.batcher.step

    def slow():
        time.sleep(0.01)
        return original()

    scheduler.batcher.step = slow
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        body = {"model": name, "prompt": "The cat", "max_tokens": 120, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line)  # the first event, then the client goes away
        deadline = time.monotonic() + 30
        while scheduler.running > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.running == 0 and scheduler.batcher.free_rows == scheduler.batcher.max_batch
        assert metric(base, 'slm_generations_total{finish_reason="cancelled"}') == 1
        assert metric(base, "slm_completion_tokens_total") < 120  # stopped early
        assert scheduler.batcher.stats.new_tokens < 120
    finally:
        server.should_exit = True
        thread.join(30)


def test_bad_requests_leave_the_server_healthy(live_server, client, name):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=name, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt="x", max_tokens="5")  # types are strict
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:
        for raw in (b"{not json", b"[]", b'{"model": 1}', b"\xff\xfe"):
            r = http.post(f"{live_server}/v1/completions", content=raw, headers=headers)
            assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert urllib.request.urlopen(f"{live_server}/health", timeout=5).status == 200


def test_sigint_drains_a_running_stream(shaken_model_dir, engine):
    proc, base = start_server(shaken_model_dir)
    try:
        body = {
            "model": shaken_model_dir.name,
            "prompt": "The cat",
            "max_tokens": 100,
            "temperature": 0,
            "stream": True,
        }
        with httpx.Client(timeout=60) as http, http.stream("POST", f"{base}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line]
        events = [first, *rest]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        assert (
            "".join(c["choices"][0]["text"] for c in chunks) == engine.generate("The cat", max_new_tokens=100)[0].text
        )
        assert proc.wait(30) in (0, 130)  # uvicorn re-raises SIGINT once drained: the shell convention 128 + 2
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
