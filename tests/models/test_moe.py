"""Mixture-of-experts MLPs: routing, the balance and z losses, dropless expert dispatch against a per-token
reference, counts, and everything else (decode, batching, speculation, training metrics, save/load, int8)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slmkit.config import ModelConfig, preset
from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine
from slmkit.models import build_model
from slmkit.models.mlp import MLP
from slmkit.models.moe import MoE, load_balancing_loss, route, router_z_loss
from slmkit_testing import PROMPTS, plain_greedy, run_batcher


def moe_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24, max_seq_len=64, mlp="moe",
        moe_experts=6, moe_top_k=2, family="slmkit",
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def random_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(moe_config(**overrides))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)  # routing far from uniform, with clear top-k margins
    return moe


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: softmax router, its k best experts, weighted sum; plus the shared expert."""
    out = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(moe.gate(token).float(), -1)
        order = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[: moe.top_k]
        weights = probs[order] / (probs[order].sum() if moe.normalize else 1)
        if moe.unit:
            weights = torch.ones_like(weights)
        y = sum(w * moe.experts[e](token) for w, e in zip(weights, order, strict=True))
        if hasattr(moe, "shared_expert"):
            gate = torch.sigmoid(moe.shared_expert_gate(token)) if hasattr(moe, "shared_expert_gate") else 1
            y = y + gate * moe.shared_expert(token)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"moe_top_k": 1}, {"moe_norm_topk": False}, {"moe_shared_d_ff": 16, "moe_shared_gate": True},
     {"moe_top_k": 6}, {"moe_weighting": "unit", "moe_shared_d_ff": 8}],
)  # fmt: skip
def test_dropless_dispatch_equals_the_per_token_reference(overrides):
    moe = random_moe(**overrides).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert torch.allclose(moe(x), per_token_reference(moe, x), atol=1e-5)
        # a token's output does not depend on the batch it is in (no capacity, nothing dropped)
        assert torch.allclose(moe(x[1:2, 3:4]), moe(x)[1:2, 3:4], atol=1e-6)


def test_every_token_reaches_its_experts_however_unbalanced():
    moe = random_moe().eval()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 1] = torch.arange(6) * 0.5  # the runner-up: expert 5 (no ties for topk to break)
        moe.gate.weight[4, 0] = 50.0  # every token (x > 0) goes to expert 4 first
    x = torch.randn(64, 32).abs().unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(moe(x), per_token_reference(moe, x), atol=1e-5)


def test_identical_experts_reproduce_the_dense_mlp():
    cfg = moe_config()
    dense = MLP(cfg)
    moe = random_moe()
    for expert in moe.experts:
        expert.load_state_dict(dense.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_route_picks_the_top_k_and_normalises():
    logits = torch.randn(50, 8)
    probs, weights, experts = route(logits, 3, normalize=True)
    assert torch.allclose(probs, torch.softmax(logits, -1))
    for n in range(50):
        best = sorted(range(8), key=lambda e: -float(logits[n, e]))[:3]
        assert experts[n].tolist() == best
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    _, raw, _ = route(logits, 3, normalize=False)
    assert torch.allclose(raw, probs.gather(1, experts))


def test_balance_loss_is_one_under_uniform_routing_and_grows_when_concentrated():
    n, e = 40, 8
    uniform_probs = torch.full((n, e), 1 / e)
    skewed_experts = torch.zeros(n, 2, dtype=torch.long)  # everything to expert 0 (and 0 again)
    assert load_balancing_loss(uniform_probs, skewed_experts, e).item() == pytest.approx(1.0)
    spread = torch.arange(2 * n).reshape(n, 2) % e  # every expert gets the same share of assignments
    skewed_probs = torch.softmax(torch.randn(n, e) * 3, -1)
    assert load_balancing_loss(skewed_probs, spread, e).item() == pytest.approx(1.0, abs=1e-6)
    concentrated = torch.zeros(n, e)
    concentrated[:, 0] = 1.0
    assert load_balancing_loss(concentrated, torch.zeros(n, 1, dtype=torch.long), e).item() == pytest.approx(e)


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (torch.log(torch.tensor(2.0)) ** 2 + torch.logsumexp(logits[1], 0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected.item())


def test_training_forward_reports_losses_and_load_and_inference_does_not():
    moe = random_moe()
    x = torch.randn(2, 16, 32)
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert moe.aux_loss is None and moe.aux_metrics is None
    moe.train()
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    assert 1.0 <= moe.aux_metrics["moe_load"].item() <= moe.n_experts / moe.top_k
    moe.aux_loss.backward()  # the losses train the router
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["micro-moe", "small-moe"])
def test_counts_match_the_built_model_and_active_is_the_dense_size(name):
    cfg = preset(name)
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    dense = preset(name.split("-")[0])
    router = cfg.n_layers * cfg.d_model * cfg.moe_experts
    assert cfg.num_params(active=True) == dense.num_params() + router  # k experts of half width = one dense MLP
    assert cfg.num_params() > 3 * cfg.num_params(active=True, include_embeddings=False)
    assert cfg.flops_per_token() == pytest.approx(dense.flops_per_token() + 6 * router)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"moe_top_k": 9}, "cannot exceed moe_experts"),
        ({"moe_experts": 0}, "moe_experts must be a positive integer"),
        ({"moe_shared_gate": True}, "needs a shared expert"),
        ({"moe_z_loss_weight": -1.0}, "moe_z_loss_weight"),
        ({"moe_weighting": "ones"}, "moe_weighting must be softmax or unit"),
    ],
)
def test_config_refuses_bad_moe_values(changes, message):
    with pytest.raises(UserError, match=message):
        moe_config(**{"moe_experts": 8, **changes})


def test_hugging_face_families_refuse_an_moe_mlp_until_they_have_one():
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match="mlp"):
        check_family(moe_config(family="llama"))
    with pytest.raises(UserError, match="moe_weighting"):  # Mixtral always weights by the router
        check_family(moe_config(family="mixtral", moe_weighting="unit"))


def test_unit_weighting_adds_the_chosen_experts_and_still_trains_the_router():
    """moe_weighting: unit (carved models): every chosen expert counts once, whatever the router probabilities,
    and the router's gradient is the softmax weights' (straight through), so fine-tuning can still move it."""
    unit = random_moe(moe_weighting="unit")
    x = torch.randn(2, 5, 32)
    _, _, chosen = route(unit.gate(x.reshape(-1, 32)).float(), 2, True)
    tokens = x.reshape(-1, 32)
    reference = torch.stack([sum(unit.experts[e](t) for e in c.tolist()) for t, c in zip(tokens, chosen, strict=True)])
    assert torch.allclose(unit(x).reshape(-1, 32), reference, atol=1e-5)
    unit(x).square().sum().backward()
    assert unit.gate.weight.grad.abs().sum() > 0


# ---- the model: decoding, batching, speculation, training, the model directory, compression -------------
@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from slmkit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir / "tokenizer.json")
    cfg = moe_config(vocab_size=tokenizer.get_vocab_size(), moe_shared_d_ff=16, eos_token_id=None, bos_token_id=None)
    model = build_model(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if "mlp.gate." in name else 4.0)
    return model.eval(), tokenizer


def test_engine_and_speculation_equal_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    outs = engine.generate(PROMPTS, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 12)
    [out] = engine.generate(PROMPTS[3], max_new_tokens=24, speculate="lookup", speculate_k=4, min_acceptance=0.0)
    assert out.token_ids == plain_greedy(model, tokenizer.encode(PROMPTS[3]).ids, 24)


def test_continuous_batcher_equals_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3, prefill_chunk=4)
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, [10, 6, 12, 8], strict=True)]
    for req, seq in zip(requests, run_batcher(batcher, requests, join_after=2, steps=3), strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


def test_model_directory_round_trips(model_and_tokenizer, tmp_path):
    from slmkit.interop.checkpoint import load_model, save_model

    model, _ = model_and_tokenizer
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "slmkit" and saved["mlp"] == "moe" and saved["moe_shared_d_ff"] == 16
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    with torch.no_grad():  # the engine above laid the model out for CPU decoding: other summation order
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=1e-5)


def test_training_logs_balance_losses_per_layer_and_resumes(data_dir, tmp_path):
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    def config(steps: int) -> TrainConfig:
        return TrainConfig(
            preset="micro-moe", model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 32},
            seq_len=32, batch_size=4, max_steps=steps, lr=3e-3, warmup_steps=2, eval_interval=1000,
            save_interval=4, log_interval=1, seed=5,
        )  # fmt: skip

    whole = train(config(8), data_dir, tmp_path / "whole")
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "aux_loss" in r]
    assert len(steps) == 8
    for r in steps:
        assert 0.5 < r["aux_loss"] < 10  # balance (about 1) + 0.1 x z-loss (log(8)^2 at a uniform start)
        assert {"moe_load/L0", "moe_load/L1"} <= set(r) and r["moe_load/L0"] >= 1.0
    shutil.rmtree(tmp_path / "whole" / "final")  # as if the run died after the step-4 checkpoint
    resumed = train(TrainConfig(), data_dir, tmp_path / "whole", resume=True)
    assert resumed.losses == whole.losses[4:]
