"""The server against its own OpenAPI document (schemathesis) and fuzzed prompt texts (hypothesis): no 5xx, and
every answer is one the document describes."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from slmkit.serve.app import create_app

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BOUNDED = settings(
    max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@pytest.fixture(scope="module")
def app(engine, shaken_model_dir):
    return create_app(engine, model_name=shaken_model_dir.name, max_batch=4)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:  # one lifespan for the module: its shutdown closes the scheduler for good
        yield c


def test_openapi_documents_what_the_server_answers(app):
    schema = app.openapi()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (path, method)
            assert "400" in responses, (path, method)
    generate = schema["paths"]["/v1/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "413", "503"):
        assert generate[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_wrong_method_is_405_with_allow(client):
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def live_base(engine, shaken_model_dir):
    """A second app of the model on a real uvicorn server in this process (schemathesis calls it over HTTP)."""
    import threading
    import time

    import uvicorn

    from slmkit.serve.app import bind_socket

    app = create_app(engine, model_name=shaken_model_dir.name, max_batch=4)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


def test_schema(live_base):
    app, base = live_base
    schema = schemathesis.openapi.from_dict(app.openapi())
    errors = []
    for result in schema.get_all_operations():  # each operation's hypothesis test: bounded, derandomized
        operation = result.ok()

        @BOUNDED
        @given(case=operation.as_strategy())
        def run(case):
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # bounded decoding
            case.call_and_validate(base_url=base)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collected to name every failing operation
            errors.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not errors, "\n\n".join(errors)


def test_integral_floats_are_integers(client, shaken_model_dir):
    body = {"model": shaken_model_dir.name, "prompt": "The cat", "max_tokens": 2.0, "n": 1.0}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/completions", json={**body, "n": 1.5}).status_code == 400
    assert client.post("/v1/completions", json={**body, "n": "1"}).status_code == 400


texts = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=50),
    st.text(st.characters(categories=["Cs", "Cc", "Zs"]), max_size=20),
    st.sampled_from(["\x00", "\ud800", "ab\udfffcd", "\x00" * 3000, "é" * 5000, "\u202e\u200b", ""]),
    st.text(max_size=20).map(lambda s: s * 500),
)


@BOUNDED
@given(prompt=texts, stop=st.one_of(st.none(), texts))
def fuzz(client, name, prompt, stop):
    completion = {"model": name, "prompt": prompt, "max_tokens": 1, "stop": stop}
    chat = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "stop": stop}
    for path, body in [("/v1/completions", completion), ("/v1/chat/completions", chat)]:
        r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code < 500, r.text
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzzed_prompts_never_5xx(client, shaken_model_dir):
    fuzz(client, shaken_model_dir.name)
