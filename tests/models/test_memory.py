"""Product-key memory layers: the lookup against brute force over all n^2 keys, gradient only to the rows read,
counts, per-layer MLP kinds, and the model around it (decode, batching, training, save/load, bad values)."""

from __future__ import annotations

import json

import pytest
import torch

from slmkit.config import ModelConfig, preset
from slmkit.errors import UserError
from slmkit.infer.batcher import ContinuousBatcher, GenerationRequest
from slmkit.infer.engine import Engine
from slmkit.models import build_model
from slmkit.models.memory import ProductKeyMemory, product_key_topk
from slmkit_testing import PROMPTS, plain_greedy, run_batcher


def memory_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=97, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=64,
        mlp_pattern=("gated", "memory", "gated"), memory_keys=12, memory_heads=2, memory_topk=5, memory_key_dim=16,
        family="slmkit",
    )  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def brute_force(memory: ProductKeyMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of all n^2 keys (the concatenation of a sub-key pair) per head, then a plain top-k."""
    n, half = memory.n_keys, memory.key_dim // 2
    query = memory.query_proj(x)
    if hasattr(memory, "query_norm"):
        query = memory.query_norm(query)
    query = query.view(x.shape[0], memory.heads, memory.key_dim)
    keys = torch.cat(  # (H, n^2, D): key a * n + b is [sub_a ; sub_b]
        [
            memory.sub_keys[:, 0].repeat_interleave(n, dim=1),
            memory.sub_keys[:, 1].repeat(1, n, 1),
        ],
        dim=-1,
    )
    assert keys.shape == (memory.heads, n * n, 2 * half)
    scores = torch.einsum("thd,hnd->thn", query, keys)  # (N, H, n^2)
    return scores.topk(memory.top_k, dim=-1)


@pytest.mark.parametrize("overrides", [{}, {"memory_topk": 12}, {"memory_topk": 1}, {"memory_query_batchnorm": True}])
def test_product_key_topk_equals_brute_force_over_all_keys(overrides):
    torch.manual_seed(0)
    memory = ProductKeyMemory(memory_config(**overrides)).eval()
    x = torch.randn(40, 32)
    with torch.no_grad():
        weights, rows = memory.lookup(x)
        top, best = brute_force(memory, x)
        scores, indices = product_key_topk(*_half_scores(memory, x), memory.top_k)
    assert torch.equal(indices, best)  # random scores: no ties, so the order is the same too
    assert torch.allclose(scores, top, atol=1e-5)
    assert torch.equal(rows, best)
    assert torch.allclose(weights, torch.softmax(top, -1), atol=1e-6)


def _half_scores(memory: ProductKeyMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    query = memory.query_proj(x)
    if hasattr(memory, "query_norm"):
        query = memory.query_norm(query)
    query = query.view(x.shape[0], memory.heads, 2, -1)
    scores = torch.einsum("thsd,hsnd->thsn", query, memory.sub_keys)
    return scores[:, :, 0], scores[:, :, 1]


def test_product_topk_on_plain_scores():
    a, b = torch.randn(7, 30), torch.randn(7, 30)
    scores, rows = product_key_topk(a, b, 6)
    full = (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2)  # (7, 900): pair (i, j) at i 30 + j
    top, best = full.topk(6, dim=-1)
    assert torch.equal(rows, best) and torch.allclose(scores, top)


@pytest.mark.parametrize("gated", [True, False])
def test_only_the_selected_value_rows_receive_gradient(gated):
    torch.manual_seed(1)
    memory = ProductKeyMemory(memory_config(memory_gated=gated))
    x = torch.randn(3, 32)
    memory(x).square().sum().backward()
    _, rows = memory.lookup(x)
    selected = set(rows.flatten().tolist())
    assert len(selected) > memory.top_k  # tokens and heads read different rows
    grad = memory.values.weight.grad
    touched = set(torch.nonzero(grad.abs().sum(-1)).flatten().tolist())
    assert touched == selected
    assert memory.sub_keys.grad.abs().sum() > 0 and memory.query_proj.weight.grad.abs().sum() > 0


def test_output_is_the_weighted_sum_of_the_rows_read():
    torch.manual_seed(2)
    memory = ProductKeyMemory(memory_config(memory_gated=False)).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        weights, rows = memory.lookup(x)
        expected = (weights.unsqueeze(-1) * memory.values.weight[rows]).sum(dim=(1, 2))
        assert torch.allclose(memory(x), expected, atol=1e-6)
        gated = ProductKeyMemory(memory_config())
        gated.load_state_dict(memory.state_dict(), strict=False)
        gated.eval()
        out = gated.down_proj(torch.nn.functional.silu(gated.gate_proj(x)) * expected)
        assert torch.allclose(gated(x), out, atol=1e-6)


@pytest.mark.parametrize("name", ["micro-memory", "small-memory"])
def test_counts_match_the_built_model(name):
    cfg = preset(name)
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert [cfg.mlp_at(i) for i in range(cfg.n_layers)].count("memory") == 1
    assert isinstance(model.layers[cfg.n_layers // 2].mlp, ProductKeyMemory)
    dense = preset(name.split("-")[0])
    table = cfg.memory_keys**2 * cfg.d_model
    h, k = cfg.memory_heads, cfg.memory_topk
    assert cfg.num_params() - cfg.num_params(active=True) == table - h * k * cfg.d_model
    assert cfg.num_params() > dense.num_params() + table // 2
    # a token's FLOPs stay at most the dense model's: the memory replaces one MLP and reads few rows
    assert cfg.flops_per_token() <= dense.flops_per_token()


def test_counts_with_batchnorm_ungated_and_other_widths():
    for overrides in [{"memory_query_batchnorm": True}, {"memory_gated": False}, {"memory_value_dim": 40}]:
        cfg = memory_config(**overrides)
        assert cfg.num_params() == sum(p.numel() for p in build_model(cfg).parameters()), overrides


def test_flops_count_the_memory_lookup():
    cfg = memory_config()
    dense = cfg.replace(mlp_pattern=None)
    c, h, n, k, dk = 32, 2, 12, 5, 16
    memory_forward = 2 * (c * h * dk + h * n * dk + 2 * c * c) + h * k * k + 2 * h * k * c
    assert cfg.flops_per_token() == pytest.approx(dense.flops_per_token() - 3 * 2 * 3 * c * 48 + 3 * memory_forward)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"memory_topk": 13}, "cannot exceed memory_keys"),
        ({"memory_keys": 0}, "memory_keys must be a positive integer"),
        ({"memory_key_dim": 15}, "must be even"),
        ({"memory_value_dim": -1}, "memory_value_dim"),
        ({"memory_gated": False, "memory_value_dim": 16}, "ungated memory"),
        ({"memory_keys": 70000}, "beyond the limit"),
        ({"mlp_pattern": ("gated", "memory")}, "give one per layer"),
        ({"mlp_pattern": ("gated", "memroy", "gated")}, "memroy"),
        ({"mlp_pattern": "memory"}, "list of MLP kinds"),
        ({"memory_heads": 1.5}, "memory_heads must be an integer"),
    ],
)
def test_config_refuses_bad_memory_values(changes, message):
    with pytest.raises(UserError, match=message):
        memory_config(**changes)


def test_hugging_face_families_refuse_memory_layers():
    from slmkit.interop.families import check_family

    with pytest.raises(UserError, match="mlp_pattern"):
        check_family(memory_config(family="llama"))
    with pytest.raises(UserError, match="memory"):
        check_family(memory_config(family="llama", mlp="memory", mlp_pattern=None))


def test_mlp_pattern_with_moe_and_none_layers_counts_and_builds():
    cfg = memory_config(mlp_pattern=("moe", "memory", "none"), moe_experts=4, moe_top_k=2)
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert not hasattr(model.layers[2], "mlp") and type(model.layers[0].mlp).__name__ == "MoE"


# ---- the model: decoding, batching, training, the model directory, compression --------------------------
@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from slmkit.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir / "tokenizer.json")
    cfg = memory_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=None, bos_token_id=None)
    model = build_model(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval(), tokenizer


def test_engine_and_speculation_equal_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    outs = engine.generate(PROMPTS, max_new_tokens=12)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == plain_greedy(model, tokenizer.encode(prompt).ids, 12)
    [out] = engine.generate(PROMPTS[3], max_new_tokens=24, speculate="lookup", speculate_k=4, min_acceptance=0.0)
    assert out.token_ids == plain_greedy(model, tokenizer.encode(PROMPTS[3]).ids, 24)


def test_cached_decode_equals_the_full_forward(model_and_tokenizer):
    model, _ = model_and_tokenizer
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 32)
        steps = [model(idx[:, :12], state=state, pos=torch.arange(12))]
        steps += [model(idx[:, t : t + 1], state=state, pos=torch.tensor([t])) for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_continuous_batcher_equals_the_plain_loop(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batcher = ContinuousBatcher(model, tokenizer, max_batch=3, prefill_chunk=4)
    requests = [GenerationRequest(tokenizer.encode(p).ids, n) for p, n in zip(PROMPTS, [10, 6, 12, 8], strict=True)]
    for req, seq in zip(requests, run_batcher(batcher, requests, join_after=2, steps=3), strict=True):
        assert seq.out == plain_greedy(model, req.prompt_ids, req.max_new_tokens)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_model_directory_round_trips(model_and_tokenizer, tmp_path, batchnorm):
    from slmkit.interop.checkpoint import load_model, save_model

    model, _ = model_and_tokenizer
    if batchnorm:  # running statistics are buffers: they must travel with the weights
        model = build_model(model.config.replace(memory_query_batchnorm=True))
        model.init_weights(seed=4)
        model.train()
        model(torch.randint(0, model.config.vocab_size, (4, 16)))  # moves the running statistics off their start
        model.eval()
    save_model(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "slmkit" and saved["mlp_pattern"] == ["gated", "memory", "gated"]
    again = load_model(tmp_path / "m")
    assert again.config == model.config
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    with torch.no_grad():  # an engine above laid the model out for CPU decoding: other summation order
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=1e-5)


def test_training_lowers_the_loss_and_updates_the_memory(data_dir, tmp_path):
    from slmkit.interop.checkpoint import load_model
    from slmkit.train.config import TrainConfig
    from slmkit.train.loop import train

    config = TrainConfig(
        preset="micro-memory",
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 32,
               "mlp_pattern": ["gated", "memory"], "memory_keys": 16, "memory_topk": 4, "memory_key_dim": 16},
        seq_len=32, batch_size=4, max_steps=12, lr=3e-3, warmup_steps=2, eval_interval=1000, log_interval=1, seed=5,
    )  # fmt: skip
    result = train(config, data_dir, tmp_path / "run")
    assert result.losses[-1] < result.losses[0]
    model = load_model(tmp_path / "run" / "final")
    assert isinstance(model.layers[1].mlp, ProductKeyMemory)
    fresh = build_model(model.config)
    fresh.init_weights(seed=5)
    assert not torch.equal(model.layers[1].mlp.sub_keys, fresh.layers[1].mlp.sub_keys)


def test_upcycling_and_structured_pruning_refuse_memory_layers_and_the_card_names_them():
    from slmkit.compress.moe import upcycled_model
    from slmkit.compress.prune import prune_structured
    from slmkit.eval.card import _architecture

    model = build_model(memory_config())
    with pytest.raises(UserError, match="upcycling copies a gated MLP"):
        upcycled_model(model, 4, 2)
    with pytest.raises(UserError, match="product-key memory layers"):
        prune_structured(model, None, ffn_keep=0.5)
    assert "product-key memory (144 values, top-5) in layer(s) [1]" in _architecture(model.config)


def test_value_table_is_not_weight_decayed():
    from slmkit.train.optim import param_groups

    model = build_model(memory_config())
    decay, no_decay = param_groups(model, 0.1)
    values = model.layers[1].mlp.values.weight
    assert any(p is values for p in no_decay["params"]) and not any(p is values for p in decay["params"])
