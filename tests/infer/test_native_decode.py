"""The native decode step (`slmkit.models.native_decode`: every layer of a one-token step in one C call): its
logits equal the layers' own path within 1e-5 at every step, at batch 1 and for rows at their own positions, for
fp32 (with and without the decode layout), grouped-query and partial rotary attention, biases, the other
activations and rope scalings, mixtures of experts (top-k renormalised or not, unit weights, mixed with dense layers),
and int8 / int4 tiled weights; greedy tokens through the decode core are the same;
it steps aside (the layers run, with their results) where it does not apply: a forward hook (an adapter), weights
moved since it was planned, caches it does not run, more than MAX_ROWS rows, architectures it lacks, a position
past the cache; and the AVX2 and portable-C builds compute the same step."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmkit.config import ModelConfig, RopeScaling
from slmkit.infer.core import decode_greedy
from slmkit.models import build_model, native, native_decode
from slmkit.models.decode_layout import use_decode_layout
from slmkit.models.state import KVCacheSpec

pytestmark = pytest.mark.skipif(not native.f32_available(), reason="native kernels not built (no C compiler?)")


def make(seed: int = 0, **overrides) -> torch.nn.Module:
    fields = dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
        eos_token_id=None,
    )  # fmt: skip
    fields.update(overrides)
    model = build_model(ModelConfig(**fields))
    model.init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3)  # sharp enough that greedy paths are not degenerate
            elif name.endswith("bias") or name.endswith("norm.weight") or "layernorm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
    return model.eval()


def step_logits(model, tokens: list[int], prompt_len: int, native_on: bool, upto: bool = True) -> torch.Tensor:
    """Prefill the prompt, then feed the rest one token at a time; the stacked logits of every one-token step."""
    native_decode.ENABLED[0] = native_on
    try:
        state = model.new_state(1, 48)
        out = []
        with torch.inference_mode():
            model(torch.tensor([tokens[:prompt_len]]), state=state, pos=torch.arange(prompt_len))
            for p in range(prompt_len, len(tokens)):
                pos = torch.tensor([p])
                logits = model(torch.tensor([[tokens[p]]]), state=state, pos=pos, upto=p + 1 if upto else None)
                out.append(logits[0, -1])
        return torch.stack(out)
    finally:
        native_decode.ENABLED[0] = True


MOE = {"mlp": "moe", "moe_experts": 4, "moe_top_k": 2}
TOKENS = list(torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist())
RUN_CALLS = len(TOKENS) - 8 + 1  # native calls in one step_logits: the 8-token prefill, then every one-token step
VARIANTS = {
    "llama gqa": {},
    "multi-head": {"n_kv_heads": 4},
    "one kv head": {"n_kv_heads": 1},
    "partial rotary": {"rope_fraction": 0.5},
    "biases": {"qkv_bias": True, "out_bias": True, "mlp_bias": True},
    "relu2": {"activation": "relu2"},
    "gelu_tanh": {"activation": "gelu_tanh"},
    "gelu plain mlp": {"activation": "gelu", "mlp": "plain"},
    "yarn": {"rope_scaling": RopeScaling(type="yarn", factor=4.0, original_max_seq_len=16)},
    "untied, eps": {"tie_embeddings": False, "norm_eps": 1e-6},
    "qk norm per head": {"qk_norm": True},
    "qk norm over the projection": {"qk_norm": True, "qk_norm_over": "projection"},
    "sliding window": {"sliding_window": 20},  # window + ring slack >= the cache's 48 slots: a plain KV cache
    # mixtures of experts: each row's own k experts, chosen and weighted in the kernel
    "moe top-2 renormalised (mixtral)": {"mlp": "moe", "moe_experts": 4, "moe_top_k": 2},
    "moe top-3 of 8, not renormalised": {"mlp": "moe", "moe_experts": 8, "moe_top_k": 3, "moe_norm_topk": False},
    "moe unit weights, top-1": {"mlp": "moe", "moe_experts": 3, "moe_top_k": 1, "moe_weighting": "unit"},
    "dense and moe layers": {"mlp_pattern": ("gated", "moe"), "moe_experts": 4, "moe_top_k": 2},
}


@pytest.mark.parametrize("layout", [True, False], ids=["decode layout", "as stored"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_step_matches_the_layers(variant, layout):
    model = make(**VARIANTS[variant])
    if layout:
        use_decode_layout(model)
    before = native_decode.STEPS[0]
    ours = step_logits(model, TOKENS, 8, True)
    assert native_decode.STEPS[0] - before == RUN_CALLS  # every one-token step took the native path
    theirs = step_logits(model, TOKENS, 8, False)
    assert native_decode.STEPS[0] - before == RUN_CALLS
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    # without upto (attend every slot up to the position) as with it
    assert torch.allclose(step_logits(model, TOKENS, 8, True, upto=False), ours, atol=1e-6)


def test_greedy_through_the_core_is_the_same():
    model = make()
    before = native_decode.STEPS[0]
    [ours], _ = decode_greedy(model, [TOKENS[:5]], 30)
    assert native_decode.STEPS[0] - before >= 29
    native_decode.ENABLED[0] = False
    try:
        [theirs], _ = decode_greedy(model, [TOKENS[:5]], 30)
    finally:
        native_decode.ENABLED[0] = True
    assert ours == theirs


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiles(bits):
    if bits == 4 and not native.int4_available():
        pytest.skip("the int4 kernel needs AVX-512")
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from quant_decode import quantize_in_memory

    model = quantize_in_memory(make(d_model=64, d_ff=128), bits)
    before = native_decode.STEPS[0]
    ours = step_logits(model, TOKENS, 8, True)
    assert native_decode.STEPS[0] - before == RUN_CALLS
    theirs = step_logits(model, TOKENS, 8, False)
    # the same product kernels; fp32 differences of ~1e-7 in a norm's output can move an activation's int16 rounding
    # (2^-16 of its row's largest entry) by one step, so the two paths differ by that much, not more
    assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max().item())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_a_hook_keeps_the_layers_path(monkeypatch):
    monkeypatch.setattr(native_decode, "RECHECK_CALLS", 1)  # look again at once (default: after 256 calls)
    model = make()
    plain = step_logits(model, TOKENS, 8, False)
    handle = model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: o * 1.5)
    try:
        before = native_decode.STEPS[0]
        hooked = step_logits(model, TOKENS, 8, True)
        assert native_decode.STEPS[0] == before  # the hook ran: the layers' own path
        assert torch.allclose(hooked, step_logits(model, TOKENS, 8, False))
        assert not torch.allclose(hooked, plain, atol=1e-3)
    finally:
        handle.remove()
    before = native_decode.STEPS[0]
    assert torch.allclose(step_logits(model, TOKENS, 8, True), plain, atol=1e-5)  # hook gone: native again
    assert native_decode.STEPS[0] > before


def test_weights_moved_since_the_plan_are_read_where_they_are():
    model = make()
    use_decode_layout(model)
    step_logits(model, TOKENS, 8, True)  # planned
    with torch.no_grad():
        down = model.layers[0].mlp.down_proj
        down.weight.data = down.weight.data * 0.5  # a new tensor
        model.layers[1].input_layernorm.weight.mul_(2.0)  # in place: same memory
    use_decode_layout(model, False)  # the fused matrices go; every weight row-major again
    before = native_decode.STEPS[0]
    ours = step_logits(model, TOKENS, 8, True)
    assert native_decode.STEPS[0] - before == RUN_CALLS
    assert torch.allclose(ours, step_logits(model, TOKENS, 8, False), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sliding_window": 8},
        {"mixer": "mamba2", "mlp": "none"},
        {"positions": "learned"},
        {"norm": "layernorm"},
        {"mlp": "moe", "moe_experts": 4, "moe_shared_d_ff": 32},
    ],
    ids=["window (a ring cache)", "mamba2", "learned positions", "layernorm", "moe with a shared expert"],
)
def test_architectures_it_lacks_take_the_layers_path(overrides):
    model = make(**overrides)
    before = native_decode.STEPS[0]
    ours = step_logits(model, TOKENS, 8, True)
    assert native_decode.STEPS[0] == before
    assert torch.equal(ours, step_logits(model, TOKENS, 8, False))


def test_states_it_does_not_run_take_the_layers_path():
    model = make()
    before = native_decode.STEPS[0]
    with torch.inference_mode():
        two = model.new_state(2, 48)  # two rows: native too
        model(torch.tensor([[1], [2]]), state=two, pos=torch.tensor([0]))
        one = model.new_state(1, 48)
        compact = model.new_state(1, 48, cache=KVCacheSpec(dtype="int8"))  # a quantized cache
        model(torch.tensor([[1]]), state=compact, pos=torch.tensor([0]))
        model(torch.tensor([[1]]), state=one, pos=torch.tensor([0]))
    assert native_decode.STEPS[0] == before + 2  # the plain caches, not the quantized one
    # a position past the cache: nothing written, and the layers' own error
    with torch.inference_mode(), pytest.raises((IndexError, RuntimeError)):
        model(torch.tensor([[1]]), state=one, pos=torch.tensor([48]))
    assert native_decode.STEPS[0] == before + 2


def test_other_simd_builds_compute_the_same_step(tmp_path, monkeypatch):
    """The AVX2 and portable-C paths of the whole step (what a CPU without AVX-512 runs) against the layers."""
    import ctypes

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler on x86-64")
    model = make()
    use_decode_layout(model)
    theirs = step_logits(model, TOKENS, 8, False)
    for flags in (("-mavx2", "-mfma", "-mno-avx512f"), ("-mno-avx2", "-mno-avx512f", "-mno-fma")):
        target = tmp_path / f"variant{len(flags)}{flags[0]}.so"
        cmd = [compiler, "-O2", *flags, "-shared", "-fPIC", "-std=c11", "-o", str(target), str(native.SOURCE), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True)
        lib = native.declare(ctypes.CDLL(str(target)))
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        monkeypatch.setattr(native, "f32_available", lambda: True)
        native_decode._PLANS.pop(model, None)
        before = native_decode.STEPS[0]
        ours = step_logits(model, TOKENS, 8, True)
        assert native_decode.STEPS[0] - before == RUN_CALLS
        assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max().item()), flags
    native_decode._PLANS.pop(model, None)


def test_dequantized_matmuls_turns_the_quantized_step_off(monkeypatch):
    """Inside `dequantized_matmuls()` the layers widen their weights (the reference); the native step must not run
    its int8 kernels there, and runs them again after."""
    from slmkit.models.quantized import dequantized_matmuls

    monkeypatch.setattr(native_decode, "RECHECK_CALLS", 1)

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from quant_decode import quantize_in_memory

    model = quantize_in_memory(make(d_model=64, d_ff=128), 8)
    with dequantized_matmuls():
        before = native_decode.STEPS[0]
        widened = step_logits(model, TOKENS, 8, True)
        assert native_decode.STEPS[0] == before
        assert torch.equal(widened, step_logits(model, TOKENS, 8, False))
    before = native_decode.STEPS[0]
    step_logits(model, TOKENS, 8, True)
    assert native_decode.STEPS[0] - before == RUN_CALLS
    with dequantized_matmuls():  # planned now, and still off inside the block
        before = native_decode.STEPS[0]
        assert torch.equal(step_logits(model, TOKENS, 8, True), widened)
        assert native_decode.STEPS[0] == before


@pytest.mark.parametrize("bits, overrides", [(None, {}), (8, {}), (None, MOE), (8, MOE)])
def test_rows_at_their_own_positions(bits, overrides):
    """Three rows of one state, prefilled to different lengths, then decoded together (pos (B, 1), each row its own
    position and cache row), and all at one position (pos (1,), upto): the layers' logits within 1e-5 (int8: 1e-4).
    A mixture of experts: each row routed to its own experts."""
    model = make(d_ff=128, **overrides)
    if bits:
        sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
        from quant_decode import quantize_in_memory

        model = quantize_in_memory(model, bits)
    else:
        use_decode_layout(model)
    lengths = [5, 9, 7]

    def run(native_on: bool) -> torch.Tensor:
        native_decode.ENABLED[0] = native_on
        try:
            state = model.new_state(3, 48)
            out = []
            with torch.inference_mode():
                for r, n in enumerate(lengths):
                    model(torch.tensor([TOKENS[r : r + n]]), state=state.rows(r, r + 1), pos=torch.arange(n))
                at = list(lengths)
                for step in range(6):  # rows at their own positions
                    idx = torch.tensor([[TOKENS[20 + step + r]] for r in range(3)])
                    pos = torch.tensor(at)[:, None]
                    out.append(model(idx, state=state, pos=pos, upto=max(at) + 1)[:, -1])
                    at = [p + 1 for p in at]
                shared = max(at)  # then every row at one position: [0, upto) attended, gaps and all, as the layers do
                for step in range(4):
                    idx = torch.tensor([[TOKENS[30 + step + r]] for r in range(3)])
                    out.append(model(idx, state=state, pos=torch.tensor([shared]), upto=shared + 1)[:, -1])
                    shared += 1
            return torch.stack(out)
        finally:
            native_decode.ENABLED[0] = True

    before = native_decode.STEPS[0]
    ours = run(True)
    assert native_decode.STEPS[0] - before == 3 + 10  # three prefills (a small model: up to 16 tokens), ten steps
    theirs = run(False)
    tol = 1e-4 if bits else 1e-5
    assert (ours - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_more_rows_than_max_take_the_layers_path():
    model = make()
    n = native_decode.MAX_ROWS + 1
    before = native_decode.STEPS[0]
    with torch.inference_mode():
        state = model.new_state(n, 16)
        model(torch.arange(n)[:, None], state=state, pos=torch.tensor([0]))
    assert native_decode.STEPS[0] == before


def test_a_model_refused_for_a_passing_reason_is_looked_at_again_later(monkeypatch):
    """A refusal that can pass (a hook) is not re-planned at every step (its check costs as much as a small step),
    but after RECHECK_CALLS calls."""
    monkeypatch.setattr(native_decode, "RECHECK_CALLS", 5)
    model = make()
    handle = model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: o)
    before = native_decode.STEPS[0]
    with torch.inference_mode():
        state = model.new_state(1, 48)
        model(torch.tensor([[1]]), state=state, pos=torch.tensor([0]))  # refused: [signature, 5]
        handle.remove()
        for p in range(1, 5):  # four more calls within the countdown: still the layers' path
            model(torch.tensor([[1]]), state=state, pos=torch.tensor([p]))
        assert native_decode.STEPS[0] == before
        model(torch.tensor([[1]]), state=state, pos=torch.tensor([5]))  # the countdown is out: looked at, planned
    assert native_decode.STEPS[0] == before + 1


@pytest.mark.parametrize("bits", [None, 8])
def test_a_few_tokens_of_one_row(bits):
    """Up to MAX_ROWS consecutive tokens of one row in one call (a speculative verification, a short prefill): every
    token's logits as the layers' (causal within the call), and more tokens than that take the layers' path."""
    model = make(d_ff=128)
    if bits:
        sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
        from quant_decode import quantize_in_memory

        model = quantize_in_memory(model, bits)

    def run(native_on: bool) -> torch.Tensor:
        native_decode.ENABLED[0] = native_on
        try:
            state = model.new_state(1, 48)
            out, at = [], 0
            with torch.inference_mode():
                for size in (3, 8, 1, 5, 2, 4):
                    chunk = torch.tensor([TOKENS[at : at + size]])
                    out.append(model(chunk, state=state, pos=torch.arange(at, at + size), upto=at + size)[0])
                    at += size
            return torch.cat(out)
        finally:
            native_decode.ENABLED[0] = True

    before = native_decode.STEPS[0]
    ours = run(True)
    assert native_decode.STEPS[0] - before == 6
    theirs = run(False)
    tol = 1e-4 if bits else 1e-5
    assert (ours - theirs).abs().max() <= tol * max(1.0, theirs.abs().max().item())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    before = native_decode.STEPS[0]
    n = native_decode.MAX_ROWS + 1  # past any model's limit
    with torch.inference_mode():
        model(torch.tensor([TOKENS[:n]]), state=model.new_state(1, 48), pos=torch.arange(n))
    assert native_decode.STEPS[0] == before


def test_larger_models_take_at_most_8_rows(monkeypatch):
    """Above SMALL_PARAMS the limit is LARGE_MODEL_ROWS (MKL's products win past it)."""
    monkeypatch.setattr(native_decode, "SMALL_PARAMS", 1000)  # the test model counts as large
    model = make()
    before = native_decode.STEPS[0]
    with torch.inference_mode():
        for n, native_calls in ((8, 1), (9, 0)):
            model(torch.tensor([TOKENS[:n]]), state=model.new_state(1, 48), pos=torch.arange(n))
            assert native_decode.STEPS[0] - before == native_calls
            before = native_decode.STEPS[0]
