"""Qwen2-MoE (shared expert behind a sigmoid gate) and OLMoE (q/k RMSNorm over the whole projection) both ways
with transformers' own classes: forward logits within 1e-4 and equal greedy tokens, on routers whose top-k
choices have a clear margin (test_moe_hf.decisive_tokens), so round-off cannot flip them."""

from __future__ import annotations

import json

import pytest
import torch
from test_moe_hf import decisive_tokens, greedy, random_moe

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.interop.families import check_family

transformers = pytest.importorskip("transformers")

QWEN2_MOE = dict(qkv_bias=True, moe_shared_d_ff=16, moe_shared_gate=True, moe_norm_topk=False)
OLMOE = dict(qk_norm=True, qk_norm_over="projection", moe_norm_topk=False)
CLASSES = {"qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}


def assert_same_model(ours, theirs, vocab: int) -> None:
    idx = decisive_tokens(ours, vocab, (2, 19))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        assert greedy(ours, prompt, 10) == greedy(lambda t: theirs(input_ids=t).logits, prompt, 10)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("qwen2_moe", QWEN2_MOE),
        ("qwen2_moe", QWEN2_MOE | {"moe_norm_topk": True, "moe_top_k": 1, "moe_experts": 5}),
        ("olmoe", OLMOE),
        ("olmoe", OLMOE | {"moe_norm_topk": True, "n_kv_heads": 4}),
    ],
)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, family, overrides):
    ours = random_moe(family, **overrides)
    assert ours.config.num_params() == sum(p.numel() for p in ours.parameters())  # OLMoE's wider q/k norms too
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [CLASSES[family]]
    assert config["num_experts"] == ours.config.moe_experts
    assert config["norm_topk_prob"] == ours.config.moe_norm_topk
    theirs = getattr(transformers, CLASSES[family]).from_pretrained(tmp_path / "m").eval()
    assert_same_model(ours, theirs, 97)


def _their_qwen2_moe(**keys):
    return transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=40,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=6,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            **keys,
        )  # fmt: skip
    )


def _their_olmoe(**keys):
    return transformers.OlmoeForCausalLM(
        transformers.OlmoeConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            eos_token_id=0,
            pad_token_id=None,
            **keys,
        )  # fmt: skip
    )


@pytest.mark.parametrize(
    "build,norm_topk",
    [(_their_qwen2_moe, False), (_their_qwen2_moe, True), (_their_olmoe, False), (_their_olmoe, True)],
)
def test_a_transformers_model_loads_with_equal_logits_and_decodes_with_a_cache(tmp_path, build, norm_topk):
    torch.manual_seed(0)
    theirs = build(norm_topk_prob=norm_topk).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # random norms and biases too; a decisive router
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("mlp.gate.weight") else 0.1))
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    family = theirs.config.model_type
    assert ours.config.family == family and ours.config.mlp == "moe"
    assert (ours.config.moe_experts, ours.config.moe_norm_topk) == (theirs.config.num_experts, norm_topk)
    if family == "qwen2_moe":
        assert (ours.config.d_ff, ours.config.moe_shared_d_ff, ours.config.moe_shared_gate) == (16, 24, True)
    else:
        assert ours.config.qk_norm_over == "projection"
    assert_same_model(ours, theirs, 101)
    idx = decisive_tokens(ours, 101, (1, 23))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)


def test_the_fused_in_memory_state_dict_reads_too():
    from slmkit.interop.hf import from_hf_state_dict

    theirs = _their_qwen2_moe()
    ours = load_config_like(theirs)
    state = from_hf_state_dict(dict(theirs.state_dict()), ours)
    moe = theirs.model.layers[1].mlp
    assert torch.equal(state["layers.1.mlp.experts.5.gate_proj.weight"], moe.experts.gate_up_proj[5, :16])
    assert torch.equal(state["layers.1.mlp.experts.5.up_proj.weight"], moe.experts.gate_up_proj[5, 16:])
    assert torch.equal(state["layers.1.mlp.experts.3.down_proj.weight"], moe.experts.down_proj[3])
    assert torch.equal(state["layers.1.mlp.shared_expert_gate.weight"], moe.shared_expert_gate.weight)
    assert torch.equal(state["layers.1.mlp.shared_expert.up_proj.weight"], moe.shared_expert.up_proj.weight)


def load_config_like(theirs) -> ModelConfig:
    from slmkit.interop.hf import config_from_hf

    return config_from_hf(theirs.config.to_dict())


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers"),
        ({"qkv_bias": False}, "qkv_bias"),
        ({"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2}, "sliding_window"),
    ],
)
def test_a_qwen2_moe_config_we_cannot_express_is_refused_by_name(keys, message):
    from slmkit.interop.hf import config_from_hf

    d = _their_qwen2_moe().config.to_dict() | keys
    with pytest.raises(UserError, match=message):
        config_from_hf(d)


def test_an_olmoe_config_with_clip_qkv_is_refused():
    from slmkit.interop.hf import config_from_hf

    with pytest.raises(UserError, match="clip_qkv"):
        config_from_hf(_their_olmoe().config.to_dict() | {"clip_qkv": 8.0})


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("qwen2_moe", QWEN2_MOE | {"moe_shared_gate": False}, "moe_shared_gate"),
        ("qwen2_moe", {"qkv_bias": True}, "moe_shared_gate"),  # no shared expert at all
        ("qwen2_moe", QWEN2_MOE | {"qkv_bias": False}, "qkv_bias"),
        ("olmoe", {"qk_norm": True}, "qk_norm_over"),  # Qwen3's per-head norm
        ("olmoe", {"qk_norm": False}, "qk_norm"),
        ("olmoe", OLMOE | {"moe_shared_d_ff": 16}, "moe_shared_d_ff"),
        ("qwen3", {"mlp": "gated", "qk_norm": True, "qk_norm_over": "projection"}, "qk_norm_over"),
    ],
)
def test_what_a_family_cannot_express_is_refused_by_name(family, overrides, message):
    fields = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=24, mlp="moe", family="slmkit")
    config = ModelConfig(**{**fields, **overrides})
    with pytest.raises(UserError, match=message):
        check_family(config.replace(family=family))
