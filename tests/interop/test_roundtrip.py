"""Export to Hugging Face and back; sharded checkpoints; bad checkpoints; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _interop_models import CASES, VOCAB, hf_dirs, make_hf_model, run_cli  # noqa: F401

from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.interop.hf import export_model


@pytest.mark.parametrize(
    "case", ["llama-bias", "llama-rope-llama3", "mistral-sliding", "qwen2-sliding", "qwen3", "gpt2"]
)
def test_export_hf_then_reimport_is_identical_and_transformers_agrees(case, hf_dirs, tmp_path):  # noqa: F811
    import transformers

    original = load_model(hf_dirs[case])
    out = export_model(hf_dirs[case], "hf", tmp_path / "exported")
    again = load_model(out)
    assert again.config == original.config
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = original(idx)
        assert torch.equal(again(idx), ours)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(idx).logits
    assert type(theirs) is torch.Tensor and (theirs - ours).abs().max().item() < 1e-4


def test_sharded_save_and_load(tmp_path):
    model = load_model_from_case("qwen3", tmp_path)
    save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    loaded = load_model(tmp_path / "sharded")
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))

    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(UserError, match=f"names shard file.*{shards[1]}"):
        load_model(tmp_path / "sharded")


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path / "m", max_shard_size="60KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (load_model(tmp_path / "m")(idx) - hf(idx).logits).abs().max().item() < 1e-4


def load_model_from_case(case, tmp_path):
    model_type, overrides = CASES[case]
    make_hf_model(model_type, **overrides).save_pretrained(tmp_path / case)
    return load_model(tmp_path / case)


def test_bad_checkpoints_are_named(tmp_path):
    model = load_model_from_case("llama", tmp_path)
    directory = tmp_path / "llama"
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int32)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(UserError, match="model.norm.weight|norm.weight has dtype torch.int32"):
        load_model(directory)

    config = json.loads((directory / "config.json").read_text())
    for change, message in (
        ({"model_type": "falcon"}, "model_type 'falcon' is not supported"),
        ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast' is not supported"),
        ({"rope_parameters": {"rope_type": "proportional", "factor": 2.0}}, "rope scaling type 'proportional'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantized checkpoints \\(awq\\)"),
    ):
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            load_model(directory)
    del model


def test_qwen2_mixed_sliding_layers_are_refused(tmp_path):
    hf = make_hf_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    hf.save_pretrained(tmp_path / "q")
    with pytest.raises(UserError, match="mix of full and sliding-window layers"):
        load_model(tmp_path / "q")


def test_cli_export(tiny_model_dir, tmp_path):
    result = run_cli("export", tiny_model_dir, "--format", "gguf", "--out", tmp_path / "m.gguf", "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (tmp_path / "m.gguf").stat().st_size > 0
    result = run_cli("export", tiny_model_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    result = run_cli("export", tiny_model_dir, "--format", "gguf", "--out", tmp_path / "x.gguf", "--dtype", "q2_k")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: GGUF dtype 'q2_k' is not supported" in result.stderr
    with pytest.raises(UserError, match="export format 'onnx' is not supported"):
        export_model(tiny_model_dir, "onnx", tmp_path / "x")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "falcon", "vocab_size": 10}))
    with pytest.raises(UserError, match="model_type 'falcon' is not supported"):
        export_model(tmp_path / "bad", "hf", tmp_path / "y")
