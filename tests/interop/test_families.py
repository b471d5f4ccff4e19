"""The family specs: in step with the typed config, each one round-trips its config.json and weight names,
names only GGUF tensors the `gguf` package knows, and lists every linear layer of its blocks."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import torch
from torch import nn

from slmkit.config import Family, preset
from slmkit.errors import UserError
from slmkit.interop.families import FAMILIES, check_family, family_spec
from slmkit.interop.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict
from slmkit.models import build_model

# a config of each family with the switches that family needs
CONFIGS = {
    "llama": dict(qkv_bias=True, out_bias=True, mlp_bias=True),
    "mistral": dict(family="mistral", sliding_window=8),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=24),
    # fused qkv_proj and gate_up_proj, partial rotary, a sliding window, longrope
    "phi3": dict(family="phi3", rope_fraction=0.5, sliding_window=8, rope_scaling=dict(
        type="longrope", factor=4.0, original_max_seq_len=16, short_factor=[1.0] * 4, long_factor=[1.0, 2.0, 3.0, 4.0],
    )),
    "gpt2": dict(
        family="gpt2", n_kv_heads=4, norm="layernorm", mlp="plain", positions="learned", activation="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True,
    ),
    # config.json states only the mamba2 fields: the attention ones are what its reader sets
    "mamba": dict(family="mamba", mixer="mamba", mlp="none", n_heads=1, n_kv_heads=1, d_ff=64, ssm_state_size=8),
    "mamba2": dict(family="mamba2", mixer="mamba2", mlp="none", n_heads=1, n_kv_heads=1, d_ff=64, ssm_head_dim=16),
    # Mamba-2 and attention layers, a gated MLP in each, rotary on half of each head
    "bamba": dict(
        family="bamba", n_layers=3, layer_pattern=("mamba2", "attention", "mamba2"), rope_fraction=0.5,
        qkv_bias=True, out_bias=True, ssm_head_dim=16,
    ),
    # Mamba-1 (dt/B/C norms) and attention without positions, dense and expert MLPs, each by period and offset
    "jamba": dict(
        family="jamba", n_layers=4, layer_pattern=("mamba", "attention") * 2, mlp_pattern=("gated", "moe") * 2,
        moe_experts=3, moe_norm_topk=False, positions="none", ssm_dt_b_c_norm=True, ssm_state_size=8,
    ),
    "mixtral": dict(family="mixtral", mlp="moe", moe_experts=3, moe_top_k=2),
    "qwen2_moe": dict(family="qwen2_moe", mlp="moe", moe_experts=3, qkv_bias=True, moe_shared_d_ff=32,
                      moe_shared_gate=True, moe_norm_topk=False),
    "olmoe": dict(family="olmoe", mlp="moe", moe_experts=3, qk_norm=True, qk_norm_over="projection"),
    # slmkit's own format holds any mixers: one layer of each
    "slmkit": dict(family="slmkit", n_layers=5, layer_pattern=("attention", "mamba2", "gla", "based", "mamba")),
}  # fmt: skip


def make(family: str):
    config = check_family(preset("tiny", vocab_size=300, max_seq_len=64, **CONFIGS[family]))
    model = build_model(config)
    model.init_weights(0)
    return model


def test_specs_and_the_typed_family_field_name_the_same_families():
    assert set(FAMILIES) == set(get_args(Family)) == set(CONFIGS)
    assert all(spec.name == name for name, spec in FAMILIES.items())
    with pytest.raises(UserError, match="family 'falcon' is not supported"):
        family_spec("falcon")


def test_specs_are_frozen():
    spec = FAMILIES["llama"]
    with pytest.raises(AttributeError):
        spec.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.allowed["qk_norm"] = (True,)  # type: ignore[index]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_config_json_round_trip(family):
    config = make(family).config
    d = config_to_hf(config)
    assert d["model_type"] == family and d["architectures"] == [FAMILIES[family].architecture]
    assert config_from_hf(d) == config


@pytest.mark.parametrize("family", list(CONFIGS))
def test_weight_names_round_trip_and_the_family_is_told_by_them(family):
    model = make(family)
    state = model.state_dict()
    hf = to_hf_state_dict(state, model.config)
    assert "lm_head.weight" not in hf  # tied: transformers drops it too
    back = from_hf_state_dict(hf)  # no config: told by the names (GPT-2's fused c_attn, else Llama's)
    expected = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())


# families with a llama.cpp architecture (GGUF export of the others is refused: tests/interop/test_mamba2_hf.py)
@pytest.mark.parametrize("family", [f for f in CONFIGS if FAMILIES[f].gguf is not None])
def test_gguf_names_exist_in_the_gguf_package_and_cover_the_blocks(family):
    import gguf

    layout = FAMILIES[family].gguf
    names = set(make(family).layers[0].state_dict())
    bare = names & set(layout.parameters)  # an SSM's A and D: named without a suffix
    # a mixture of experts' experts are stacked into one tensor per projection (mlp.experts.{proj})
    block = {re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.", name.rpartition(".")[0]) for name in names - bare}
    fused_parts = {part for parts in layout.fused.values() for part in parts}
    written = (block - fused_parts) | set(layout.fused)
    assert written <= set(layout.tensors)  # every tensor of a block gets a llama.cpp name
    assert set(layout.convert) <= names and bare == set(layout.parameters)
    # ... that llama.cpp's architecture for the family loads
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == layout.arch)  # granitehybrid: GRANITE_HYBRID
    known = set(gguf.MODEL_TENSORS[arch])
    members = [layout.tensors[module] for module in written]
    members += [layout.parameters[name].partition(".")[0] for name in bare]  # "SSM_DT.bias": a member, a suffix
    assert {gguf.MODEL_TENSOR[m] for m in members} <= known
    assert {gguf.MODEL_TENSOR[m] for m in layout.keep_f32} <= known


@pytest.mark.parametrize("family", list(CONFIGS))
def test_compressible_linears_are_every_linear_of_a_block(family):
    model = make(family)
    spec = FAMILIES[family]
    linears = sorted(f"layers.{name}" for name, m in model.layers.named_modules() if isinstance(m, nn.Linear))
    # a router and the shared expert's one-output gate stay in float
    linears = [n for n in linears if not n.endswith((".mlp.gate", ".mlp.shared_expert_gate"))]
    assert sorted(spec.block_linears(model.config)) == linears  # each layer's own (a hybrid's differ)
    # one name per module kind in a block (a mixture of experts: mlp.experts.{e}.up_proj is mlp.up_proj)
    kinds = {re.sub(r"mlp\.(experts\.\d+|shared_expert)\.", "mlp.", name.split(".", 2)[2]) for name in linears}
    assert set(spec.compressible) == kinds
    assert any(n.endswith("mlp.gate_proj") for n in kinds) == (family not in ("gpt2", "mamba", "mamba2"))
    applied = set()
    for block in model.layers:
        modules = dict(block.named_modules())
        for fold in spec.scale_folds:
            if set(fold.consumers) <= set(modules):  # a fold applies where a block has its consumers
                assert fold.producer in modules  # (that it is exact: tests/compress/test_family_matrix.py)
                applied.add(fold)
    assert applied == set(spec.scale_folds)  # each fold applies somewhere


def test_a_family_refuses_layers_its_transformers_class_lacks():
    from slmkit.config import preset
    from slmkit.errors import UserError
    from slmkit.interop.families import check_family

    config = preset("tiny", layer_pattern=("attention", "mamba"))
    with pytest.raises(UserError, match="family 'llama' has only attention layers, not mamba"):
        check_family(config)
    check_family(preset("tiny", layer_pattern=("attention", "attention")))
