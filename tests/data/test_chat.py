"""Fine-tuning data: sample checks, the chat template's loss mask, and packing (slmkit.data.chat)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from slmkit.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE,
    SampleEncoder,
    SFTData,
    pack,
    read_samples,
)
from slmkit.data.tokenizer import EOT_TOKEN
from slmkit.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Green, of course."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def trained_text(tokenizer: Tokenizer, encoded) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained tokens)."""
    runs, current = [], []
    for token, trained in zip(encoded.ids.tolist(), encoded.trained.tolist(), strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_default_template_trains_assistant_messages_and_their_end_token(tokenizer):
    encoded = SampleEncoder(tokenizer, DEFAULT_CHAT_TEMPLATE).encode(CONVERSATION)
    assert trained_text(tokenizer, encoded) == ["Blue." + EOT_TOKEN, "Green, of course." + EOT_TOKEN]
    whole = tokenizer.decode(encoded.ids.tolist(), skip_special_tokens=False)
    assert whole.startswith("<|system|>\nBe brief.\n<|user|>\nName a colour.\n<|assistant|>\nBlue.")


def test_other_template_is_masked_from_its_own_rendering(tokenizer):
    encoded = SampleEncoder(tokenizer, CHATML).encode(CONVERSATION)
    assert trained_text(tokenizer, encoded) == ["Blue.", "Green, of course."]
    assert "<|im_start|>assistant" in tokenizer.decode(encoded.ids.tolist(), skip_special_tokens=False)


def test_loss_on_prompt_trains_every_token_but_the_first(tokenizer):
    encoded = SampleEncoder(tokenizer, DEFAULT_CHAT_TEMPLATE, loss_on_prompt=True).encode(CONVERSATION)
    assert not encoded.trained[0] and encoded.trained[1:].all()


def test_prompt_completion_trains_the_completion_and_end_token(tokenizer):
    sample = {"prompt": "Q: two plus two?\nA:", "completion": " four"}
    encoded = SampleEncoder(tokenizer, DEFAULT_CHAT_TEMPLATE).encode(sample)
    assert "".join(trained_text(tokenizer, encoded)) == " four" + EOT_TOKEN
    assert int(encoded.nbytes[encoded.trained].sum()) == len(" four") + len(EOT_TOKEN)


def test_template_that_rewrites_earlier_text_is_refused(tokenizer):
    # the count of messages at the top changes with every message: no rendering is a prefix of the next
    template = "{{ messages | length }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    with pytest.raises(UserError, match="not incremental"):
        SampleEncoder(tokenizer, template).encode(CONVERSATION)


def encoded_samples(tokenizer, lengths):
    encoder = SampleEncoder(tokenizer, DEFAULT_CHAT_TEMPLATE)
    return [encoder.encode({"prompt": "p", "completion": "x" * n}) for n in lengths]


def test_packing_keeps_every_sample_whole_with_its_own_positions(tokenizer):
    samples = encoded_samples(tokenizer, [3, 40, 7, 12, 25, 5, 60])
    rows = pack(samples, seq_len=48, pad_id=0)
    assert rows.truncated == 1  # the 60-character completion is longer than a row
    assert len(rows) < len(samples)  # short samples share rows
    for index, sample in enumerate(samples):
        where = rows.segments == index
        n = min(len(sample.ids), 49) - 1
        assert where.sum() == n and where.any(axis=1).sum() == 1  # all in one row
        row = int(np.nonzero(where.any(axis=1))[0][0])
        assert rows.positions[row][where[row]].tolist() == list(range(n))
        assert rows.inputs[row][where[row]].tolist() == sample.ids[:n].tolist()
        expected = np.where(sample.trained[1 : n + 1], sample.ids[1 : n + 1], IGNORE)
        assert rows.targets[row][where[row]].tolist() == expected.tolist()
    assert (rows.targets[rows.segments == -1] == IGNORE).all()  # padding is never a target
    assert rows.trained_tokens == int((rows.targets != IGNORE).sum())


def test_unpacked_rows_hold_one_sample_each(tokenizer):
    samples = encoded_samples(tokenizer, [3, 4, 5])
    rows = pack(samples, seq_len=32, pad_id=0, packed=False)
    assert len(rows) == 3
    assert [sorted(set(r.tolist()) - {-1}) for r in rows.segments] == [[0], [1], [2]]


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ('["a list"]', r"bad\.jsonl:2: expected a JSON object"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:2: .*role 'robot'.*template does not know"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: .*no assistant message"),
        ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] must be an object"),
        ({"prompt": "hi"}, r"bad\.jsonl:2: `completion` must be a string"),
        ({"text": "hi"}, r"bad\.jsonl:2: a sample needs `messages`, or `prompt` and `completion`"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, line])
    with pytest.raises(UserError, match=message):
        read_samples(path)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_samples(tmp_path / "absent.jsonl")
    with pytest.raises(UserError, match="no samples"):
        read_samples(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="bin.jsonl:1: not UTF-8"):
        read_samples(tmp_path / "bin.jsonl")


def test_sft_data_holds_out_validation_samples(tmp_path, tiny_model_dir):
    lines = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(40)]
    path = write_lines(tmp_path / "set.jsonl", lines)
    data = SFTData(path, tiny_model_dir, seq_len=32, val_fraction=0.1)
    summary = data.summary()
    assert summary["samples"] == 40 and summary["val_rows"] >= 1
    assert summary["train_trained_tokens"] + summary["val_trained_tokens"] == sum(
        SampleEncoder(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")), DEFAULT_CHAT_TEMPLATE)
        .encode(x)
        .trained.sum()
        for x in lines
    )
    assert 1 < data.bytes_per_token("val") < 8


def test_the_models_own_end_token_closes_answers(tmp_path, tokenizer):
    """A Hugging Face model's eos (tokenizer_config.json) ends each answer, and rows are padded with it."""
    from slmkit.data.chat import eos_text

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert eos_text(tmp_path) == "</s>"
    assert eos_text(tmp_path / "absent") == EOT_TOKEN
    hf = Tokenizer.from_str(tokenizer.to_str())
    hf.add_special_tokens(["</s>"])
    encoded = SampleEncoder(hf, DEFAULT_CHAT_TEMPLATE, eos_token="</s>").encode(CONVERSATION)
    assert trained_text(hf, encoded) == ["Blue.</s>", "Green, of course.</s>"]
    encoded = SampleEncoder(hf, DEFAULT_CHAT_TEMPLATE, eos_token="</s>").encode({"prompt": "a", "completion": " b"})
    assert encoded.ids[-1] == hf.token_to_id("</s>")


def test_a_model_whose_eos_is_not_in_its_tokenizer_is_refused(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    path = write_lines(tmp_path / "set.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match="<\\|im_end\\|>"):
        SFTData(path, model, seq_len=16)
