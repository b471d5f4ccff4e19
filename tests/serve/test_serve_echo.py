"""`echo` + `logprobs` on /v1/completions (OpenAI's legacy scoring mode) and lm-eval's `local-completions` backend
run against a live `slm serve`, scoring as slmkit's own lm-eval adapter does."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from slmkit.serve.app import create_app


@pytest.fixture(scope="module")
def client(engine, shaken_model_dir):
    with TestClient(create_app(engine, model_name=shaken_model_dir.name)) as c:
        yield c


@pytest.fixture(scope="module")
def name(shaken_model_dir):
    return shaken_model_dir.name


def _reference(engine, ids: list[int]) -> torch.Tensor:
    """(T-1, V) log-probs of positions 1.. from one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0, :-1].float(), -1)


def test_echo_scores_the_prompt(client, engine, name):
    ids = engine.tokenizer.encode("The dog sat on the mat and").ids
    body = {"model": name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    expected = _reference(engine, ids)
    assert choice["text"] == engine.tokenizer.decode(ids)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    chosen = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(chosen, abs=1e-5)
    for top, row in zip(lp["top_logprobs"][1:], expected, strict=True):
        assert len(top) <= 2 and sorted(top.values(), reverse=True) == pytest.approx(
            row.topk(2).values.tolist(), abs=1e-5
        )
    assert lp["text_offset"] == [len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

    # with generation: the prompt's entries, then the generated token's (as lm-eval's max_tokens 1 asks)
    text = "The dog sat on the mat and"
    r = client.post("/v1/completions", json={**body, "prompt": text, "max_tokens": 1})
    choice = r.json()["choices"][0]
    [alone] = engine.generate(text, max_new_tokens=1, logprobs=True)
    assert choice["text"] == text + alone.text
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(alone.logprobs[0], abs=1e-5)
    assert choice["logprobs"]["token_logprobs"][1:-1] == pytest.approx(chosen, abs=1e-5)

    # several prompts as token id lists, n choices each: every choice echoes its own prompt
    other = engine.tokenizer.encode("Hello there").ids
    r = client.post("/v1/completions", json={**body, "prompt": [ids, other], "n": 2})
    choices = r.json()["choices"]
    assert [len(c["logprobs"]["tokens"]) for c in choices] == [len(ids), len(ids), len(other), len(other)]
    # echo without logprobs: the text only
    r = client.post("/v1/completions", json={**body, "logprobs": None})
    assert r.json()["choices"][0]["logprobs"] is None and r.json()["choices"][0]["text"] == choice["text"][: len(text)]


@pytest.mark.parametrize(
    "change, param",
    [
        ({"echo": False}, "max_tokens"),  # max_tokens 0 only scores a prompt
        ({"stream": True}, "echo"),
        ({"prompt": [5, 10_000]}, "prompt"),  # outside the vocabulary
        ({"prompt": []}, "prompt"),
        ({"max_tokens": -1}, None),
    ],
)
def test_echo_bad_requests(client, name, change, param):
    body = {"model": name, "prompt": "The cat", "max_tokens": 0, "echo": True, "logprobs": 1, **change}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param


# ---- lm-eval's local-completions backend against a live server --------------------------------------------------


MC = [
    {"context": "Language models are trained on", "choices": [" text", " rocks", " water"], "answer": 0},
    {"context": "Scaling laws predict the ", "choices": ["loss", "banana", "moon"], "answer": 0},
    {"context": "The cat sat on the", "choices": [" mat", " moon", " idea"], "answer": 0},
    {"context": "We propose a new", "choices": [" method", " banana", " the"], "answer": 0},
    {"context": "Small models run on a", "choices": [" laptop", " cloud", " river"], "answer": 1},
]
GEN = [{"prompt": "Language models are", "target": "trained"}, {"prompt": "Scaling laws", "target": "predict"}]


def test_lm_eval_local_completions_matches_the_adapter(shaken_model_dir, tmp_path, monkeypatch):
    """`lm_eval --model local-completions --model_args base_url=.../v1/completions,tokenizer=DIR` on a local YAML
    + JSONL task (loglikelihood and generation) gives every item's log-likelihood and generation, and so the same
    scores, as slmkit's own adapter (`--model slmkit`)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API backends need lm-eval[api]")
    import lm_eval
    import lm_eval.models.openai_completions  # noqa: F401  (registers "local-completions")
    from lm_eval.tasks import TaskManager
    from test_serve_live import start_server
    from transformers import AutoTokenizer

    import slmkit.eval.lm_eval_adapter  # noqa: F401  (registers "slmkit")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for n, rows in (("mc", MC), ("gen", GEN)):
        (tmp_path / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n  cache_dir: {}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: echo_mc\n" + head.format(tmp_path / "mc.jsonl", tmp_path / "cache")
        + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        + "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )  # fmt: skip
    (tasks / "gen.yaml").write_text(
        "task: echo_gen\n" + head.format(tmp_path / "gen.jsonl", tmp_path / "cache")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        + "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    # slmkit starts every context with its end-of-text token; lm-eval's API backends send what their tokenizer
    # makes, so the client's tokenizer is told to add it (docs/evaluation.md)
    client_tokenizer = tmp_path / "bos-tokenizer"
    AutoTokenizer.from_pretrained(shaken_model_dir, add_bos_token=True).save_pretrained(client_tokenizer)

    def run(model: str, args: str) -> dict:
        return lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["echo_mc", "echo_gen"], log_samples=True, bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        )  # fmt: skip

    proc, base = start_server(shaken_model_dir)
    try:
        served = run(
            "local-completions",
            f"base_url={base}/v1/completions,tokenizer={client_tokenizer},add_bos_token=True,"
            f"model={shaken_model_dir.name},tokenizer_backend=huggingface,max_length=128",
        )
    finally:
        proc.terminate()
        proc.wait(30)
    ours = run("slmkit", f"pretrained={shaken_model_dir}")
    for task in ("echo_mc", "echo_gen"):
        a = sorted(served["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        for x, y in zip(a, b, strict=True):
            if task == "echo_mc":
                assert [r[0] for r in x["filtered_resps"]] == pytest.approx(
                    [r[0] for r in y["filtered_resps"]], abs=1e-4
                )
            else:
                assert x["filtered_resps"] == y["filtered_resps"]
    for key in ("acc,none", "acc_norm,none"):
        assert served["results"]["echo_mc"][key] == ours["results"]["echo_mc"][key]
    assert served["results"]["echo_gen"]["exact_match,none"] == ours["results"]["echo_gen"]["exact_match,none"]
