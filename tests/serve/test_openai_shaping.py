"""OpenAI request and response shaping (`slmkit.serve.openai`) as plain functions: no server, no TestClient."""

from __future__ import annotations

import json

import pydantic
import pytest

from slmkit import defaults
from slmkit.errors import UserError
from slmkit.infer.batcher import TokenLogprob
from slmkit.infer.sampling import SamplingParams
from slmkit.serve import openai
from slmkit.serve.openai import ApiError, ChatRequest, CompletionRequest, Reply
from slmkit.serve.scheduler import Delta, QueueFull, RequestTimeout, Result, ShuttingDown


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on ASCII text only, so a non-ASCII character stays split into its bytes."""
    from slmkit.data.tokenizer import train_tokenizer

    texts = ["Hello world. The cat sat on the mat. Be brief, say hi.", "Hi Hi, hello there world"] * 20
    return train_tokenizer(texts, 300)


def chat_request(**fields):
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields})


def test_chat_request_becomes_generation_requests(tokenizer):
    req = chat_request(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0.5, top_p=0.9, presence_penalty=0.5, seed=7, n=2, stop=["\n\n", ""], max_tokens=5,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    template = openai.compile_chat_template(openai.load_chat_template(None))
    prompt = openai.chat_prompt(template, req.messages)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    requests = openai.generation_requests(
        req, [prompt], tokenizer, context=64, max_batch=4, default_max_tokens=None,
        top_logprobs=openai.chat_top_logprobs(req),
    )  # fmt: skip
    assert len(requests) == 2
    for choice, request in enumerate(requests):
        assert request.prompt_ids == tokenizer.encode(prompt).ids
        assert request.max_new_tokens == 5
        assert request.stop == ("\n\n",)  # the empty stop string is dropped
        assert request.logprobs and request.top_logprobs == 2
        assert request.sampling == SamplingParams(temperature=0.5, top_p=0.9, presence_penalty=0.5, seed=7 + choice)


def test_template_from_the_model_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}A:"})
    )
    template = openai.compile_chat_template(openai.load_chat_template(tmp_path))
    assert openai.chat_prompt(template, chat_request().messages) == "[user] Hi A:"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert openai.load_chat_template(tmp_path) == openai.DEFAULT_CHAT_TEMPLATE
    broken = openai.compile_chat_template("{{ messages[5].content.nope() }}")
    with pytest.raises(ApiError) as caught:
        openai.chat_prompt(broken, chat_request().messages)
    assert caught.value.status == 400 and caught.value.param == "messages"


def test_openai_defaults(tokenizer):
    """Unset fields take OpenAI's defaults: temperature 1, top_p 1 (off); completions 16 tokens, chat the rest of
    the context (both at most what the context has room for)."""
    chat = chat_request()
    [request] = openai.generation_requests(chat, ["Hi"], tokenizer, context=64, max_batch=4, default_max_tokens=None)
    prompt_len = len(tokenizer.encode("Hi").ids)
    assert request.max_new_tokens == 64 - prompt_len
    assert request.sampling == SamplingParams(temperature=1.0)
    assert not request.logprobs and request.top_logprobs == 0 and request.stop == ()
    assert openai.chat_top_logprobs(chat) is None and openai.chat_top_logprobs(chat_request(logprobs=True)) == 0

    completion = CompletionRequest.model_validate({"model": "m", "prompt": "Hi"})
    [request] = openai.generation_requests(
        completion, openai.completion_prompts(completion), tokenizer, context=64, max_batch=4,
        default_max_tokens=defaults.OPENAI_COMPLETION_MAX_TOKENS,
    )  # fmt: skip
    assert request.max_new_tokens == 16
    [request] = openai.generation_requests(completion, ["Hi"], tokenizer, context=prompt_len + 3, max_batch=4,
                                           default_max_tokens=16)  # fmt: skip
    assert request.max_new_tokens == 3


def test_seeds_of_choices_wrap_into_int64(tokenizer):
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "seed": 2**63 - 1, "n": 2})
    requests = openai.generation_requests(req, ["Hi"], tokenizer, context=64, max_batch=4, default_max_tokens=4)
    assert [r.sampling.seed for r in requests] == [2**63 - 1, -(2**63)]
    # any integer: one past int64 is its wrap (the schema does not bound it: +-2^63 is not exact as a float)
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "seed": 2**70 + 5, "n": 1})
    [request] = openai.generation_requests(req, ["Hi"], tokenizer, context=64, max_batch=4, default_max_tokens=4)
    assert request.sampling.seed == 5


@pytest.mark.parametrize(
    ("fields", "prompts", "status", "param", "code"),
    [
        ({"n": 3}, ["a", "b"], 400, "n", None),  # 6 sequences > max_batch 4
        ({}, ["a"] * 5, 400, "prompt", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, ["a"], 400, "stop", None),
        ({}, [""], 400, "prompt", None),
        ({}, ["hello world " * 40], 400, "prompt", "context_length_exceeded"),
        ({"max_tokens": 60}, ["hello world " * 3], 400, "max_tokens", "context_length_exceeded"),
    ],
)
def test_requests_that_cannot_run(tokenizer, fields, prompts, status, param, code):
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompts, **fields})
    with pytest.raises(ApiError) as caught:
        openai.generation_requests(req, prompts, tokenizer, context=64, max_batch=4, default_max_tokens=16)
    assert (caught.value.status, caught.value.param, caught.value.code) == (status, param, code)


def test_request_checks():
    with pytest.raises(ApiError, match="single prompt"):
        openai.completion_prompts(
            CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "stream": True})
        )
    with pytest.raises(ApiError) as caught:
        openai.completion_prompts(CompletionRequest.model_validate({"model": "m", "prompt": []}))
    assert caught.value.param == "prompt"
    with pytest.raises(ApiError) as caught:
        openai.chat_top_logprobs(chat_request(top_logprobs=2))
    assert caught.value.param == "top_logprobs"
    with pytest.raises(ApiError) as caught:
        openai.check_model(chat_request(model="gpt-4"), "tiny")
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "model_not_found", "model")
    openai.check_model(chat_request(model="tiny"), "tiny")


def test_response_format():
    assert openai.response_format_constraint(None) is None
    assert openai.response_format_constraint({"type": "text"}) is None
    constraint = openai.response_format_constraint({"type": "json_object"})
    assert constraint.kind == "json_schema" and json.loads(constraint.value) == {"type": "object"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    constraint = openai.response_format_constraint({"type": "json_schema", "json_schema": {"schema": schema}})
    assert json.loads(constraint.value) == schema
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(ApiError) as caught:
            openai.response_format_constraint(bad)
        assert caught.value.status == 400 and caught.value.param == "response_format"


def entries_of(tokenizer, text):
    """Logprob entries for the tokens of `text`, each with its two alternatives (the token itself and token 0)."""
    ids = tokenizer.encode(text).ids
    return ids, [TokenLogprob(t, -0.5 - i, [(t, -0.5 - i), (0, -3.0)]) for i, t in enumerate(ids)]


def test_completion_response(tokenizer):
    ids, entries = entries_of(tokenizer, "Hello world")
    pieces = openai.TokenText(tokenizer)
    results = [Result("Hello world", len(ids), "length", 4, entries), Result("Hi", 1, "stop", 4, entries[:1])]
    body = openai.completion_response(Reply("cmpl-1", 100, "tiny", pieces), results, n=2)
    texts = [tokenizer.decode([t]) for t in ids]
    assert texts[0] == "Hello"
    assert body["id"] == "cmpl-1" and body["object"] == "text_completion"
    assert body["created"] == 100 and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": len(ids) + 1, "total_tokens": 4 + len(ids) + 1}
    first = body["choices"][0]
    assert (first["index"], first["text"], first["finish_reason"]) == (0, "Hello world", "length")
    assert first["logprobs"] == {
        "tokens": texts,
        "token_logprobs": [-0.5 - i for i in range(len(ids))],
        "top_logprobs": [{text: -0.5 - i, "<|endoftext|>": -3.0} for i, text in enumerate(texts)],
        "text_offset": [len("".join(texts[:i])) for i in range(len(ids))],
    }
    assert body["choices"][1]["index"] == 1 and body["choices"][1]["finish_reason"] == "stop"
    assert json.loads(json.dumps(body)) == body  # plain JSON
    plain = openai.completion_response(Reply("cmpl-1", 100, "tiny"), results, n=2)
    assert [c["logprobs"] for c in plain["choices"]] == [None, None]


def test_chat_response(tokenizer):
    ids, entries = entries_of(tokenizer, "Hi é")
    pieces = openai.TokenText(tokenizer)
    body = openai.chat_response(
        Reply("chatcmpl-1", 100, "tiny", pieces), [Result("Hi é", len(ids), "stop", 9, entries)], 1
    )
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi é"} and choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content][-2:] == ["bytes:\\xc3", "bytes:\\xa9"]  # "é" is two byte tokens
    assert b"".join(bytes(c["bytes"]) for c in content) == "Hi é".encode()
    assert content[0] == {
        "token": "Hi",
        "logprob": -0.5,
        "bytes": list(b"Hi"),
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": list(b"Hi")},
            {"token": "<|endoftext|>", "logprob": -3.0, "bytes": list(b"<|endoftext|>")},
        ],
    }
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": len(ids), "total_tokens": 9 + len(ids)}


def test_reply_ids():
    a, b = Reply.new("completion", "tiny"), Reply.new("chat", "tiny")
    assert a.id.startswith("cmpl-") and b.id.startswith("chatcmpl-") and a.id[5:] != b.id[9:]
    assert a.model == "tiny" and a.pieces is None and isinstance(a.created, int)


def parse(event: str):
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[len("data: ") : -2])


def test_completion_stream_chunks(tokenizer):
    ids, entries = entries_of(tokenizer, "Hello world")
    pieces = openai.TokenText(tokenizer)
    stream = openai.completion_stream(Reply("cmpl-1", 100, "tiny", pieces), [0], n=1)
    assert stream.opening() == []
    assert stream.delta(0, Delta("", entries[:1])) is None  # text held back: its logprobs wait
    chunk = parse(openai.sse(stream.delta(0, Delta("Hello world", entries[1:]))))
    assert chunk["object"] == "text_completion" and chunk["id"] == "cmpl-1"
    [choice] = chunk["choices"]
    assert choice["text"] == "Hello world" and choice["finish_reason"] is None
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert choice["logprobs"]["text_offset"][0] == 0
    final = stream.done(0, Result("Hello world", len(ids), "length", 2, entries))
    assert final["choices"][0]["text"] == "" and final["choices"][0]["finish_reason"] == "length"
    assert final["choices"][0]["logprobs"]["tokens"] == []  # every token's logprob went out with its text
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": len(ids), "total_tokens": 2 + len(ids)}
    assert stream.finished
    assert openai.SSE_DONE == "data: [DONE]\n\n"


def test_stream_logprobs_offsets_count_earlier_chunks(tokenizer):
    ids, entries = entries_of(tokenizer, "Hello world")
    stream = openai.completion_stream(Reply("cmpl-1", 100, "tiny", openai.TokenText(tokenizer)), [0], n=1)
    stream.delta(0, Delta(tokenizer.decode(ids[:1]), entries[:1]))
    second = stream.delta(0, Delta(tokenizer.decode(ids[1:]), entries[1:]))
    assert second["choices"][0]["logprobs"]["text_offset"][0] == len(tokenizer.decode(ids[:1]))


def test_chat_stream_chunks(tokenizer):
    _, entries = entries_of(tokenizer, "Hi")
    stream = openai.chat_stream(Reply("chatcmpl-1", 100, "tiny"), [0, 1], n=2)
    opening = stream.opening()
    assert [c["choices"][0] for c in opening] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)
    ]
    assert all(c["object"] == "chat.completion.chunk" for c in opening)
    assert stream.delta(1, Delta("Hi", entries))["choices"][0] == {
        "index": 1,
        "delta": {"content": "Hi"},
        "logprobs": None,
        "finish_reason": None,
    }
    first_done = stream.done(1, Result("Hi", 1, "stop", 3, entries))
    assert first_done["choices"][0] == {"index": 1, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in first_done and not stream.finished
    last = stream.done(0, Result("", 0, "length", 3, []))
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}  # one prompt, n=2
    assert stream.finished


def test_chat_stream_logprobs_ride_on_the_next_chunk(tokenizer):
    _, entries = entries_of(tokenizer, "Hi é")
    pieces = openai.TokenText(tokenizer)
    stream = openai.chat_stream(Reply("chatcmpl-1", 100, "tiny", pieces), [0], n=1)
    assert stream.delta(0, Delta("Hi ", entries[:-2])) is not None
    assert stream.delta(0, Delta("", entries[-2:-1])) is None  # half of "é"
    chunk = stream.delta(0, Delta("é", entries[-1:]))
    assert [c["token"] for c in chunk["choices"][0]["logprobs"]["content"]] == ["bytes:\\xc3", "bytes:\\xa9"]
    held = openai.chat_stream(Reply("chatcmpl-2", 100, "tiny", pieces), [0], n=1)
    held.delta(0, Delta("", entries[:1]))
    final = held.done(0, Result("Hi", 1, "length", 3, entries[:1]))  # its text flushed with no chunk of its own
    assert [c["token"] for c in final["choices"][0]["logprobs"]["content"]] == ["Hi"]


def test_error_bodies():
    assert ApiError(400, "bad", param="n").body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
    busy = openai.submit_error(QueueFull())
    assert (busy.status, busy.code, busy.type, busy.headers) == (
        503,
        "queue_full",
        "server_error",
        {"Retry-After": "1"},
    )
    assert openai.submit_error(ShuttingDown()).code == "shutting_down"
    timeout = openai.generation_error(RequestTimeout("the request timed out waiting in the queue"))
    assert (timeout.status, timeout.code, timeout.headers) == (503, "timeout", {"Retry-After": "1"})
    assert openai.generation_error(UserError("no room")).status == 400
    bug = openai.generation_error(RuntimeError("/secret/path"))
    assert bug.status == 500 and "secret" not in bug.message and "RuntimeError" in bug.message
    assert openai.StreamShaper.error(RuntimeError("/secret/path")) == {
        "error": {"message": bug.message, "type": "server_error", "param": None, "code": None}
    }
    assert openai.http_error(404, "Not Found").body()["error"]["type"] == "not_found_error"
    assert openai.http_error(405, "Method Not Allowed").body()["error"]["type"] == "invalid_request_error"
    assert openai.authentication_error().body()["error"]["code"] == "invalid_api_key"
    assert openai.internal_error(KeyError("x")).body()["error"]["message"] == "internal error: KeyError"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "n": 17}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": True}, "logprobs"),
    ],
)
def test_validation_errors_name_the_field(body, param):
    with pytest.raises(pydantic.ValidationError) as caught:
        CompletionRequest.model_validate(body)
    for errors in (caught.value.errors(), [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]):
        error = openai.validation_error(errors)
        assert error.status == 400 and error.param == param and error.message.startswith(f"{param}: ")


def test_validation_error_of_a_nested_field_and_of_no_field():
    with pytest.raises(pydantic.ValidationError) as caught:
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user"}]})
    assert openai.validation_error(caught.value.errors()).param == "messages.0.content"
    error = openai.validation_error([{"loc": ("body",), "msg": "JSON decode error"}])
    assert error.param is None and error.message == "body: JSON decode error"
