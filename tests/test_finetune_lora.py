"""`slm finetune --lora/--nola`: adapter runs whose checkpoints are PEFT adapter directories."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slmkit.interop.checkpoint import load_model
from slmkit.train.finetune import finetune
from slmkit_testing import finetune_config as config
from slmkit_testing import run_slm, seeded_logits


def test_lora_run_saves_a_peft_adapter_that_peft_loads(tiny_model_dir, chat_file, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = config(tiny_model_dir, chat_file, max_steps=4, lora={"r": 4, "target_modules": "all-linear"})
    result = finetune(cfg, tmp_path / "run")
    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert "chat_template" in json.loads((final / "tokenizer_config.json").read_text())
    ours = load_model(tmp_path / "run")  # a run dir of an adapter run: its base with the adapter attached
    base = load_model(tiny_model_dir)
    assert (seeded_logits(ours) - seeded_logits(base)).abs().max() > 1e-4  # the adapter trained
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, final).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)).abs().max() < 1e-5


def test_resumed_lora_run_equals_uninterrupted(tiny_model_dir, chat_file, tmp_path):
    cfg = config(tiny_model_dir, chat_file, max_steps=6, save_interval=3, lora={"r": 4, "dropout": 0.1})
    whole = finetune(cfg, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = finetune(None, tmp_path / "part", resume=True)
    a = load_file(whole.final_dir / "adapter_model.safetensors")
    b = load_file(resumed.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_on_an_int8_base(tiny_model_dir, chat_file, tmp_path):
    from slmkit.compress.pipeline import compress

    quantized = tmp_path / "int8"
    compress(tiny_model_dir, "int8", quantized, measure=False)
    before = load_file(quantized / "model.safetensors")
    result = finetune(config(quantized, chat_file, max_steps=3, lora={"r": 2}), tmp_path / "run")
    assert result.train_loss is not None and result.final_dir is not None
    after = load_file(quantized / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is only read
    model = load_model(result.final_dir)
    assert model.compression is not None  # the quantized base with the adapter on top


def test_nola_run_from_the_cli(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "nola"
    done = run_slm(
        "finetune",
        tiny_model_dir,
        "--data",
        chat_file,
        "--out",
        out,
        "--nola",
        "--rank",
        "4",
        "--max-steps",
        "2",
        "--target-modules",
        "q_proj,v_proj",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    generated = run_slm("generate", out, "--prompt", "double 3", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
