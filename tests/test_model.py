"""Forward shapes, cached vs uncached decoding, batched left-padding, and logit parity with transformers."""

import pytest
import torch

from slmkit.config import preset
from slmkit.interop.checkpoint import load_model, save_model
from slmkit.models import build_model


def make_model(seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = preset("tiny", vocab_size=320, max_seq_len=64, **overrides)
    model = build_model(cfg)
    model.init_weights(seed)
    # larger weights than the init so attention patterns are sharp and differences would show
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.eval()


def test_forward_shapes_and_loss():
    model = make_model()
    idx = torch.randint(0, 320, (3, 17))
    assert model(idx).shape == (3, 17, 320)
    assert model(idx, last_only=True).shape == (3, 1, 320)
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_causality():
    model = make_model()
    idx = torch.randint(0, 320, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 320
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_cached_decode_equals_full_forward(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 64)
        steps = [model(idx[:, :7], state=state, pos=torch.arange(7))]
        for i in range(7, 20):
            steps.append(model(idx[:, i : i + 1], state=state, pos=torch.tensor([i]), upto=i + 1))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_rows_of_different_lengths_prefill_together_like_each_alone():
    """One prefill over rows of different lengths (per-row positions, the short row's tail is scratch that its
    later tokens overwrite) gives each row the logits it has alone; nothing is padded on the left."""
    model = make_model()
    a = torch.randint(0, 320, (9,))
    b = torch.randint(0, 320, (4,))
    batch = torch.stack([a, torch.cat([b, torch.zeros(5, dtype=torch.long)])])
    with torch.no_grad():
        state = model.new_state(2, 64)
        logits = model(batch, state=state, pos=torch.arange(9)[None].expand(2, 9))
        alone_a = model(a[None])
        alone_b = model(b[None])
    torch.testing.assert_close(logits[0], alone_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1, :4], alone_b[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(logits).all()


def test_sliding_window_ring_state_bounds_memory_and_decodes_exactly():
    """A window far shorter than the context gets a ring of window + slack slots whatever max_len is; prefill
    (longer than the ring), decode steps and a multi-token verification pass all equal the full forward."""
    from slmkit.models.state import RingKVState

    model = make_model(sliding_window=6, family="mistral")
    idx = torch.randint(0, 320, (2, 120))
    with torch.no_grad():
        full = model(idx)
        state = model.new_state(2, 1024)
        ring = state.layer(0)
        assert isinstance(ring, RingKVState) and ring.k.shape[2] < 64
        steps = [model(idx[:, :50], state=state, pos=torch.arange(50))]
        for i in range(50, 80):
            steps.append(model(idx[:, i : i + 1], state=state, pos=torch.tensor([i])))
        # a verification pass of 5 tokens, of which 2 are rejected: crop, then feed the true continuation
        wrong = torch.randint(0, 320, (2, 5))
        wrong[:, :3] = idx[:, 80:83]
        steps.append(model(wrong, state=state, pos=torch.arange(80, 85))[:, :3])
        for row in range(2):
            state.crop(row, 83)
        steps.append(model(idx[:, 83:120], state=state, pos=torch.arange(83, 120)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_per_row_cache_positions_match_each_sequence_alone(window):
    """Rows at different lengths in one cache (continuous batching): each row decodes as it would alone,
    even when its slots beyond its length hold another sequence's stale keys."""
    model = make_model(sliding_window=window, family="mistral" if window else "llama")
    a = torch.randint(0, 320, (11,))
    b = torch.randint(0, 320, (4,))
    with torch.no_grad():
        state = model.new_state(2, 64)
        # an earlier occupant of row 1 left 11 slots of keys behind
        model(torch.randint(0, 320, (2, 11)), state=state, pos=torch.arange(11))
        state.reset(1, 2)
        # row 0 prefills 11 tokens while row 1 prefills 4: padded to T=11, row 1's extra query slots
        # are scratch slots that its later tokens overwrite
        prompt = torch.stack([a, torch.cat([b, torch.zeros(7, dtype=torch.long)])])
        pos = torch.stack([torch.arange(11), torch.arange(11)])
        out = model(prompt, state=state, pos=pos)
        a_steps, b_steps = [out[0, -1]], [out[1, 3]]
        next_a, next_b = torch.randint(0, 320, (6,)), torch.randint(0, 320, (6,))
        for i in range(6):
            tokens = torch.tensor([[next_a[i]], [next_b[i]]])
            step_pos = torch.tensor([[11 + i], [4 + i]])
            logits = model(tokens, state=state, pos=step_pos, upto=17)
            a_steps.append(logits[0, 0])
            b_steps.append(logits[1, 0])
        alone_a = model(torch.cat([a, next_a])[None])[0, 10:]
        alone_b = model(torch.cat([b, next_b])[None])[0, 3:]
    torch.testing.assert_close(torch.stack(a_steps), alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(b_steps), alone_b, atol=1e-4, rtol=1e-4)


def test_state_rows_are_views_that_decode_like_the_whole_state():
    model = make_model()
    idx = torch.randint(0, 320, (3, 6))
    with torch.no_grad():
        whole = model.new_state(3, 64)
        expected = model(idx, state=whole, pos=torch.arange(6))
        state = model.new_state(3, 64)
        got = model(idx[1:], state=state.rows(1, 3), pos=torch.arange(6))
    torch.testing.assert_close(got, expected[1:])
    for layer in range(model.config.n_layers):
        torch.testing.assert_close(state.layer(layer).k[1:], whole.layer(layer).k[1:])  # written through the view
        assert state.layer(layer).k[0].abs().sum() == 0


def test_moved_row_decodes_as_it_did_in_its_old_row():
    """`move` (the continuous batcher packing rows) carries a sequence's state into another row."""
    model = make_model(sliding_window=4, family="mistral")
    idx = torch.randint(0, 320, (2, 60))
    with torch.no_grad():
        full = model(idx[1:2])
        state = model.new_state(2, 256)
        model(idx[:, :50], state=state, pos=torch.arange(50))
        state.move(1, 0, 50)
        got = model(idx[1:2, 50:], state=state.rows(0, 1), pos=torch.arange(50, 60))
    torch.testing.assert_close(got, full[:, 50:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers_llama(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = make_model(tie_embeddings=tie)
    save_model(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 320, (2, 33))
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    assert diff < 1e-4


def test_load_a_model_transformers_saved(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    idx = torch.randint(0, 200, (2, 21))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
        # greedy continuation identical too
        hf_out = hf.generate(idx[:1, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert diff < 1e-4
    from slmkit.infer.generate import generate_ids

    ours_out = list(generate_ids(ours, idx[0, :5].tolist(), max_new_tokens=10))
    assert ours_out == hf_out[0, 5:].tolist()
