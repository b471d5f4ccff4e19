"""The speedrun's architecture and schedule switches: value embeddings, U-net skips, batch-size warm-up and late
untying of the output head (docs/training.md). Each test names what breaks when the switch stops doing its job."""

import shutil

import pytest
import torch

from slmkit.config import ModelConfig, preset
from slmkit.errors import UserError
from slmkit.models import build_model
from slmkit.train.config import TrainConfig
from slmkit.train.loop import train
from slmkit.train.optim import rows_at
from slmkit_testing import tiny_train_config as cfg


def small(**changes):
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = build_model(ModelConfig(**{**base, "family": "slmkit", **changes}))
    model.init_weights(seed=0)
    return model.eval()


def test_value_embeddings_feed_the_first_and_last_layers():
    config = ModelConfig(vocab_size=97, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, value_embeds=2)
    assert config.value_embed_layers() == {0: 0, 1: 1, 3: 0, 4: 1}  # layer 2 has none
    model = small(n_layers=5, value_embeds=2)
    lambdas = {n for n, _ in model.named_parameters() if n.endswith("value_lambdas")}
    assert lambdas == {f"layers.{i}.self_attn.value_lambdas" for i in (0, 1, 3, 4)}
    assert all(torch.equal(p, torch.full((2,), 0.5)) for n, p in model.named_parameters() if n in lambdas)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    # the tables change the logits, and through each table only the layers it feeds
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model(idx)
    with torch.no_grad():
        model.value_embeds[1].weight.mul_(3.0)
    assert not torch.allclose(model(idx), before)
    with torch.no_grad():
        model.value_embeds[1].weight.div_(3.0)
        for i in (1, 4):  # the layers table 1 feeds: with its weight at zero, the table has no effect
            model.layers[i].self_attn.value_lambdas[1] = 0.0
        reference = model(idx)
        model.value_embeds[1].weight.mul_(3.0)
    assert torch.allclose(model(idx), reference)


def test_value_embeddings_equal_a_hand_computed_layer():
    model = small(n_layers=2, value_embeds=1)
    idx = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.value_lambdas.copy_(torch.tensor([0.25, 2.0]))
    seen = {}
    attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.update(y=args[0]))
    model(idx)
    # recompute layer 0's attention by hand: v mixes the projection and the table as a v + b ve
    x = model.layers[0].input_layernorm(model.embed_tokens(idx))
    q = attn.q_proj(x).view(1, 6, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 2, 8).transpose(1, 2)
    v = (0.25 * attn.v_proj(x) + 2.0 * model.value_embeds[0](idx)).view(1, 6, 2, 8).transpose(1, 2)
    pos = torch.arange(6)
    from slmkit.models.attention import apply_rope, rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(pos, 8, 0.0, rope_inv_freq(model.config, 6))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(seen["y"], y.transpose(1, 2).reshape(1, 6, 32), atol=1e-5, rtol=1e-5)


def test_skip_connections_mirror_the_first_half():
    model = small(n_layers=4, skip_connections=True)
    assert torch.equal(model.skip_weights, torch.ones(2))
    outputs, inputs = {}, {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda _m, args, out, i=i: outputs.update({i: out}))
        layer.register_forward_pre_hook(lambda _m, args, i=i: inputs.update({i: args[0]}))
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, 2.0]))
    model(torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(inputs[1], outputs[0])  # first half: plain
    torch.testing.assert_close(inputs[2], outputs[1] + 0.5 * outputs[1])  # layer 2 takes layer 1's output
    torch.testing.assert_close(inputs[3], outputs[2] + 2.0 * outputs[0])  # layer 3 takes layer 0's


@pytest.mark.parametrize(
    "changes",
    [dict(value_embeds=2), dict(skip_connections=True), dict(value_embeds=1, skip_connections=True, n_layers=3)],
)
def test_decoding_with_a_state_equals_the_full_forward(changes):
    model = small(**changes)
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    state = model.new_state(2, 32)
    steps = [model(idx[:, :4], state=state, pos=torch.arange(4))]
    steps += [model(idx[:, t : t + 1], state=state, pos=torch.tensor([t])) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_switches_are_checked_and_slmkit_only(tmp_path):
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64)
    with pytest.raises(UserError, match=r"value_embeds must be an integer in \[0, n_layers=4\]"):
        ModelConfig(**base, value_embeds=5)
    with pytest.raises(UserError, match="some of them are mamba2 layers"):
        ModelConfig(**base, value_embeds=1, layer_pattern=("mamba2", "attention", "attention", "attention"))
    with pytest.raises(UserError, match="skip_connections must be true or false"):
        ModelConfig(**base, skip_connections="yes")
    with pytest.raises(UserError, match="family 'llama' cannot express value_embeds=2 .*set family: slmkit"):
        TrainConfig(preset="tiny", model={"value_embeds": 2}, max_steps=1)
    with pytest.raises(UserError, match="cannot express skip_connections=True"):
        TrainConfig(preset="tiny", model={"skip_connections": True}, max_steps=1)
    from slmkit.compress.prune import prune_structured

    with pytest.raises(UserError, match="value embeddings or U-net skips"):
        prune_structured(small(value_embeds=1), [torch.zeros(1, 4, dtype=torch.long)], ffn_keep=0.5)


def test_value_embeddings_and_skips_train_save_and_load(data_dir, tmp_path):
    from slmkit.interop.checkpoint import load_model

    model = {"max_seq_len": 64, "family": "slmkit", "value_embeds": 1, "skip_connections": True}
    result = train(cfg(max_steps=3, optimizer="muon", model=model), data_dir, tmp_path / "run")
    loaded = load_model(result.final_dir)
    assert loaded.config.value_embeds == 1 and loaded.config.skip_connections
    assert not torch.equal(loaded.skip_weights, torch.ones(2))  # they learn
    from slmkit.train.optim import muon_param_names

    assert not any("value_embeds" in n or "skip" in n or "lambdas" in n for n in muon_param_names(loaded))


def test_batch_warmup_ramps_rows_and_counts_tokens(data_dir, tmp_path):
    c = cfg(batch_size=8, batch_warmup_steps=4, batch_warmup_start=2)
    assert [rows_at(c, s) for s in range(6)] == [2, 2, 4, 6, 8, 8]
    result = train(cfg(batch_size=8, batch_warmup_steps=4, batch_warmup_start=2, max_steps=6), data_dir, tmp_path / "r")
    assert result.tokens == 32 * (2 + 2 + 4 + 6 + 8 + 8)  # seq_len 32: the rows actually trained on
    with pytest.raises(UserError, match="batch_warmup_start must be in"):
        cfg(batch_size=8, batch_warmup_steps=4, batch_warmup_start=9)
    with pytest.raises(UserError, match="batch_warmup_steps must be >= 0"):
        cfg(batch_warmup_steps=-1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_late_untie_resumes_exactly(data_dir, tmp_path, optimizer):
    full = train(cfg(max_steps=8, optimizer=optimizer, untie_head_at=0.5), data_dir, tmp_path / "full")
    from slmkit.interop.checkpoint import load_model

    final = load_model(full.final_dir)
    assert not final.config.tie_embeddings
    assert not torch.equal(final.lm_head.weight, final.embed_tokens.weight)  # they trained apart after step 4
    tied = train(cfg(max_steps=8, optimizer=optimizer), data_dir, tmp_path / "tied")
    assert tied.losses[:5] == full.losses[:5]  # same run until the untying (step 4's update is the first apart)
    assert tied.losses[5:] != full.losses[5:]
    # resumed before (step 2) and after (step 6) the untying: the uninterrupted run's losses, bit for bit
    for at in (2, 6):
        run = tmp_path / f"part{at}"
        part = train(
            cfg(max_steps=8, optimizer=optimizer, untie_head_at=0.5, save_interval=at, keep_checkpoints=10),
            data_dir,
            run,
        )
        assert part.losses == full.losses
        shutil.rmtree(run / "final")
        for step_dir in (run / "checkpoints").iterdir():
            if step_dir.name != f"step-{at}":
                shutil.rmtree(step_dir)
        resumed = train(TrainConfig(), data_dir, run, resume=True)
        assert resumed.losses == full.losses[at:], at


def test_late_untie_is_refused_where_it_cannot_work():
    with pytest.raises(UserError, match=r"untie_head_at must be in \(0, 1\)"):
        cfg(untie_head_at=1.0)
    with pytest.raises(UserError, match="untie_head_at needs one process"):
        cfg(untie_head_at=0.5, strategy="ddp")


def test_late_untie_refuses_an_untied_model(data_dir, tmp_path):
    c = cfg(max_steps=2, untie_head_at=0.5, model={"max_seq_len": 64, "tie_embeddings": False})
    with pytest.raises(UserError, match="head is untied already"):
        train(c, data_dir, tmp_path / "run")


def test_preset_param_counts_stay_exact_with_the_switches():
    config = preset("micro", vocab_size=4096, family="slmkit", value_embeds=2, skip_connections=True)
    model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
