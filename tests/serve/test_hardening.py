"""The server's hardening (#15): body limit, tokenizing off the event loop, invalid Unicode, API key sources, Host
and Origin policy, cancelling on disconnect, binding errors."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from slmkit.errors import UserError
from slmkit.serve import openai
from slmkit.serve.app import bind_socket, create_app, default_allowed_hosts, resolve_api_key
from slmkit_testing import run_slm


@pytest.fixture(scope="module")
def name(shaken_model_dir):
    return shaken_model_dir.name


@pytest.fixture(scope="module")
def client(engine, name):
    with TestClient(create_app(engine, model_name=name)) as c:
        yield c


@pytest.fixture(scope="module")
def live(engine, name):
    """The app on a real uvicorn server in this process (a loopback port): (base host, port, app)."""
    import uvicorn

    app = create_app(engine, model_name=name)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.05)
    yield port, app
    server.should_exit = True
    thread.join(30)


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code


def raw_post(client, path, text):
    """POST a JSON body spelled by hand (JSON escapes such as \\ud800 that no encoder writes)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


# ---- 1. body size limit ---------------------------------------------------------------------------------------
def test_declared_oversized_body_is_413(engine, name):
    with TestClient(create_app(engine, model_name=name, max_request_bytes=1000)) as c:
        r = c.post("/v1/completions", json={"model": name, "prompt": "x" * 2000, "max_tokens": 1})
        assert_openai_error(r, 413, "request_too_large")
        r = c.post("/v1/completions", json={"model": name, "prompt": "x" * 10, "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_chunked_oversized_body_stops_being_read(engine, name):
    """No Content-Length: the body is counted while read, and reading stops just past the limit (not at 20 MB)."""
    app = create_app(engine, model_name=name, max_request_bytes=100_000)
    chunk, total = b"x" * 65536, 20 << 20
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled * len(chunk) > total:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": pulled * len(chunk) < total}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                    (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "request_too_large"
    assert pulled <= 100_000 // len(chunk) + 2


def test_max_request_bytes_must_be_positive(engine):
    with pytest.raises(UserError, match="max request bytes"):
        create_app(engine, max_request_bytes=0)


# ---- 2. tokenizing off the event loop ------------------------------------------------------------------------
def test_tokenizing_does_not_stall_other_clients(client, name, monkeypatch):
    entered, gate = threading.Event(), threading.Event()
    released_by_us: list[bool] = []
    original = openai.encode_prompts

    def slow_encode(tokenizer, prompts):
        entered.set()
        released_by_us.append(gate.wait(20))  # False: nobody opened the gate (the loop was stuck meanwhile)
        return original(tokenizer, prompts)

    monkeypatch.setattr(openai, "encode_prompts", slow_encode)
    answers = []
    worker = threading.Thread(
        target=lambda: answers.append(
            client.post("/v1/completions", json={"model": name, "prompt": "The cat", "max_tokens": 2})
        )
    )
    worker.start()
    assert entered.wait(20)
    health = client.get("/health")  # answered while the tokenizer is held
    gate.set()
    worker.join(60)
    assert health.status_code == 200
    assert released_by_us == [True]
    assert answers[0].status_code == 200, answers[0].text


def test_several_prompts_are_encoded_in_one_batch(engine):
    texts = ["The cat", "Once upon a time", "A"]
    assert openai.encode_prompts(engine.tokenizer, texts) == [engine.tokenizer.encode(t).ids for t in texts]


# ---- 3. invalid Unicode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", '{"model": "%s", "prompt": "ab\\ud800cd", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"model": "%s", "prompt": ["ok", "\\udfffx"], "max_tokens": 2}', "prompt.1"),
        ("/v1/completions", '{"model": "%s", "prompt": "ok", "stop": "a\\ud800", "max_tokens": 2}', "stop"),
        (
            "/v1/chat/completions",
            '{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
            "stop.0",
        ),
        ("/v1/completions", '{"model": "x\\ud800", "prompt": "ok"}', "model"),
        (
            "/v1/completions",
            '{"model": "%s", "prompt": "ok", "response_format": {"type": "json_schema", "json_schema": '
            '{"schema": {"\\ud800": 1}}}}',
            "response_format",
        ),
    ],
)
def test_lone_surrogate_is_400(client, name, path, body, param):
    r = raw_post(client, path, body.replace("%s", name))
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"].split(".")[0] == param.split(".")[0]


def test_connection_usable_after_invalid_unicode(live, name):
    port, _ = live
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    bad = f'{{"model": "{name}", "prompt": "ab\\ud800cd", "max_tokens": 2}}'.encode()
    good = json.dumps({"model": name, "prompt": "abcd", "max_tokens": 2}).encode()
    for body, status in [(bad, 400), (good, 200), (bad, 400), (good, 200)]:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == status
        json.loads(response.read())
    conn.close()


# ---- 4. API key sources ---------------------------------------------------------------------------------------
def test_api_key_precedence(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {"SLM_API_KEY": "from-env"}
    assert resolve_api_key("from-flag", key_file, env) == "from-flag"
    assert resolve_api_key(None, key_file, env) == "from-file"
    assert resolve_api_key(None, None, env) == "from-env"
    assert resolve_api_key(None, None, {}) is None
    with pytest.raises(UserError, match="empty"):
        (tmp_path / "empty").write_text("\n  \n")
        resolve_api_key(None, tmp_path / "empty", env)
    with pytest.raises(UserError, match="cannot read"):
        resolve_api_key(None, tmp_path / "missing", env)


@pytest.mark.parametrize("content", [None, ""])
def test_serve_with_bad_key_file_is_one_error_line(tmp_path, content):
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    result = run_slm("serve", tmp_path / "no-model", "--api-key-file", key_file, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "key file" in lines[0]


def test_key_from_file_is_required(engine, name, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    app = create_app(engine, model_name=name, api_key=resolve_api_key(None, key_file, {}))
    with TestClient(app) as c:
        assert_openai_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Bearer s3cre"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ---- 5. Host allow-list and origins ---------------------------------------------------------------------------
def test_default_hosts_follow_the_binding():
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "[::1]"}
    assert default_allowed_hosts("::1") is not None and default_allowed_hosts("localhost") is not None
    assert default_allowed_hosts("0.0.0.0") is None


def test_host_allow_list(engine, name):
    app = create_app(engine, model_name=name, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with TestClient(app) as c:
        for host in ["localhost:8000", "127.0.0.1", "[::1]:9", "LOCALHOST"]:
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ["evil.example", "evil.example:8000", "localhost.evil.example", "testserver"]:
            assert_openai_error(c.get("/v1/models", headers={"Host": host}), 400, "invalid_host")
    with TestClient(create_app(engine, model_name=name, allowed_hosts=["api.example"])) as c:
        assert c.get("/health", headers={"Host": "api.example:443"}).status_code == 200
        assert_openai_error(c.get("/health", headers={"Host": "localhost"}), 400, "invalid_host")


def test_origin_policy(engine, name):
    body = {"model": name, "prompt": "The cat", "max_tokens": 1}
    with TestClient(create_app(engine, model_name=name)) as c:
        assert_openai_error(
            c.post("/v1/completions", json=body, headers={"Origin": "https://evil.example"}), 403, "origin_not_allowed"
        )
        assert c.post("/v1/completions", json=body).status_code == 200  # curl, SDKs: no Origin
    app = create_app(engine, model_name=name, cors_origins=["https://app.example"], api_key="k")
    with TestClient(app) as c:
        pre = c.options(
            "/v1/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        headers = {"Origin": "https://app.example", "Authorization": "Bearer k"}
        r = c.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post(
            "/v1/completions", json=body, headers={"Origin": "https://other.example", "Authorization": "Bearer k"}
        )
        assert_openai_error(r, 403, "origin_not_allowed")
        assert_openai_error(c.post("/v1/completions", json=body, headers={"Origin": "https://app.example"}), 401)


# ---- 6. a non-streaming client that disconnects is cancelled --------------------------------------------------
def test_disconnected_client_frees_its_row(live, name):
    port, app = live
    scheduler = app.state.scheduler
    steps = []
    original = scheduler.batcher.step

    def slow_step():
        time.sleep(0.05)  # 120 tokens: 6 s at least
        steps.append(scheduler.running)
        return original()

    scheduler.batcher.step = slow_step
    try:
        body = json.dumps({"model": name, "prompt": "The cat", "max_tokens": 120, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(request + body)
        deadline = time.monotonic() + 30
        while scheduler.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running == 1
        sock.close()
        start = len(steps)
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.running == 0
        assert len(steps) - start < 30  # far from the 120 tokens it asked for
    finally:
        scheduler.batcher.step = original


# ---- 8. binding errors ----------------------------------------------------------------------------------------
def test_unbindable_host_is_one_error_line(tmp_path):
    result = run_slm("serve", tmp_path / "no-model", "--host", "999.1.1.1", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 999.1.1.1"), result.stderr


def test_busy_port_is_one_error_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_slm("serve", tmp_path / "no-model", "--port", port, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "port is in use" in lines[0] and lines[0].startswith("error: "), result.stderr
