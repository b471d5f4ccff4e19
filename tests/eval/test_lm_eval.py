"""The lm-evaluation-harness adapter on local task YAMLs and local JSONL data (nothing downloaded)."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch
from evalfixtures import one_thread, write_jsonl  # noqa: F401

pytest.importorskip("lm_eval")

MC = [
    {"context": "Language models are trained on", "choices": [" text", " rocks", " water"], "answer": 0},
    {"context": "Scaling laws predict the ", "choices": ["loss", "banana", "moon"], "answer": 0},
]
DOCS = [
    {"text": "Small language models are trained on small corpora."},
    {"text": "Scaling laws predict the loss of a model from its size and data."},
]
GEN = [{"prompt": "Language models are", "target": "trained"}, {"prompt": "Scaling laws", "target": "predict"}]


def _yaml(name: str, data, cache, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {cache}\ntest_split: test\n{body}"
    )


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc, docs, gen = (write_jsonl(tmp_path / f"{n}.jsonl", r) for n, r in (("mc", MC), ("docs", DOCS), ("gen", GEN)))
    (tasks / "mc.yaml").write_text(
        _yaml("slm_mc", mc, cache, "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n")
        + "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        + "metric_list:\n  - metric: acc\n"
    )
    (tasks / "rolling.yaml").write_text(
        _yaml("slm_rolling", docs, cache, "output_type: loglikelihood_rolling\ndoc_to_text: ''\n")
        + "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    (tasks / "gen.yaml").write_text(
        _yaml("slm_gen", gen, cache, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n")
        + "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5\n"
        + "metric_list:\n  - metric: exact_match\n"
    )
    return tasks


def _logprob(model, ids: list[int], n: int) -> float:
    """Sum of log-probs of the last n of ids, one unpadded forward pass."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(x[:, :-1]).float(), -1)[0]
    return float(logprobs[-n:].gather(1, x[0, -n:, None]).sum())


def test_simple_evaluate_three_request_types(task_dir, tiny_model_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import slmkit.eval.lm_eval_adapter  # noqa: F401  (registers "slmkit")
    from slmkit.api import load
    from slmkit.infer.generate import generate_ids

    out = lm_eval.simple_evaluate(
        model="slmkit",
        model_args=f"pretrained={tiny_model_dir}",
        tasks=["slm_mc", "slm_rolling", "slm_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert set(out["results"]) == {"slm_mc", "slm_rolling", "slm_gen"}
    lm = load(tiny_model_dir)
    enc = lm.tokenizer.encode
    eot = 0
    for sample in out["samples"]["slm_mc"]:
        doc = sample["doc"]
        context = doc["context"].rstrip(" ")
        moved = doc["context"][len(context) :]  # a trailing space moves to the continuation, as in lm-eval
        for choice, (score, _greedy) in zip(doc["choices"], sample["filtered_resps"], strict=True):
            ctx_ids, cont_ids = [eot, *enc(context).ids], enc(moved + choice).ids
            assert score == pytest.approx(_logprob(lm.model, ctx_ids + cont_ids, len(cont_ids)), abs=1e-4)
    for sample in out["samples"]["slm_rolling"]:
        ids = enc(sample["doc"]["text"]).ids
        assert sample["filtered_resps"][0] == pytest.approx(_logprob(lm.model, [eot, *ids], len(ids)), abs=1e-3)
    for sample in out["samples"]["slm_gen"]:
        ids = [eot, *enc(sample["doc"]["prompt"]).ids]
        expected = lm.tokenizer.decode(list(generate_ids(lm.model, ids, 5, stop_ids={eot}))).split("\n")[0]
        assert sample["filtered_resps"][0] == expected
    mc = out["results"]["slm_mc"]["acc,none"]
    assert 0.0 <= mc <= 1.0


def test_lm_eval_command_line(task_dir, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`python -m slmkit.eval.lm_eval_adapter ...` is lm-eval's command line with `slmkit` registered."""
    from slmkit.eval.lm_eval_adapter import main

    out_dir = tmp_path / "results"
    argv = ["lm_eval", "run", "--model", "slmkit", "--model_args", f"pretrained={tiny_model_dir}"]
    argv += ["--tasks", "slm_mc", "--include_path", str(task_dir), "--output_path", str(out_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    # lm-eval indexes its thousands of built-in task YAMLs first (most of a minute on a busy machine);
    # the command line has no switch for that, so the test skips it
    import lm_eval.tasks

    quick = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", quick)
    main()
    assert "slm_mc" in capsys.readouterr().out
    (saved,) = out_dir.rglob("results_*.json")
    assert "acc,none" in json.loads(saved.read_text())["results"]["slm_mc"]


def test_bad_model_dir(tmp_path):
    from slmkit.errors import UserError
    from slmkit.eval.lm_eval_adapter import SlmkitLM

    with pytest.raises(UserError, match="no such model"):
        SlmkitLM(pretrained=str(tmp_path / "missing"))


def test_slm_eval_lm_eval_runs_tasks_through_the_adapter(task_dir, tiny_model_dir):
    """`slm eval MODEL --lm-eval TASKS --lm-eval-include DIR`: no import by hand; the scores are the adapter's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import slmkit.eval.lm_eval_adapter  # noqa: F401  (registers "slmkit")
    from slmkit_testing import run_slm

    proc = run_slm("eval", tiny_model_dir, "--lm-eval", "slm_mc,slm_gen", "--lm-eval-include", task_dir, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)[str(tiny_model_dir)]
    direct = lm_eval.simple_evaluate(
        model="slmkit", model_args=f"pretrained={tiny_model_dir}", tasks=["slm_mc", "slm_gen"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )["results"]  # fmt: skip
    assert results["slm_mc"]["acc,none"] == direct["slm_mc"]["acc,none"]
    assert results["slm_gen"]["exact_match,none"] == direct["slm_gen"]["exact_match,none"]

    table = run_slm("eval", tiny_model_dir, "--lm-eval", "slm_mc", "--lm-eval-include", task_dir)
    assert table.returncode == 0 and "slm_mc" in table.stdout and "acc" in table.stdout


def test_slm_eval_lm_eval_bad_input(task_dir, tiny_model_dir, monkeypatch):
    import lm_eval.tasks

    from slmkit.errors import UserError
    from slmkit.eval.lm_eval_adapter import evaluate_lm_eval_tasks
    from slmkit_testing import run_slm

    proc = run_slm("eval", tiny_model_dir, "--lm-eval", "slm_mc", "--tasks", "x.jsonl")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "--tasks" in proc.stderr
    proc = run_slm("eval", tiny_model_dir, "--lm-eval-include", task_dir)
    assert proc.returncode == 2 and "needs --lm-eval" in proc.stderr
    proc = run_slm("eval", tiny_model_dir, "--lm-eval", "slm_mc", "--lm-eval-include", task_dir / "nope")
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    # an unknown name is looked for in lm-eval's own tasks too (skipped here: indexing them takes a minute)
    quick = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", quick)
    with pytest.raises(UserError, match="no task named slm_nope"):
        evaluate_lm_eval_tasks(str(tiny_model_dir), ["slm_mc,slm_nope"], [str(task_dir)])


def test_slm_eval_tasks_and_lm_eval_score_the_same_tokens(task_dir, tiny_model_dir, tmp_path):
    """One rule for a context's trailing whitespace (it moves into the continuation before tokenising): `slm eval
    --tasks FILE` and lm-eval (through slmkit's adapter) on the same JSONL give the same log-likelihood for every
    choice of every item, and so the same acc and acc_norm."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import slmkit.eval.lm_eval_adapter  # noqa: F401  (registers "slmkit")
    from slmkit.api import load
    from slmkit.eval.tasks import MC_TEMPLATES, evaluate_task, load_task, loglikelihoods, mc_requests, render_mc

    rows = MC + [
        {"context": "Small models run on a ", "choices": ["laptop", "cloud", "river"], "answer": 0},
        {"context": "The loss falls as the model grows\n", "choices": ["larger", "We", "The"], "answer": 1},
        {"context": "A  ", "choices": ["cat", "dog"], "answer": 0},
    ]
    (task_dir / "mc.yaml").write_text(
        (task_dir / "mc.yaml").read_text().replace(str(task_dir.parent / "mc.jsonl"), str(tmp_path / "ws.jsonl"))
        + "  - metric: acc_norm\n"
    )
    write_jsonl(tmp_path / "ws.jsonl", rows)
    out = lm_eval.simple_evaluate(
        model="slmkit", model_args=f"pretrained={tiny_model_dir}", tasks=["slm_mc"], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0,
    )  # fmt: skip
    lm = load(tiny_model_dir)
    task = load_task(tmp_path / "ws.jsonl")
    plain = MC_TEMPLATES["plain"]
    samples = sorted(out["samples"]["slm_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    for i, sample in enumerate(samples):
        context, continuations = render_mc(task, i, plain, 0, 0)
        ours = [score for score, _ in loglikelihoods(lm.model, mc_requests(lm, context, continuations))]
        theirs = [r[0] for r in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-5), (i, context)
    result = evaluate_task(lm, task, templates=["plain"])
    assert result["metrics"]["acc"]["mean"] == pytest.approx(out["results"]["slm_mc"]["acc,none"])
    assert result["metrics"]["acc_norm"]["mean"] == pytest.approx(out["results"]["slm_mc"]["acc_norm,none"])
