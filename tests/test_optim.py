"""Optimizers and recipe switches: Muon's parameter groups, its training and exact resume; each switch's effect."""

import json
import shutil

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.train.config import TrainConfig
from slmkit.train.loop import train
from slmkit.train.optim import MuonWithAdamW, make_optimizer, muon_param_names, seq_len_at
from slmkit_testing import tiny_train_config as cfg


def test_muon_takes_hidden_matrices_only():
    model = build_model(preset("tiny", tie_embeddings=False, qkv_bias=True))
    names = muon_param_names(model)
    expected = [
        f"layers.{i}.{part}"
        for i in range(2)
        for part in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )
    ]
    assert sorted(names) == sorted(expected)
    opt = make_optimizer(model, cfg(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    muon, adamw = opt.optimizers
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_id[id(p)] for g in muon.param_groups for p in g["params"]) == sorted(expected)
    rest = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.self_attn.q_proj.bias"} <= rest
    assert not rest & set(expected)
    assert len(rest) + len(expected) == len(list(model.parameters()))


def test_muon_groups_of_other_layers():
    # experts' projections are linear layers (Muon); a mamba layer's A_log and conv stay with AdamW; tied head too
    moe = muon_param_names(build_model(preset("micro-moe", n_layers=1)))
    assert "layers.0.mlp.experts.3.down_proj.weight" in moe and "layers.0.mlp.gate.weight" in moe
    mamba = muon_param_names(build_model(preset("micro-mamba", n_layers=1)))
    assert "layers.0.mixer.in_proj.weight" in mamba
    assert not {"layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight", "embed_tokens.weight"} & set(mamba)


def test_muon_lowers_the_loss(data_dir, tmp_path):
    result = train(cfg(max_steps=30, lr=5e-3, optimizer="muon"), data_dir, tmp_path / "run")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5


def test_muon_resume_equals_uninterrupted(data_dir, tmp_path):
    full = train(cfg(max_steps=8, optimizer="muon"), data_dir, tmp_path / "full")
    part = train(cfg(max_steps=8, optimizer="muon", save_interval=4), data_dir, tmp_path / "part")
    assert part.losses == full.losses
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[4:]  # bitwise: momentum buffers and Adam moments restored by name
    a = torch.load(tmp_path / "full" / "final" / "trainer_state.pt", weights_only=False)["optimizer"]
    b = torch.load(tmp_path / "part" / "final" / "trainer_state.pt", weights_only=False)["optimizer"]
    name = "layers.0.self_attn.q_proj.weight"
    assert "momentum_buffer" in a["state"][name]
    assert torch.equal(a["state"][name]["momentum_buffer"], b["state"][name]["momentum_buffer"])


def test_muon_lr_scale_follows_the_schedule(data_dir, tmp_path):
    # the loop sets every group's lr from the schedule each step; Muon's keeps its ratio
    c = cfg(max_steps=3, optimizer="muon", muon_lr_scale=0.5, warmup_steps=0, min_lr_ratio=0.5)
    train(c, data_dir, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "final" / "trainer_state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x][-1]
    assert last["lr"] < c.lr  # the schedule moved
    assert [g["lr"] for g in groups] == [0.5 * last["lr"], last["lr"]]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_embed_lr_scale_gives_tables_and_head_their_own_rate(data_dir, tmp_path, optimizer):
    model = build_model(preset("tiny", tie_embeddings=False))
    opt = make_optimizer(model, cfg(optimizer=optimizer, embed_lr_scale=4.0), torch.device("cpu"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    scaled = [g for g in opt.param_groups if g.get("lr_scale") == 4.0]
    assert len(scaled) == 1 and scaled[0]["weight_decay"] == 0.0
    assert sorted(by_id[id(p)] for p in scaled[0]["params"]) == ["embed_tokens.weight", "lm_head.weight"]
    others = {by_id[id(p)] for g in opt.param_groups if g is not scaled[0] for p in g["params"]}
    assert not others & {"embed_tokens.weight", "lm_head.weight"}
    assert len(others) + 2 == len(list(model.parameters()))
    # at 1.0 the groups are those of runs without the knob (their checkpoints resume)
    plain = make_optimizer(model, cfg(optimizer=optimizer), torch.device("cpu"))
    tables = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    assert all(any(id(p) not in tables for p in g["params"]) for g in plain.param_groups)  # no group of their own
    # the schedule keeps the ratio, and a resumed run equals the uninterrupted one
    c = cfg(max_steps=6, optimizer=optimizer, embed_lr_scale=4.0, warmup_steps=0, min_lr_ratio=0.5)
    full = train(c, data_dir, tmp_path / "full")
    state = torch.load(tmp_path / "full" / "final" / "trainer_state.pt", weights_only=False)
    last = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"lr"' in x][-1]
    lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]
    assert lrs[-1] == pytest.approx(4.0 * last["lr"]) and last["lr"] in lrs
    part = train(dataclass_replace(c, save_interval=3), data_dir, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "part", resume=True)
    assert part.losses == full.losses and resumed.losses == full.losses[3:]
    other = train(dataclass_replace(c, embed_lr_scale=1.0), data_dir, tmp_path / "other")
    assert other.losses[-1] != full.losses[-1]  # the knob changes training


def test_bad_recipe_values():
    with pytest.raises(UserError, match="optimizer must be auto, adamw or muon"):
        cfg(optimizer="sgd")
    with pytest.raises(UserError, match="muon does not work under strategy fsdp"):
        cfg(optimizer="muon", strategy="fsdp")
    with pytest.raises(UserError, match="muon_momentum"):
        cfg(muon_momentum=1.0)
    with pytest.raises(UserError, match="embed_lr_scale"):
        cfg(embed_lr_scale=0.0)
    with pytest.raises(UserError, match="seq_len_warmup_start"):
        cfg(seq_len_warmup_steps=10, seq_len_warmup_start=64)  # seq_len is 32


def test_seq_len_warmup(data_dir, tmp_path):
    c = cfg(seq_len=64, model={"max_seq_len": 64}, seq_len_warmup_steps=4, seq_len_warmup_start=16)
    assert [seq_len_at(c, s) for s in range(6)] == [16, 16, 32, 48, 64, 64]
    result = train(dataclass_replace(c, max_steps=6), data_dir, tmp_path / "run")
    assert result.tokens == 4 * (16 + 16 + 32 + 48 + 64 + 64)  # batch 4: the tokens actually trained on


def dataclass_replace(c, **changes):
    import dataclasses

    return dataclasses.replace(c, **changes)


# ---- recipe switches on the model ----------------------------------------------------------------------


def tiny(**changes):
    model = build_model(preset("tiny", vocab_size=300, max_seq_len=64, **changes))
    model.init_weights(seed=0)
    return model.eval()


def test_relu2_is_squared_relu_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny(activation="relu2")
    x = torch.randn(3, 64)
    mlp = model.layers[0].mlp
    expected = mlp.down_proj(torch.relu(mlp.gate_proj(x)) ** 2 * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)
    # a Llama config.json can say hidden_act relu2: transformers' LlamaForCausalLM computes the same logits
    from slmkit.interop.checkpoint import save_model

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert theirs.config.hidden_act == "relu2"
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx), atol=1e-4, rtol=1e-4)


def test_relu2_is_refused_by_gguf_export():
    pytest.importorskip("gguf")
    from slmkit.interop.gguf import check_exportable

    with pytest.raises(UserError, match="llama architecture needs a silu MLP without biases, not relu2"):
        check_exportable(preset("tiny", activation="relu2"))


def test_zero_init_proj_starts_projections_at_zero():
    plain, zeroed = tiny(), tiny(zero_init_proj=True)
    for name, p in zeroed.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert not p.any(), name
        else:  # every other weight as without the switch
            assert torch.equal(p, dict(plain.named_parameters())[name]), name
    idx = torch.randint(0, 300, (2, 8))
    with torch.no_grad():  # each block starts as the identity: logits are those of the embeddings alone
        torch.testing.assert_close(zeroed(idx), zeroed.lm_head(zeroed.norm(zeroed.embed_tokens(idx))))


def test_logit_softcap_bounds_logits():
    plain, capped = tiny(family="slmkit"), tiny(family="slmkit", logit_softcap=2.0)
    with torch.no_grad():
        capped.lm_head.weight.mul_(50)  # logits far beyond the cap
        plain.lm_head.weight.mul_(50)
    idx = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        raw, out = plain(idx), capped(idx)
    assert raw.abs().max() > 10 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))
    with pytest.raises(UserError, match="logit_softcap must be a positive number"):
        preset("tiny", logit_softcap=0.0)


def test_slmkit_only_switches_are_refused_for_hf_families(tmp_path, data_dir):
    from slmkit.interop.checkpoint import save_model
    from slmkit.interop.hf import export_model

    with pytest.raises(UserError, match="family 'llama' cannot express logit_softcap=30.0 .*set family: slmkit"):
        TrainConfig(preset="tiny", model={"logit_softcap": 30.0}, max_steps=1)
    llama = build_model(preset("tiny", vocab_size=300))
    llama.config.logit_softcap = 30.0  # built in Python past the config's checks: refused on save, nothing written
    with pytest.raises(UserError, match="cannot express logit_softcap"):
        save_model(llama, tmp_path / "llama")
    assert not (tmp_path / "llama").exists()
    # in slmkit's own format it trains and saves; Hugging Face export refuses it clearly
    result = train(cfg(max_steps=2, model={"max_seq_len": 64, "family": "slmkit", "logit_softcap": 30.0}), data_dir,
                   tmp_path / "run")  # fmt: skip
    with pytest.raises(UserError, match="slmkit-only switches such as logit_softcap"):
        export_model(result.final_dir, "hf", tmp_path / "hf")
    from slmkit.interop.checkpoint import load_model

    assert load_model(result.final_dir).config.logit_softcap == 30.0


# ---- MFU's denominator ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, label, flops",
    [
        ("NVIDIA H200", "H200 SXM", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5e12),
        ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
        ("NVIDIA L40S", "L40S", 362.05e12),
        ("NVIDIA L4", "L4", 121e12),
    ],
)
def test_gpu_peak_from_the_table(monkeypatch, name, label, flops):
    from slmkit.train.loop import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == flops and source.startswith(f"{label} bfloat16 peak")


def test_cpu_peak_is_measured_and_named_in_the_start_line(data_dir, tmp_path, caplog):
    import logging

    from slmkit.train.loop import peak_flops

    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert peak > 0 and source.startswith("measured matmul peak")
    with caplog.at_level(logging.INFO, logger="slmkit"):
        train(cfg(max_steps=1, optimizer="muon"), data_dir, tmp_path / "run")
    assert any("muon; MFU against measured matmul peak" in r.getMessage() for r in caplog.records)


def test_auto_is_muon_where_muon_can_run():
    from slmkit.train.optim import resolve_optimizer

    model = build_model(preset("tiny", vocab_size=300))
    assert TrainConfig(preset="tiny", max_steps=1).optimizer == "auto"  # the default
    assert resolve_optimizer(model, TrainConfig(preset="tiny", max_steps=1)) == "muon"
    assert isinstance(
        make_optimizer(model, TrainConfig(preset="tiny", max_steps=1), torch.device("cpu")), MuonWithAdamW
    )
    assert resolve_optimizer(model, TrainConfig(preset="tiny", max_steps=1, optimizer="adamw")) == "adamw"
    for name, p in model.named_parameters():  # only embeddings and norms train: no hidden matrix for Muon
        p.requires_grad_(p.dim() == 1 or "embed" in name)
    assert resolve_optimizer(model, TrainConfig(preset="tiny", max_steps=1)) == "adamw"
    with pytest.raises(UserError, match="hold no hidden matrices"):
        make_optimizer(model, TrainConfig(preset="tiny", max_steps=1, optimizer="muon"), torch.device("cpu"))


def test_bf16_flags_from_cpuinfo():
    from slmkit.train.loop import has_bf16_flags

    assert has_bf16_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert has_bf16_flags("flags : fpu amx_bf16 amx_tile\n")
    assert not has_bf16_flags("flags : fpu avx2 avx512f avx512bw avx512_vnni\n")  # bf16 only emulated there
    assert not has_bf16_flags("Features\t: fp asimd bf16\n")  # no x86 flags line: not claimed


def test_auto_dtype_is_bf16_on_native_bf16_cpus_for_wide_models(monkeypatch):
    from slmkit.train import loop

    cpu, auto = torch.device("cpu"), TrainConfig(preset="tiny", max_steps=1)
    wide = loop.CPU_BF16_MIN_WIDTH
    monkeypatch.setattr(loop, "cpu_native_bf16", lambda: True)
    assert loop.autocast_dtype(auto, cpu, wide) is torch.bfloat16
    assert loop.autocast_dtype(auto, cpu, wide - 1) is None  # too narrow to pay
    assert loop.autocast_dtype(auto, cpu) is None  # width unknown
    assert loop.autocast_dtype(dataclass_replace(auto, dtype="float32"), cpu, 4 * wide) is None  # asked for
    monkeypatch.setattr(loop, "cpu_native_bf16", lambda: False)
    assert loop.autocast_dtype(auto, cpu, 4 * wide) is None  # emulated bf16 is slower than fp32
    assert loop.autocast_dtype(dataclass_replace(auto, dtype="bfloat16"), cpu, 32) is torch.bfloat16


def test_auto_trains_wide_models_in_bf16_on_native_cpus(monkeypatch, data_dir, tmp_path):
    """dtype auto on a CPU with native bf16 (patched in, so this runs anywhere): a model of the threshold's width
    trains under bf16 autocast, says so in its start line, and learns as the fp32 run does."""
    from slmkit.train import loop

    class Starts(loop.LogReporter):
        infos: list = []

        def start(self, info):
            self.infos.append(info)
            super().start(info)

    monkeypatch.setattr(loop, "cpu_native_bf16", lambda: True)
    model = {"max_seq_len": 64, "d_model": loop.CPU_BF16_MIN_WIDTH, "n_heads": 4, "n_kv_heads": 2, "d_ff": 256}
    runs = {}
    for dtype in ("auto", "float32"):
        runs[dtype] = train(cfg(max_steps=12, model=model, dtype=dtype), data_dir, tmp_path / dtype, reporter=Starts())
    assert [i["dtype"] for i in Starts.infos] == ["bfloat16", "float32"]
    bf16, fp32 = runs["auto"].losses, runs["float32"].losses
    assert bf16 != fp32  # another dtype ran
    assert bf16[-1] < bf16[0] - 0.3  # learns
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) < 0.02  # as fp32 does, step by step
