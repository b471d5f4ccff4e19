"""Extending a model's context before training: `slm finetune --context N --rope yarn` and
`slm train --init DIR --context N --rope linear|dynamic|yarn` (slmkit.config.extend_context)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from slmkit.config import extend_context, preset
from slmkit.data.chat import IGNORE, SFTData
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.train.finetune import finetune
from slmkit.train.loop import train
from slmkit_testing import finetune_config, run_slm, tiny_train_config

OLD, NEW = 128, 256  # tiny_model_dir's context, and the extended one


@pytest.fixture(scope="module")
def long_chat_file(tmp_path_factory):
    """Chats whose answers sit past the base model's 128-token window (a list to repeat back, then its sum)."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    with path.open("w") as f:
        for _ in range(24):
            numbers = [rng.randint(0, 9) for _ in range(90)]
            text = " ".join(map(str, numbers))
            chat = [
                {"role": "user", "content": f"repeat and add: {text}"},
                {"role": "assistant", "content": f"{text} = {sum(numbers)}"},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


def test_finetune_context_yarn_trains_long_rows_and_transformers_agrees(tiny_model_dir, long_chat_file, tmp_path):
    import transformers

    base = load_model(tiny_model_dir)
    assert base.config.max_seq_len == OLD and base.config.rope_scaling is None
    data = SFTData(long_chat_file, tiny_model_dir, NEW, packed=False, val_fraction=0.0, seed=0)
    trained = data.train_rows.targets != IGNORE
    last_trained = max(int(row.nonzero().max()) for row in torch.from_numpy(trained))
    assert last_trained > OLD  # the rows train positions the base model never saw

    cfg = finetune_config(
        tiny_model_dir, long_chat_file, context=NEW, rope="yarn", seq_len=NEW, max_steps=3, val_fraction=0.0
    )
    result = finetune(cfg, tmp_path / "run")
    assert result.final_dir is not None
    saved = json.loads((result.final_dir / "config.json").read_text())
    assert saved["max_position_embeddings"] == NEW
    rope = saved["rope_parameters"]
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 2.0, OLD)
    recorded = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert (recorded["context"], recorded["rope"]) == (NEW, "yarn")

    ours = load_model(result.final_dir).eval()
    assert ours.config.rope_scaling.type == "yarn" and ours.config.max_seq_len == NEW
    before = dict(base.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in ours.named_parameters())  # it trained
    theirs = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 220), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = ours(idx), theirs(idx).logits
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("rope, factor", [("linear", 2.0), ("dynamic", 2.0), (None, 2.0)])
def test_train_init_context_extends_the_saved_model(rope, factor, tiny_model_dir, data_dir, tmp_path):
    cfg = tiny_train_config(model={}, init=str(tiny_model_dir), context=NEW, rope=rope, seq_len=NEW, max_steps=2)
    result = train(cfg, data_dir, tmp_path / "run")
    assert result.final_dir is not None
    config = load_model(result.final_dir).config
    assert config.max_seq_len == NEW
    assert config.rope_scaling.type == (rope or "yarn") and config.rope_scaling.factor == factor


def test_extend_context_compounds_linear_and_yarn():
    config = preset("tiny", max_seq_len=128)
    yarn = extend_context(extend_context(config, 256, "yarn"), 1024, "yarn")
    assert (yarn.max_seq_len, yarn.rope_scaling.factor, yarn.rope_scaling.original_max_seq_len) == (1024, 8.0, 128)
    linear = extend_context(extend_context(config, 256, "linear"), 512, "linear")
    assert (linear.max_seq_len, linear.rope_scaling.factor) == (512, 4.0)


@pytest.mark.parametrize(
    "context, rope, message",
    [
        (64, "yarn", "--context 64 does not extend the model's context \\(128\\)"),
        (256, "ntk", "--rope 'ntk' is not a context extension"),
        (256, "linear", None),  # fine on its own; refused below on a yarn model
    ],
)
def test_extend_context_errors(context, rope, message):
    config = preset("tiny", max_seq_len=128)
    if message is None:
        with pytest.raises(UserError, match="already has yarn rope scaling; extend it with --rope yarn"):
            extend_context(extend_context(config, 256, "yarn"), 512, rope)
        return
    with pytest.raises(UserError, match=message):
        extend_context(config, context, rope)
    llama3 = config.replace(
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=16)
    )
    with pytest.raises(UserError, match="already has llama3 rope scaling is not supported"):
        extend_context(llama3, 256, "yarn")
    with pytest.raises(UserError, match="learned position embeddings"):
        extend_context(preset("tiny", positions="learned", family="slmkit"), 1024, "yarn")


def test_context_option_errors(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(UserError, match="rope \\(--rope\\) stretches a model to a new context"):
        finetune_config(tiny_model_dir, chat_file, rope="yarn")
    with pytest.raises(UserError, match="extends a model that training starts from"):
        tiny_train_config(context=512)
    with pytest.raises(UserError, match="an adapter run saves only the adapters"):
        finetune(finetune_config(tiny_model_dir, chat_file, context=NEW, lora={"r": 4}), tmp_path / "lora")
    done = run_slm(
        "finetune", tiny_model_dir, "--data", chat_file, "--out", tmp_path / "cli", "--max-steps", "1",
        "--context", "64",
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("error:") == 1
    assert "--context 64 does not extend the model's context (128)" in done.stderr
    assert not (tmp_path / "cli" / "final").exists()
