"""LoRA adapters per request (`slm serve BASE --lora NAME=DIR`): requests for the base and for two adapters share
one continuous batch, and each request's greedy output equals that of the model with only its adapter merged, run
alone (`plain_greedy`); /v1/models lists them; bad --lora values are one error line before the server starts."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine
from slmkit.serve.app import check_served_adapters, create_app, parse_lora
from slmkit_testing import PROMPTS, plain_greedy, run_batcher, run_slm

NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_base(model_dir):
    from slmkit.api import load

    return load(model_dir, device="cpu")


def make_adapter(model_dir, out, spec, seed: int):
    """An adapter on the base with non-zero random factors (B starts at zero: the update would be invisible)."""
    from slmkit.interop.adapters import save_adapter
    from slmkit.models.lora import add_adapters, is_adapter_param

    model = load_base(model_dir).model
    add_adapters(model, spec, name="x")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if is_adapter_param(key):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return save_adapter(model, out, base_model_dir=model_dir, name="x")


@pytest.fixture(scope="module")
def adapters(shaken_model_dir, tmp_path_factory):
    """Two adapters of different shapes: rank 4 on q/v, and rank 2 rsLoRA on every linear layer."""
    from slmkit.models.lora import LoRASpec

    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": make_adapter(shaken_model_dir, root / "sql", LoRASpec(r=4, alpha=8, target_modules="q_proj,v_proj"), 1),
        "chat.v1": make_adapter(
            shaken_model_dir, root / "chat", LoRASpec(r=2, alpha=4, use_rslora=True, target_modules="all-linear"), 2
        ),
    }


@pytest.fixture(scope="module")
def merged(shaken_model_dir, adapters):
    """Served name -> the model with only that adapter merged (the base under None)."""
    from slmkit.interop.adapters import load_adapter
    from slmkit.models.lora import merge_adapters

    models = {None: load_base(shaken_model_dir).model}
    for name, directory in adapters.items():
        model = load_base(shaken_model_dir).model
        load_adapter(model, directory)
        merge_adapters(model)
        models[name] = model
    return models


@pytest.fixture(scope="module")
def tokenizer(shaken_model_dir):
    return load_base(shaken_model_dir).tokenizer


def served_model(shaken_model_dir, adapters):
    """The base with both adapters loaded, as the server loads them; (model, {name: index})."""
    from slmkit.serve.app import load_served_adapters

    model = load_base(shaken_model_dir).model
    return model, load_served_adapters(model, adapters)


def interleaved(tokenizer, indices):
    """Every prompt for the base and each adapter, alternating: (served name, request)."""
    names = [None, *indices]
    out = []
    for i, prompt in enumerate(PROMPTS * 2):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            ids = tokenizer.encode(prompt).ids
            adapter = -1 if name is None else indices[name]
            out.append((name, GenerationRequest(ids, NEW_TOKENS, ignore_eos=True, detokenize=False, adapter=adapter)))
    return out


def record_selections(batcher) -> list[tuple[int, ...]]:
    """The per-row adapter selections the batcher's forwards ran with."""
    seen: list[tuple[int, ...]] = []
    original = batcher.core.select_adapters

    def select(seqs):
        seen.append(tuple(-1 if s.request.adapter is None else s.request.adapter for s in seqs))
        return original(seqs)

    batcher.core.select_adapters = select
    return seen


def expected(merged, name, request):
    return plain_greedy(merged[name], request.prompt_ids, request.max_new_tokens)


@pytest.mark.parametrize("speculate", ["off", "lookup", "prefix-cache"])
def test_mixed_batch_equals_each_merged_model_alone(shaken_model_dir, adapters, merged, tokenizer, speculate):
    model, indices = served_model(shaken_model_dir, adapters)
    jobs = interleaved(tokenizer, indices)
    references = [expected(merged, name, r) for name, r in jobs]
    # the adapters change the output (else equality below could not fail)
    for prompt_jobs in zip(*[iter(range(len(jobs)))] * 3, strict=True):
        assert len({tuple(references[k]) for k in prompt_jobs}) > 1
    # 4 rows for 24 requests: rows join, leave and move; 5-token prefill chunks spread prompts over steps
    # prefix-cache: blocks of 2 tokens, so the repeated prompts hit; keys and values differ per adapter, so a hit
    # under another adapter's blocks would change the output
    cache = {"prefix_cache": True, "prefix_block": 2} if speculate == "prefix-cache" else {}
    batcher = ContinuousBatcher(
        model, tokenizer, max_batch=4, prefill_chunk=5, per_row_adapters=True,
        speculate="off" if cache else speculate, **cache,
    )  # fmt: skip
    seen = record_selections(batcher)
    seqs = run_batcher(batcher, [r for _, r in jobs], join_after=5, steps=3)
    for (name, request), seq, reference in zip(jobs, seqs, references, strict=True):
        assert seq.out == reference, (name, request.prompt_ids)
    mixed = [s for s in seen if len(set(s)) == 3]
    assert mixed, "no forward ran the base and both adapters together"
    if cache:
        assert batcher.prefix_stats.hit_tokens > 0


def test_no_adapters_selected_without_the_flag(shaken_model_dir, adapters, tokenizer):
    """A batcher without per_row_adapters runs the model as it is and refuses adapter indices."""
    model, indices = served_model(shaken_model_dir, adapters)
    plain = ContinuousBatcher(model, tokenizer, max_batch=2)
    with pytest.raises(UserError, match="selects no adapter per request"):
        plain.submit(GenerationRequest([1, 2], 2, adapter=indices["sql"]))
    with pytest.raises(UserError, match="selects no adapter per request"):  # -1 would claim the base alone
        plain.submit(GenerationRequest([1, 2], 2, adapter=-1))
    per_row = ContinuousBatcher(model, tokenizer, max_batch=2, per_row_adapters=True)
    with pytest.raises(UserError, match="carries 2 adapter"):
        per_row.submit(GenerationRequest([1, 2], 2, adapter=2))
    with pytest.raises(UserError, match="run eagerly"):
        ContinuousBatcher(model, tokenizer, max_batch=2, per_row_adapters=True, compile=True)
    base = load_base(shaken_model_dir).model
    with pytest.raises(UserError, match="carries no adapter"):
        ContinuousBatcher(base, tokenizer, max_batch=2, per_row_adapters=True)
    ContinuousBatcher(base, tokenizer, max_batch=2).submit(GenerationRequest([1, 2], 2, adapter=-1))  # the base


def test_engine_refuses_an_adapter_index(shaken_model_dir, adapters, tokenizer):
    model, _ = served_model(shaken_model_dir, adapters)
    from slmkit.infer.core import DecodeCore

    core = DecodeCore(model, tokenizer, max_batch=1, max_len=32)
    with pytest.raises(UserError, match="merge the adapter"):
        core.admit(GenerationRequest([1, 2], 2, adapter=0))


# ---- the HTTP server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(shaken_model_dir, adapters):
    with TestClient(create_app(shaken_model_dir, adapters=adapters, max_batch=4)) as c:
        yield c


def test_models_lists_base_and_adapters(client, shaken_model_dir):
    base = shaken_model_dir.name
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["owned_by"], m["root"], m["parent"]) for m in data] == [
        (base, "slmkit", base, None),
        ("sql", "slmkit", base, base),
        ("chat.v1", "slmkit", base, base),
    ]


def test_requests_for_each_model_in_one_batch(client, shaken_model_dir, merged, tokenizer):
    """Completions for the base and both adapters, queued together so they decode in one batch; each answer is
    the merged model's greedy text."""
    base = shaken_model_dir.name
    names = [base, "sql", "chat.v1", "sql"]
    prompts = ["The cat sat", "The cat sat", "The cat sat", "one two three one"]
    scheduler = client.app.state.scheduler
    gate = threading.Event()
    original = scheduler.batcher.step
    seen = record_selections(scheduler.batcher)

    def held():
        gate.wait(30)
        return original()

    scheduler.batcher.step = held
    answers: dict[int, dict] = {}

    def post(i: int) -> None:
        body = {"model": names[i], "prompt": prompts[i], "max_tokens": NEW_TOKENS, "temperature": 0}
        answers[i] = client.post("/v1/completions", json=body).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(names))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.queue_depth + scheduler.running < len(names) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.set()
        for t in threads:
            t.join(60)
        scheduler.batcher.step = original
    assert any(len(set(s)) == 3 for s in seen), seen
    for i, name in enumerate(names):
        engine = Engine(merged[None if name == base else name], tokenizer)
        [alone] = engine.generate(prompts[i], max_new_tokens=NEW_TOKENS)
        assert answers[i]["model"] == name
        assert answers[i]["choices"][0]["text"] == alone.text, name
    assert len({answers[i]["choices"][0]["text"] for i in range(3)}) > 1  # the adapters made a difference


def test_chat_picks_the_adapter(client, merged, tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.post(
        "/v1/chat/completions", json={"model": "chat.v1", "messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    [alone] = Engine(merged["chat.v1"], tokenizer).generate("<|user|>\nHello\n<|assistant|>\n", max_new_tokens=6)
    assert r.json()["model"] == "chat.v1"
    assert r.json()["choices"][0]["message"]["content"] == alone.text


def test_unknown_model_is_openai_404(client, shaken_model_dir):
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "A", "max_tokens": 2})
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    assert "'sql'" in error["message"] and repr(shaken_model_dir.name) in error["message"]


# ---- bad --lora values ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "match"),
    [
        (["sql"], "give NAME=DIR"),
        (["=adapters/sql"], "give NAME=DIR"),
        (["sql="], "give NAME=DIR"),
        (["sql=a", "sql=b"], "given twice"),
    ],
)
def test_malformed_lora_values(values, match):
    with pytest.raises(UserError, match=match):
        parse_lora(values)


def test_bad_adapter_dirs_and_names(tmp_path, shaken_model_dir, adapters):
    base = shaken_model_dir.name
    with pytest.raises(UserError, match="'sql'.*no such adapter directory"):
        check_served_adapters({"sql": tmp_path / "missing"}, base)
    with pytest.raises(UserError, match="not an adapter directory"):
        check_served_adapters({"sql": shaken_model_dir}, base)
    with pytest.raises(UserError, match="base model's served name"):
        check_served_adapters({base: adapters["sql"]}, base)
    with pytest.raises(UserError, match="without spaces"):
        check_served_adapters({"my sql": adapters["sql"]}, base)
    assert check_served_adapters(adapters, base) == adapters


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """An adapter for another base: the same layer names, a wider model."""
    from slmkit.config import ModelConfig
    from slmkit.interop.adapters import save_adapter
    from slmkit.models import build_model
    from slmkit.models.lora import LoRASpec, add_adapters

    model = build_model(ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
    add_adapters(model, LoRASpec(r=2, target_modules="q_proj"))
    return save_adapter(model, tmp_path_factory.mktemp("foreign") / "adapter")


def test_adapter_for_another_base_is_refused(shaken_model_dir, foreign_adapter):
    with pytest.raises(UserError, match="'other'.*trained for another base"):
        create_app(shaken_model_dir, adapters={"other": foreign_adapter})


def test_slm_serve_bad_lora(shaken_model_dir, foreign_adapter, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for args in (["--lora", "sql"], ["--lora", f"sql={tmp_path}"], ["--lora", f"other={foreign_adapter}"]):
        r = run_slm("serve", shaken_model_dir, "--port", port, *args, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "serving model" not in r.stdout


def test_slm_serve_lora_live(shaken_model_dir, adapters, merged, tokenizer):
    """`slm serve BASE --lora ...` in its own process, driven by the official openai client."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    openai = pytest.importorskip("openai")
    from slmkit_testing import SRC

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lora = [f"--lora={name}={directory}" for name, directory in adapters.items()]
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "slmkit", "serve", str(shaken_model_dir), "--port", str(port), *lora]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        models = client.models.list().data
        assert [m.id for m in models] == [shaken_model_dir.name, "sql", "chat.v1"]
        answer = client.completions.create(model="sql", prompt="The cat sat", max_tokens=NEW_TOKENS, temperature=0)
        [alone] = Engine(merged["sql"], tokenizer).generate("The cat sat", max_new_tokens=NEW_TOKENS)
        assert answer.model == "sql" and answer.choices[0].text == alone.text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "with adapters 'sql', 'chat.v1'" in out


def test_adapters_on_moe_experts_refused_up_front():
    """Per-row selection cannot reach expert layers: the batcher refuses at construction, not at the first step."""
    from slmkit.config import ModelConfig
    from slmkit.models import build_model
    from slmkit.models.lora import LoRASpec, add_adapters

    fields = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    moe = build_model(ModelConfig(**fields, mlp="moe", moe_experts=4, moe_top_k=2)).eval()
    add_adapters(moe, LoRASpec(target_modules=("gate_proj",)))
    with pytest.raises(UserError, match="experts"):
        ContinuousBatcher(moe, None, max_batch=2, per_row_adapters=True)
