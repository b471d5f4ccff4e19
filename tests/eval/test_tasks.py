"""JSONL tasks: validation, log-likelihood scoring (batched = unbatched = transformers), metrics, CIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from evalfixtures import MC_EXAMPLES, one_thread, write_jsonl  # noqa: F401

from slmkit.errors import UserError
from slmkit.eval.tasks import (
    MC_TEMPLATES,
    Task,
    bootstrap_ci,
    evaluate_task,
    load_task,
    loglikelihoods,
    mc_requests,
    render_mc,
    summarize,
)


@pytest.fixture
def mc_task_file(tmp_path):
    return write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from slmkit.api import load

    return load(tiny_model_dir)


# ---- loading and bad input ----------------------------------------------------------------------


def test_load_task_kinds(mc_task_file, tmp_path):
    task = load_task(mc_task_file)
    assert task.kind == "multiple_choice" and task.name == "mc" and len(task.examples) == len(MC_EXAMPLES)
    gen = load_task(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "target": "b", "regex": "b+"}]))
    assert gen.kind == "generation" and gen.examples[0]["regex"] == "b+"


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "{not json"], "mc.jsonl:2: malformed JSON"),
        (['{"context": "a", "choices": ["x", "y"], "answer": 2}'], "mc.jsonl:1: answer index 2 is out of range"),
        (['{"context": "a", "choices": ["x", "y"], "answer": -1}'], "out of range"),
        (['{"context": "a", "choices": ["x", "y"], "answer": "0"}'], '"answer" must be an integer'),
        (['{"context": "a", "choices": ["x"], "answer": 0}'], "at least two"),
        (["", "  "], "empty task file"),
        (["[1, 2]"], "expected a JSON object"),
        (['{"text": "a"}'], "not a task example"),
        (['{"prompt": "a", "target": "b"}', '{"context": "a", "choices": ["x", "y"], "answer": 0}'], "mc.jsonl:2"),
        (['{"prompt": "a", "target": "b", "regex": "("}'], "not a valid regular expression"),
    ],
)
def test_bad_task_files(tmp_path, lines, fragment):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=None) as info:
        load_task(path)
    assert fragment in str(info.value)


def test_missing_and_unknown_tasks(tmp_path):
    from slmkit.eval.builtin import resolve_tasks

    with pytest.raises(UserError, match="task file not found"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="unknown task 'hellaswag'"):
        resolve_tasks(["hellaswag"])


def test_bad_options(lm, mc_task_file):
    task = load_task(mc_task_file)
    with pytest.raises(UserError, match="unknown template"):
        evaluate_task(lm, task, templates=["fancy"])
    with pytest.raises(UserError, match="too few for 5-shot"):
        evaluate_task(lm, task, num_fewshot=5)


# ---- scoring ------------------------------------------------------------------------------------


def _reference_logprob(model, context, continuation):
    """One sequence, no batching, no padding."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
    n = len(continuation)
    targets = ids[0, -n:]
    return float(logprobs[-n:].gather(1, targets[:, None]).sum())


def test_batched_loglikelihoods_match_single_sequences(lm):
    requests = []
    for ex in MC_EXAMPLES:
        requests += mc_requests(lm, ex["context"], ex["choices"])
    batched = loglikelihoods(lm.model, requests, batch_size=4)
    for (context, continuation), (score, greedy) in zip(requests, batched, strict=True):
        assert score == pytest.approx(_reference_logprob(lm.model, context, continuation), abs=1e-4)
        assert score < 0 and isinstance(greedy, bool)
    # the greedy flag is true exactly for the model's own argmax continuation
    context = requests[0][0]
    with torch.no_grad():
        best = int(lm.model(torch.tensor([context]))[0, -1].argmax())
    assert loglikelihoods(lm.model, [(context, [best])])[0][1] is True
    assert loglikelihoods(lm.model, [(context, [(best + 1) % lm.config.vocab_size])])[0][1] is False


def test_long_context_is_truncated_on_the_left(lm):
    window = lm.config.max_seq_len
    context = list(range(1, 60)) * 5  # longer than the window
    continuation = [5, 6, 7]
    ((score, _),) = loglikelihoods(lm.model, [(context, continuation)])
    kept = (context + continuation)[-(window + 1) :]
    assert score == pytest.approx(_reference_logprob(lm.model, kept[: -len(continuation)], continuation), abs=1e-4)


def test_matches_transformers(lm, tiny_model_dir):
    """Our multiple-choice log-likelihoods equal those of transformers' model on the same directory."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    requests = []
    for ex in MC_EXAMPLES:
        requests += mc_requests(lm, ex["context"], ex["choices"])
    ours = loglikelihoods(lm.model, requests, batch_size=8)
    for (context, continuation), (score, _) in zip(requests, ours, strict=True):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids[:, :-1]).logits.float(), -1)[0]
        n = len(continuation)
        theirs = float(logprobs[-n:].gather(1, ids[0, -n:, None]).sum())
        assert score == pytest.approx(theirs, abs=1e-4)


def test_mc_metrics_follow_the_scores(lm, mc_task_file):
    task = load_task(mc_task_file)
    result = evaluate_task(lm, task, templates=["plain", "qa"], batch_size=3)
    assert result["examples"] == len(MC_EXAMPLES) and result["templates"] == ["plain", "qa"]
    assert result["chance"] == pytest.approx(np.mean([1 / len(ex["choices"]) for ex in MC_EXAMPLES]))
    for name in ("plain", "qa"):
        acc, acc_norm = [], []
        for i, ex in enumerate(MC_EXAMPLES):
            context, continuations = render_mc(task, i, MC_TEMPLATES[name], 0, 0)
            scores = [s for s, _ in loglikelihoods(lm.model, mc_requests(lm, context, continuations))]
            per_byte = [s / len(c.encode()) for s, c in zip(scores, continuations, strict=True)]
            acc.append(float(np.argmax(scores) == ex["answer"]))
            acc_norm.append(float(np.argmax(per_byte) == ex["answer"]))
        assert result["metrics"]["acc"]["by_template"][name]["value"] == pytest.approx(np.mean(acc))
        assert result["metrics"]["acc_norm"]["by_template"][name]["value"] == pytest.approx(np.mean(acc_norm))


def test_answer_position_matters(lm):
    """Moving the answer index to the model's favourite choice makes accuracy 1; away from it, 0."""
    context, choices = "The transformer uses", [" attention", " glue"]
    scores = [s for s, _ in loglikelihoods(lm.model, mc_requests(lm, context, choices))]
    favourite = int(np.argmax(scores))
    for answer, expected in ((favourite, 1.0), (1 - favourite, 0.0)):
        task = Task("t", "multiple_choice", [{"context": context, "choices": choices, "answer": answer}] * 2)
        result = evaluate_task(lm, task, templates=["plain"])
        assert result["metrics"]["acc"]["mean"] == expected


def test_fewshot_is_seeded_and_excludes_the_example(mc_task_file):
    task = load_task(mc_task_file)
    template = MC_TEMPLATES["qa"]
    a = render_mc(task, 0, template, 2, seed=1)
    assert a == render_mc(task, 0, template, 2, seed=1)
    contexts = {render_mc(task, 0, template, 2, seed=s)[0] for s in range(6)}
    assert len(contexts) > 1  # the seed changes the shots
    assert a[0].count("Question:") == 3 and a[0].endswith("Question: Language models are trained on\nAnswer:")
    assert a[0].count("Language models are trained on") == 1  # the example is never its own shot


def test_generation_metrics(lm, tmp_path):
    from slmkit.infer.generate import generate_ids

    # tasks generate as they score: after a document-start (end-of-text) token, greedily, up to a newline
    for prompt in ("Language models are", "We train", "The", "Scaling laws for", "In this paper we"):
        ids = [0, *lm.tokenizer.encode(prompt).ids]
        expected = lm.tokenizer.decode(list(generate_ids(lm.model, ids, 6))).split("\n")[0]
        if expected.strip():
            break
    assert expected.strip(), "the tiny model should continue one of the prompts on the same line"
    records = [
        {"prompt": prompt, "target": expected, "regex": "."},
        {"prompt": prompt, "target": "zzz unlikely zzz", "regex": "^zzz"},
    ]
    task = load_task(write_jsonl(tmp_path / "gen.jsonl", records))
    result = evaluate_task(lm, task, templates=["plain"], max_new_tokens=6)
    per = result["metrics"]
    assert per["exact_match"]["mean"] == 0.5 and per["contains"]["mean"] == 0.5 and per["regex"]["mean"] == 0.5


# ---- statistics ---------------------------------------------------------------------------------


def test_bootstrap_ci():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    values = [1.0, 0.0] * 50
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < 0.5 < hi and (lo, hi) == bootstrap_ci(values, seed=3)
    lo_big, hi_big = bootstrap_ci(values * 20, seed=3)
    assert hi_big - lo_big < hi - lo  # more examples, tighter interval


def test_summarize_spread():
    out = summarize({"a": [1, 1, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 1, 0]})
    assert out["min"] == 0.25 and out["max"] == 0.75 and out["mean"] == pytest.approx(0.5)
    assert out["by_template"]["c"]["value"] == 0.75
    assert out["ci95"][0] <= 0.5 <= out["ci95"][1]
    json.dumps(out)  # plain JSON types


def test_lettered_formulation_and_olmes_summary(lm, mc_task_file):
    """`letters` lists the choices under letters and scores the letters (OLMES's MCF); with a cloze template too,
    the result names both accuracies and the better one. It is not in the default templates."""
    task = load_task(mc_task_file)
    template = MC_TEMPLATES["letters"]
    context, continuations = render_mc(task, 2, template, 0, 0)
    ex = MC_EXAMPLES[2]
    assert continuations == [" A", " B", " C", " D"][: len(ex["choices"])]
    assert context == "Question: The transformer uses\n A. attention\n B. glue\n C. paint\n D. x\nAnswer:"
    shot_context, _ = render_mc(task, 0, template, 1, 0)
    assert shot_context.count("Answer:") == 2 and "\nAnswer: " in shot_context  # the shot ends in its letter

    result = evaluate_task(lm, task, templates=["plain", "letters"])
    f = result["formulations"]
    assert f["cloze"]["value"] == pytest.approx(result["metrics"]["acc_norm"]["by_template"]["plain"]["value"])
    assert f["mcf"]["value"] == pytest.approx(result["metrics"]["acc"]["by_template"]["letters"]["value"])
    assert f["best"] == max(("cloze", "mcf"), key=lambda k: f[k]["value"])
    assert "formulations" not in evaluate_task(lm, task, templates=["plain"])
    assert evaluate_task(lm, task)["templates"] == ["plain", "instruct", "qa"]

    many = Task("m", "multiple_choice", [{"context": "x", "choices": [f" {i}" for i in range(30)], "answer": 0}] * 2)
    with pytest.raises(UserError, match="at most 26 choices"):
        evaluate_task(lm, many, templates=["letters"])


# ---- OLMES-style evaluation: curated shots, both formulations -------------------------------------


def test_curated_shots_rule_and_marks(tmp_path):
    """Unmarked files: the shortest examples, answer positions cycling A, B, ...; marked files: the marks, in order.
    Shots are never scored."""
    from slmkit.eval.tasks import curated_shots, scored_indices

    task = load_task(write_jsonl(tmp_path / "mc.jsonl", MC_EXAMPLES))
    # answer 0 first (shortest with answer 0 is "Compute budgets limit" [4] vs "Scaling laws predict the" [1]:
    # sizes 21+9+8=38 vs 24+5+7=36 -> index 1), then answer 1 (only index 3), then answer 2 (only index 2)
    assert curated_shots(task, 3) == [1, 3, 2]
    assert scored_indices(task, [1, 3, 2]) == [0, 4]
    with pytest.raises(UserError, match="too few for 5 curated shots"):
        curated_shots(task, 5)

    marked = [dict(ex) for ex in MC_EXAMPLES]
    marked[4]["fewshot"] = True
    marked[0]["fewshot"] = True
    task = load_task(write_jsonl(tmp_path / "marked.jsonl", marked))
    assert curated_shots(task, 2) == [0, 4] and scored_indices(task, None) == [1, 2, 3]
    with pytest.raises(UserError, match='marks 2 "fewshot" example'):
        curated_shots(task, 3)
    for bad, fragment in (({"fewshot": "yes"}, '"fewshot" must be true or false'),):
        with pytest.raises(UserError, match=fragment):
            load_task(write_jsonl(tmp_path / "bad.jsonl", [{**MC_EXAMPLES[0], **bad}]))
    with pytest.raises(UserError, match="every example is marked"):
        load_task(write_jsonl(tmp_path / "all.jsonl", [{**ex, "fewshot": True} for ex in MC_EXAMPLES]))


def test_marked_shots_are_used_and_not_scored(lm, tmp_path):
    """A file's curated shots precede every item (the same text each time) and drop out of the scored items,
    with or without --olmes."""
    marked = [dict(ex) for ex in MC_EXAMPLES]
    marked[1]["fewshot"] = True
    task = load_task(write_jsonl(tmp_path / "marked.jsonl", marked))
    qa = MC_TEMPLATES["qa"]
    first, _ = render_mc(task, 0, qa, 1, 0, [1])
    other, _ = render_mc(task, 3, qa, 1, 0, [1])
    shot = "Question: Scaling laws predict the\nAnswer:  loss\n\n"  # the qa template adds a space before " loss"
    assert first.startswith(shot) and other.startswith(shot)
    result = evaluate_task(lm, task, templates=["qa"], num_fewshot=1)
    assert result["examples"] == 4 and result["shots"] == {"curated": True, "indices": [1]}
    assert evaluate_task(lm, task, templates=["qa"])["examples"] == 4  # zero-shot: marked items still unscored


def test_olmes_scores_both_formulations_and_reports_the_better(lm, mc_task_file):
    task = load_task(mc_task_file)
    result = evaluate_task(lm, task, num_fewshot=2, olmes=True)
    assert result["templates"] == ["qa", "letters"] and result["primary_metric"] == "olmes"
    assert result["examples"] == len(MC_EXAMPLES) - 2
    olmes, f = result["metrics"]["olmes"], result["formulations"]
    cloze = result["metrics"]["acc_norm"]["by_template"]["qa"]["value"]
    mcf = result["metrics"]["acc"]["by_template"]["letters"]["value"]
    assert olmes["by_template"]["cloze"]["value"] == pytest.approx(cloze)
    assert olmes["by_template"]["mcf"]["value"] == pytest.approx(mcf)
    assert olmes["mean"] == pytest.approx(max(cloze, mcf)) and olmes["formulation"] == f["best"]
    assert olmes["min"] == pytest.approx(min(cloze, mcf))
    # the same scores as scoring each formulation with those fixed shots by hand
    shots = result["shots"]["indices"]
    plain = evaluate_task(lm, task, templates=["qa", "letters"], num_fewshot=2)  # random shots per item
    assert "olmes" not in plain["metrics"] and plain["examples"] == len(MC_EXAMPLES)
    context, _ = render_mc(task, 0, MC_TEMPLATES["letters"], 2, 0, shots)
    assert context.count("Answer:") == 3
    with pytest.raises(UserError, match="both as cloze and as lettered"):
        evaluate_task(lm, task, templates=["qa"], olmes=True)


def test_olmes_cli(tiny_model_dir, mc_task_file, capsys):
    """--olmes defaults to 5 curated shots (too many for a 5-example file: one error line, exit 2); with fewer,
    the JSON carries the olmes primary metric."""
    from slmkit.cli import run

    args = ["eval", str(tiny_model_dir), "--tasks", str(mc_task_file), "--olmes", "--json"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "too few for 5 curated shots" in err and len(err.strip().splitlines()) == 1
    assert run([*args, "--num-fewshot", "2"]) == 0
    task = json.loads(capsys.readouterr().out)["tasks"][0]
    assert task["primary_metric"] == "olmes" and task["num_fewshot"] == 2 and task["examples"] == 3
