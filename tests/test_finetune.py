"""`slm finetune` / slmkit.train.finetune: SFT through the one training loop (full fine-tuning here; adapters in
tests/models/test_lora.py and tests/test_finetune_lora.py)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slmkit.data.chat import IGNORE, SFTData
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.train.finetune import FinetuneConfig, finetune, masked_nats
from slmkit_testing import run_slm


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """Arithmetic chats and prompt/completion pairs: a task the tiny base model has never seen."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sft") / "chat.jsonl"
    with path.open("w") as f:
        for _ in range(60):
            a = rng.randint(0, 20)
            chat = [{"role": "user", "content": f"double {a}"}, {"role": "assistant", "content": f"{2 * a}"}]
            f.write(json.dumps({"messages": chat}) + "\n")
            f.write(json.dumps({"prompt": f"half of {2 * a} is", "completion": f" {a}"}) + "\n")
    return path


def config(base, data, **changes) -> FinetuneConfig:
    options = dict(
        init=str(base),
        data=str(data),
        seq_len=48,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,
        eval_interval=1000,
        eval_batches=2,
        save_interval=1000,
        device="cpu",
        seed=3,
    )
    return FinetuneConfig(**{**options, **changes})


def test_finetuning_lowers_the_loss_on_held_out_answers(tiny_model_dir, chat_file, tmp_path):
    cfg = config(tiny_model_dir, chat_file, max_steps=40, val_fraction=0.2)
    data = SFTData(chat_file, tiny_model_dir, cfg.seq_len, val_fraction=0.2, seed=cfg.seed)
    nats, count = masked_nats(load_model(tiny_model_dir), data.val_rows, cfg, None)
    result = finetune(cfg, tmp_path / "run")
    assert result.final_dir is not None and result.val_loss is not None
    assert result.val_loss < 0.7 * nats / count  # measured on the same held-out rows, answers only
    template = json.loads((result.final_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert template == data.template  # serve and transformers render chats as they were trained
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["init"] == str(tiny_model_dir) and saved["data"] == str(chat_file)


def test_only_answer_tokens_carry_loss(tiny_model_dir, chat_file):
    """The objective's loss equals cross-entropy over the trained targets alone: prompts add nothing."""
    from slmkit.train.batches import RowSampler
    from slmkit.train.objectives import LanguageModeling

    cfg = config(tiny_model_dir, chat_file)
    data = SFTData(chat_file, tiny_model_dir, cfg.seq_len, seed=cfg.seed)
    model = load_model(tiny_model_dir)
    x, y, extra = RowSampler(data.train_rows, seed=0).next_batch(4)
    loss, _ = LanguageModeling(None, 0.0).loss(lambda ids: model(ids, **extra), x, y)
    logits = model(x, **extra)
    keep = y != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, expected)
    assert keep.float().mean() < 0.5  # most positions are prompts, template and padding
    loss.backward()
    # changing a masked target does not change the loss
    y2 = y.clone()
    y2[~keep & (y2 == IGNORE)] = IGNORE
    assert torch.equal(LanguageModeling(None, 0.0).loss(lambda ids: model(ids, **extra), x, y2)[0], loss)


def test_resumed_finetuning_equals_uninterrupted(tiny_model_dir, chat_file, tmp_path):
    whole = finetune(config(tiny_model_dir, chat_file, max_steps=6, save_interval=3), tmp_path / "whole")
    # the run as a crash after step 4 leaves it: the step-3 checkpoint, no final/
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = finetune(None, tmp_path / "part", resume=True)
    assert resumed.step == 6
    a = load_file(whole.final_dir / "model.safetensors")
    b = load_file(resumed.final_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unpacked_rows_for_recurrent_models(tmp_path, chat_file, data_dir):
    """A model whose mixers carry state across tokens trains one sample per row; --pack is refused for it."""
    from slmkit.train.loop import train
    from slmkit_testing import tiny_train_config

    base = train(
        tiny_train_config(preset="micro-mamba", max_steps=2, model={"max_seq_len": 64}), data_dir, tmp_path / "m"
    )
    with pytest.raises(UserError, match="fine-tune it without --pack"):
        finetune(config(base.final_dir, chat_file, pack=True), tmp_path / "packed")
    result = finetune(config(base.final_dir, chat_file, max_steps=2), tmp_path / "plain")
    assert result.final_dir is not None


def test_cli_finetune_and_its_errors(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", tiny_model_dir, "--data", chat_file, "--out", out, "--max-steps", "2", "--seq-len", "48"]
    done = run_slm(*args, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert (out / "final" / "model.safetensors").is_file()
    again = run_slm(*args)
    assert again.returncode == 2 and again.stderr.count("error:") == 1 and "--resume" in again.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    broken = run_slm("finetune", tiny_model_dir, "--data", bad, "--out", tmp_path / "x", "--max-steps", "1")
    assert broken.returncode == 2 and "bad.jsonl:2: not valid JSON" in broken.stderr
    assert not (tmp_path / "x" / "final").exists()
    no_adapter = run_slm("finetune", tiny_model_dir, "--data", chat_file, "--out", tmp_path / "y", "--rank", "4")
    assert no_adapter.returncode == 2 and "need --lora" in no_adapter.stderr


def test_quantized_base_needs_adapters(tiny_model_dir, chat_file, tmp_path):
    from slmkit.compress.pipeline import compress

    quantized = tmp_path / "int8"
    compress(tiny_model_dir, "int8", quantized, measure=False)
    with pytest.raises(UserError, match="--lora"):
        finetune(config(quantized, chat_file), tmp_path / "run")
