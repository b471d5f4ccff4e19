"""Adapters as PEFT files (slmkit.interop.adapters): peft loads ours on the transformers copy of the base with the
same logits, slmkit loads peft's own `save_pretrained` output, NOLA round trips, bad files are refused, and
`slm merge-adapter` writes a model transformers loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.interop.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NOLA_WEIGHTS, load_adapter, save_adapter
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit.models.lora import (
    LoRASpec,
    adapter_names,
    adapter_state_dict,
    add_adapters,
    is_adapter_param,
    merge_adapters,
)
from slmkit_testing import run_slm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96
FIELDS = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> torch.nn.Module:
    model = build_model(ModelConfig(**(FIELDS | overrides)))
    model.init_weights(seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_model(tiny(), tmp_path_factory.mktemp("adapters") / "base")


def tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def adapted(base_dir: Path, spec: LoRASpec, seed: int = 1) -> torch.nn.Module:
    model = load_model(base_dir)
    add_adapters(model, spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if is_adapter_param(key):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=idx).logits


SPECS = {
    "lora-qv": LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
    "rslora-all-linear": LoRASpec(r=4, alpha=8, use_rslora=True, target_modules="all-linear"),
    "one-layer": LoRASpec(r=2, alpha=2, target_modules=("layers.1.mlp.down_proj",)),
    "nola": LoRASpec(r=4, alpha=8, kind="nola", nola_bases=5, target_modules=("q_proj", "o_proj", "up_proj")),
}


@pytest.mark.parametrize("case", list(SPECS))
def test_peft_loads_our_adapter_with_the_same_logits(base_dir, tmp_path, case):
    model = adapted(base_dir, SPECS[case])
    out = save_adapter(model, tmp_path / "adapter", base_dir)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["base_model_name_or_path"] == str(base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    wrapped = peft.PeftModel.from_pretrained(hf, out).eval()
    idx = tokens()
    with torch.no_grad():
        ours = model(idx)
    torch.testing.assert_close(hf_logits(wrapped, idx), ours, rtol=0, atol=1e-5)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    assert not torch.allclose(hf_logits(base, idx), ours, atol=1e-3)  # the adapter matters
    # the same layers, no more: peft's target_modules picks exactly ours
    peft_layers = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    theirs = {"model." + n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert peft_layers == theirs


def test_we_load_what_peft_saves(base_dir, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False
    )
    wrapped = peft.get_peft_model(hf, config).eval()
    wrapped.save_pretrained(tmp_path / "theirs")
    model = load_model(base_dir)
    layers = load_adapter(model, tmp_path / "theirs", name="theirs")
    assert layers == [
        f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
    ]
    assert adapter_names(model) == ["theirs"]
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_logits(wrapped, idx), rtol=0, atol=1e-5)
        assert not torch.allclose(model(idx), load_model(base_dir)(idx), atol=1e-3)  # peft's random B: a real update
    assert not any(p.requires_grad for k, p in model.named_parameters() if is_adapter_param(k))  # serving default


def test_round_trip_and_nola_continues_from_its_coefficients(base_dir, tmp_path):
    for name, spec in (("lora", SPECS["lora-qv"]), ("nola", SPECS["nola"])):
        model = adapted(base_dir, spec)
        save_adapter(model, tmp_path / name, base_dir)
        again = load_model(base_dir)
        load_adapter(again, tmp_path / name, trainable=True)
        saved, loaded = adapter_state_dict(model), adapter_state_dict(again)
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved)
        if name == "nola":  # the coefficients came back (not plain LoRA factors): training goes on in NOLA's space
            assert all(k.endswith(".coefficients") for k in loaded)
            assert (tmp_path / name / NOLA_WEIGHTS).is_file()
        idx = tokens()
        with torch.no_grad():
            assert torch.equal(again(idx), model(idx))
        trainable = {k for k, p in again.named_parameters() if p.requires_grad}
        assert trainable == set(loaded)


def test_save_copies_the_base_tokenizer(base_dir, tmp_path):
    with_tokenizer = tmp_path / "base"
    shutil.copytree(base_dir, with_tokenizer)
    (with_tokenizer / "tokenizer.json").write_text('{"model": "stand-in"}')
    out = save_adapter(adapted(with_tokenizer, SPECS["lora-qv"]), tmp_path / "adapter")  # base: the source dir
    assert (out / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(with_tokenizer)


def test_save_refuses_an_existing_directory_unless_told(base_dir, tmp_path):
    model = adapted(base_dir, SPECS["lora-qv"])
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        save_adapter(model, out, base_dir)
    assert (out / "notes.txt").read_text() == "mine"
    save_adapter(model, out, base_dir, overwrite=True)
    assert (out / ADAPTER_WEIGHTS).is_file() and not (out / "notes.txt").exists()


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory) -> Path:
    return save_adapter(adapted(base_dir, SPECS["lora-qv"]), tmp_path_factory.mktemp("good") / "adapter", base_dir)


def broken(good: Path, tmp_path: Path, edit) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(good, target)
    edit(target)
    return target


def _set_config(**changes):
    def edit(directory: Path) -> None:
        d = json.loads((directory / ADAPTER_CONFIG).read_text())
        (directory / ADAPTER_CONFIG).write_text(json.dumps(d | changes))

    return edit


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: (d / ADAPTER_CONFIG).unlink(), "not an adapter directory"),
        (lambda d: (d / ADAPTER_CONFIG).write_text("{not json"), "not valid JSON"),
        (_set_config(peft_type="IA3"), "peft_type 'IA3' is not supported"),
        (_set_config(use_dora=True), "DoRA"),
        (_set_config(bias="all"), "bias 'all'"),
        (_set_config(r=0), "r must be a positive number"),
        (lambda d: (d / ADAPTER_WEIGHTS).unlink(), "weights file not found"),
        (lambda d: (d / ADAPTER_WEIGHTS).write_bytes((d / ADAPTER_WEIGHTS).read_bytes()[:50]), "corrupt"),
    ],
)
def test_bad_adapter_files_are_refused(base_dir, good_adapter, tmp_path, edit, needle):
    model = load_model(base_dir)
    with pytest.raises(UserError, match=needle):
        load_adapter(model, broken(good_adapter, tmp_path, edit))
    assert adapter_names(model) == []


def test_an_adapter_for_another_base_is_refused(base_dir, good_adapter, tmp_path):
    wider = tiny(d_model=48, n_heads=4, n_kv_heads=2)
    with pytest.raises(UserError, match="trained for another base"):
        load_adapter(wider, good_adapter)
    assert adapter_names(wider) == []
    deeper_dir = save_model(tiny(n_layers=3), tmp_path / "deeper")
    deep = adapted(deeper_dir, LoRASpec(target_modules=("layers.2.self_attn.q_proj",)))
    save_adapter(deep, tmp_path / "deep-adapter", deeper_dir)
    with pytest.raises(UserError, match="layers.2.self_attn.q_proj, which this model lacks"):
        load_adapter(load_model(base_dir), tmp_path / "deep-adapter")
    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(load_model(base_dir), tmp_path / "missing")


# ---- merging --------------------------------------------------------------------------------------------
def test_merge_adapter_cli_writes_a_model_transformers_loads(base_dir, good_adapter, tmp_path):
    model = load_model(base_dir)
    load_adapter(model, good_adapter)
    idx = tokens()
    with torch.no_grad():
        expected = model(idx)
    out = tmp_path / "merged"
    result = run_slm("merge-adapter", base_dir, good_adapter, "--out", out)
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf_logits(hf, idx), expected, rtol=0, atol=1e-5)
    # an existing --out: one error line, exit 2, nothing replaced
    again = run_slm("merge-adapter", base_dir, good_adapter, "--out", out)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert again.stderr.startswith("error:") and "already exists" in again.stderr
    # an adapter for another base
    wider = save_model(tiny(d_model=48), tmp_path / "wider")
    bad = run_slm("merge-adapter", wider, good_adapter, "--out", tmp_path / "merged2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith("error:") and "another base" in bad.stderr
    assert not (tmp_path / "merged2").exists()


def test_merge_adapter_over_a_compressed_base_dequantizes(base_dir, good_adapter, tmp_path):
    from slmkit.api import merge_adapter
    from slmkit.compress.pipeline import CompressOptions, compress

    compress(base_dir, "int4", tmp_path / "int4", options=CompressOptions(group_size=32), measure=False)
    model = load_model(tmp_path / "int4")
    load_adapter(model, good_adapter)
    with pytest.raises(UserError, match="compressed layer"):
        merge_adapters(model)
    idx = tokens()
    from slmkit.models.quantized import dequantized_matmuls

    with torch.no_grad(), dequantized_matmuls():  # the exact int4 matmul (the CPU kernel rounds inputs to bf16)
        expected = model(idx)
    result = merge_adapter(tmp_path / "int4", good_adapter, tmp_path / "merged")
    assert result.dequantized and result.layers == 4
    merged = load_model(tmp_path / "merged")
    assert "quantization_config" not in merged.config.extra
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), expected, rtol=0, atol=1e-4)


def test_other_families_use_their_own_names(tmp_path):
    # qwen2 (q/k/v biases): transformers' names, peft's logits
    qwen_dir = save_model(tiny(family="qwen2", qkv_bias=True), tmp_path / "qwen2")
    model = adapted(qwen_dir, LoRASpec(r=2, alpha=4, target_modules="all-linear"))
    out = save_adapter(model, tmp_path / "qwen2-adapter", qwen_dir)
    wrapped = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(qwen_dir), out).eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(wrapped, idx), model(idx), rtol=0, atol=1e-5)
    # gpt2 fuses q/k/v into one transposed Conv1D: no peft LoRA holds our q_proj factors, so saving is refused
    gpt2 = tiny(family="gpt2", norm="layernorm", positions="learned", mlp="plain", activation="gelu_tanh",
                qkv_bias=True, out_bias=True, mlp_bias=True, n_kv_heads=4)  # fmt: skip
    add_adapters(gpt2, LoRASpec(target_modules=("q_proj",)))
    with pytest.raises(UserError, match="gpt2"):
        save_adapter(gpt2, tmp_path / "gpt2-adapter")
    assert not (tmp_path / "gpt2-adapter").exists()


def test_mixture_of_experts_attention_adapters_and_expert_refusal(tmp_path):
    mixtral_dir = save_model(tiny(family="mixtral", mlp="moe", moe_experts=4, moe_top_k=2), tmp_path / "mixtral")
    model = adapted(mixtral_dir, LoRASpec(r=2, alpha=4, target_modules=("q_proj", "o_proj")))
    out = save_adapter(model, tmp_path / "attention-adapter", mixtral_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir)
    wrapped = peft.PeftModel.from_pretrained(hf, out).eval()
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(wrapped, idx), model(idx), rtol=0, atol=1e-5)
    experts = adapted(mixtral_dir, LoRASpec(target_modules="all-linear"))
    with pytest.raises(UserError, match="mixture-of-experts layer"):
        save_adapter(experts, tmp_path / "expert-adapter", mixtral_dir)
