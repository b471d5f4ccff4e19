"""`slm generate` with the engine's options, end to end; bad input ends with one message and exit code 2."""

import json

import pytest

from slmkit_testing import run_slm


def assert_user_error(result, fragment):
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr


def test_generate_lookup_verbose_and_batch_file(tmp_path, tiny_model_dir):
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", "the data and the model and the data and the",
        "--max-new-tokens", 20, "--temperature", 0, "--lookup", "--verbose",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the data and the model")
    assert "speculation (lookup): accepted" in r.stderr and "tokens/s" in r.stderr

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["The", "Small language models", "A"]))
    r = run_slm(
        "generate", tiny_model_dir, "--prompts-file", prompts, "--max-new-tokens", 6, "--temperature", 0,
        "--batch-size", 2, "--logprobs", "--min-p", 0.1, "--repetition-penalty", 1.2,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == ["The", "Small language models", "A"]
    assert all(len(rec["logprobs"]) == rec["new_tokens"] for rec in records)


def test_generate_json_schema(tmp_path, tiny_model_dir):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", "Answer:", "--max-new-tokens", 20, "--json-schema", schema,
        "--json", "--seed", 1, "--verbose",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert isinstance(json.loads(record["text"])["ok"], bool)
    assert "grammar masks" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "x", "--temperature", "1", "--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["--prompt", "x", "--max-new-tokens", "5000"], "exceeds the model's context"),
        (["--prompt", "x", "--max-new-tokens", "8", "--regex", "a(b"], "invalid regex"),
    ],
)
def test_generate_bad_input(tiny_model_dir, args, message):
    assert_user_error(run_slm("generate", tiny_model_dir, *args), message)


def test_generate_draft_with_other_tokenizer(tiny_model_dir, other_tokenizer_dir):
    r = run_slm("generate", tiny_model_dir, "--prompt", "x", "--draft", other_tokenizer_dir)
    assert_user_error(r, "different tokenizer")
