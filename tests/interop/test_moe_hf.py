"""Mixture-of-experts families both ways with transformers' own classes: logits of forward calls within 1e-4 and
equal greedy tokens, with routers whose top-k choices have a clear margin (so round-off cannot flip them)."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model
from slmkit_testing import greedy_logits as greedy

transformers = pytest.importorskip("transformers")


def router_margin(model, idx: torch.Tensor) -> float:
    """The smallest gap, over tokens and layers, between the k-th and (k+1)-th router logit."""
    gaps = []

    def hook(module, args, _out):
        logits = module.gate(args[0].reshape(-1, args[0].shape[-1])).float()
        top = logits.topk(min(module.top_k + 1, module.n_experts), dim=-1).values
        if top.shape[-1] > module.top_k:
            gaps.append((top[:, module.top_k - 1] - top[:, module.top_k]).min().item())

    handles = [block.mlp.register_forward_hook(hook) for block in model.layers]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    return min(gaps) if gaps else 1.0


def decisive_tokens(model, vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    """Token ids (the first of a fixed series of draws) on which every router's top-k has a 1e-3 logit margin."""
    for seed in range(200):
        idx = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
        if router_margin(model, idx) > 1e-3:
            return idx
    raise AssertionError("no draw with decisive routing: make the router weights larger")


def random_moe(family: str = "mixtral", **overrides):
    fields = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=64, mlp="moe",
        moe_experts=4, moe_top_k=2, family=family, tie_embeddings=False,
    )  # fmt: skip
    model = build_model(ModelConfig(**{**fields, **overrides})).eval()
    model.init_weights(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith("mlp.gate.weight") else 0.2))
    return model


@pytest.mark.parametrize("overrides", [{}, {"moe_top_k": 1, "moe_experts": 3}, {"sliding_window": 8}])
def test_mixtral_export_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    ours = random_moe(**overrides)
    save_model(ours, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == ours.config.moe_experts
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = decisive_tokens(ours, 97, (2, 19))
    with torch.no_grad():
        assert torch.allclose(ours(idx), theirs(input_ids=idx).logits, atol=1e-4)
        prompt = idx[:1, :7]
        assert greedy(ours, prompt, 10) == greedy(lambda t: theirs(input_ids=t).logits, prompt, 10)


def test_a_transformers_mixtral_loads_with_equal_logits_and_decodes_with_a_cache(tmp_path):
    cfg = transformers.MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in theirs.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)  # a decisive router
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    assert ours.config.family == "mixtral" and ours.config.mlp == "moe"
    assert (ours.config.moe_experts, ours.config.moe_top_k, ours.config.d_ff) == (4, 2, 16)
    idx = decisive_tokens(ours, 101, (1, 23))
    with torch.no_grad():
        reference = theirs(input_ids=idx).logits
        assert torch.allclose(ours(idx), reference, atol=1e-4)
        state = ours.new_state(1, 32)
        first = ours(idx[:, :9], state=state, pos=torch.arange(9))
        rest = [ours(idx[:, i : i + 1], state=state, pos=torch.tensor([i])) for i in range(9, 23)]
        assert torch.allclose(torch.cat([first, *rest], 1), reference, atol=1e-4)


def test_the_fused_in_memory_expert_layout_reads_too():
    from slmkit.interop.hf import from_hf_state_dict

    cfg = transformers.MixtralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
    )  # fmt: skip
    theirs = transformers.MixtralForCausalLM(cfg)
    ours = ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16, mlp="moe",
                       moe_experts=3, family="mixtral")  # fmt: skip
    state = from_hf_state_dict(dict(theirs.state_dict()), ours)
    fused = theirs.model.layers[0].mlp.experts
    assert torch.equal(state["layers.0.mlp.experts.2.gate_proj.weight"], fused.gate_up_proj[2, :16])
    assert torch.equal(state["layers.0.mlp.experts.2.up_proj.weight"], fused.gate_up_proj[2, 16:])
    assert torch.equal(state["layers.0.mlp.experts.1.down_proj.weight"], fused.down_proj[1])
    assert torch.equal(state["layers.0.mlp.gate.weight"], theirs.model.layers[0].mlp.gate.weight)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"moe_shared_d_ff": 16}, "moe_shared_d_ff"),
        ({"moe_norm_topk": False}, "moe_norm_topk"),
        ({"qkv_bias": True}, "qkv_bias"),
        ({"mlp": "gated"}, "mlp"),
    ],
)
def test_what_mixtral_cannot_express_is_refused_by_name(overrides, message):
    from slmkit.interop.families import check_family

    fields = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=24, mlp="moe", family="slmkit")
    with pytest.raises(UserError, match=message):
        check_family(ModelConfig(**{**fields, **overrides, "family": "mixtral"}))


def test_an_upcycled_llama_exports_as_mixtral(tmp_path):
    from slmkit.compress.moe import upcycled_model

    dense = build_model(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)).eval()
    dense.init_weights(seed=0)
    moe = upcycled_model(dense, experts=4, top_k=2)
    moe.config = moe.config.replace(family="mixtral")
    save_model(moe, tmp_path / "m")
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 97, (1, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=idx).logits, dense(idx), atol=1e-4)
