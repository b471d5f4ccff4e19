"""The decode core's paths give the same greedy output: eager, the static (compiled) step with its inputs updated in
place, the static step rebuilding its inputs every step (the path before that change), batched vs one at a time,
rows that finish, free and are refilled mid-run, with stop strings and log-probabilities.

Most tests run the compiled step's code with torch.compile replaced by the identity (the same StaticStep, the same
input buffers, no compiler: seconds); one slow test compiles for real."""

from __future__ import annotations

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.infer.core import DecodeCore, GenerationRequest, decode_greedy
from slmkit.infer.engine import Engine
from slmkit.models import build_model

PROMPTS = ["Small language models", "The", "Scaling laws for neural language models predict"]


def sharp_model(seed: int = 0) -> torch.nn.Module:
    """A small random model with weights sharp enough that greedy paths differ between prompts."""
    cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=96)
    model = build_model(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)
    return model.eval()


@pytest.fixture
def no_compiler(monkeypatch):
    """torch.compile as the identity: the compiled step's code path (StaticStep over the whole state, inputs kept
    in place between steps) runs eagerly."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (n,), generator=gen).tolist() for n in lengths]


def run_core(model, requests, *, compile: bool, max_batch: int, rebuild: bool = False, admit_every: int = 0):
    """Token ids per request through one core; admit_every > 0: a waiting request enters whenever a row is free
    (as the batcher does), checked every step. rebuild: the static step's inputs made anew every step."""
    core = DecodeCore(model, None, max_batch=max_batch, max_len=model.config.max_seq_len, compile=compile)
    waiting = list(requests)
    seqs = []
    with torch.inference_mode():
        while waiting or core.rows:
            while waiting and core.free_rows:
                seqs.append(core.admit(waiting.pop(0)))
                if not admit_every:
                    continue
                break
            if rebuild:
                core._fed = []  # forget the last step's rows: the inputs are rebuilt from the rows (the old path)
            core.step()
    return [s.out for s in seqs], [[lp.logprob for lp in s.logprobs] for s in seqs]


def test_static_step_equals_eager_with_rows_that_finish_and_refill(no_compiler):
    model = sharp_model()
    prompts = prompts_of([5, 9, 3, 12, 7, 4])
    lengths = [20, 6, 14, 3, 25, 9]  # rows end at different steps; freed rows are refilled mid-run

    def requests():
        return [
            GenerationRequest(p, n, detokenize=False, ignore_eos=True, logprobs=True)
            for p, n in zip(prompts, lengths, strict=True)
        ]

    alone = [run_core(model, [r], compile=False, max_batch=1) for r in requests()]
    expected = [a[0][0] for a in alone]
    assert len({tuple(e[:3]) for e in expected}) > 1  # the prompts lead to different continuations
    for compile in (False, True):
        for rebuild in (False, True):
            tokens, logprobs = run_core(model, requests(), compile=compile, max_batch=3, rebuild=rebuild, admit_every=1)
            assert tokens == expected, (compile, rebuild)
            for got, (_, [want]) in zip(logprobs, alone, strict=True):
                assert got == pytest.approx(want, abs=1e-5)


def test_static_step_single_row_reused_after_release(no_compiler):
    """One row, sequences one after another: each new one starts at its own prompt length, not at the last
    sequence's position plus one."""
    model = sharp_model(1)
    prompts = prompts_of([4, 11, 6], seed=3)
    expected = [decode_greedy(model, [p], 15)[0][0] for p in prompts]
    core = DecodeCore(model, None, max_batch=1, max_len=96, compile=True)
    got = []
    with torch.inference_mode():
        for p in prompts:
            seq = core.admit(GenerationRequest(p, 15, detokenize=False, ignore_eos=True))
            while core.rows:
                core.step()
            got.append(seq.out)
    assert got == expected


def test_decode_greedy_compiled_path_equals_eager(no_compiler):
    model = sharp_model(2)
    prompts = prompts_of([6, 6, 10], seed=5)
    eager, _ = decode_greedy(model, prompts, 30)
    static, _ = decode_greedy(model, prompts, 30, compile=True)
    assert static == eager
    assert [decode_greedy(model, [p], 30)[0][0] for p in prompts] == eager  # batched equals alone


def test_engine_static_step_keeps_stop_strings_and_logprobs(lm, no_compiler):
    """Text cut at a stop string, finish reasons, log-probabilities and top log-probabilities: the same through the
    static step as eagerly, batched and alone."""
    eager = Engine(lm.model, lm.tokenizer)
    static = Engine(lm.model, lm.tokenizer, compile=True)
    free = eager.generate(PROMPTS, max_new_tokens=24)
    # a stop string from inside each continuation's text, so that every row stops early at its own step
    stop = [c.text[len(c.text) // 2 :][:3] for c in free if len(c.text) > 4]
    assert stop
    kwargs = dict(max_new_tokens=24, stop=stop, logprobs=True, top_logprobs=3)
    want = eager.generate(PROMPTS, **kwargs)
    assert any(c.finish_reason == "stop" for c in want)
    for outputs in (static.generate(PROMPTS, **kwargs), [static.generate([p], **kwargs)[0] for p in PROMPTS]):
        for got, ref in zip(outputs, want, strict=True):
            assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
            assert [[t for t, _ in k] for k in got.top_logprobs] == [[t for t, _ in k] for k in ref.top_logprobs]
    # streamed text deltas join to the same text
    assert "".join(static.stream(PROMPTS[0], max_new_tokens=24, stop=stop)) == want[0].text


def test_really_compiled_step_equals_eager_with_stops_and_logprobs(lm):
    """inductor's C++ step (one compilation, batch 3): stop strings and log-probabilities as eagerly."""
    eager = Engine(lm.model, lm.tokenizer)
    compiled = Engine(lm.model, lm.tokenizer, compile=True)
    kwargs = dict(max_new_tokens=16, stop=["e "], logprobs=True)
    want = eager.generate(PROMPTS, **kwargs)
    for got, ref in zip(compiled.generate(PROMPTS, **kwargs), want, strict=True):
        assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_cpu_engine_compiles_after_enough_tokens_with_the_same_output(lm, no_compiler, monkeypatch):
    import slmkit.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "AUTO_COMPILE_TOKENS", 20)
    monkeypatch.setattr(engine_module.native_decode, "applies", lambda model: False)  # a model it does not run
    engine = Engine(lm.model, lm.tokenizer)  # compile=None: left to choose
    explicit_eager = Engine(lm.model, lm.tokenizer, compile=False)
    first = engine.generate(PROMPTS, max_new_tokens=8)  # 24 tokens: the rule turns compilation on
    assert not engine._static and engine.compile
    second = engine.generate(PROMPTS, max_new_tokens=8)
    assert engine._static  # this batch ran on the static (compiled) core
    want = explicit_eager.generate(PROMPTS, max_new_tokens=8)
    assert [c.token_ids for c in first] == [c.token_ids for c in second] == [c.token_ids for c in want]
    explicit_eager.generate(PROMPTS, max_new_tokens=8)
    assert not explicit_eager.compile  # compile=False stays eager


def test_cpu_engine_stays_eager_where_the_native_step_runs(lm, monkeypatch):
    """The native decode step (slmkit.models.native_decode) is faster than the compiled one: no auto-compile."""
    import slmkit.infer.engine as engine_module
    from slmkit.models import native_decode

    if not native_decode.applies(lm.model):
        pytest.skip("native kernels not built (no C compiler?)")
    monkeypatch.setattr(engine_module, "AUTO_COMPILE_TOKENS", 20)
    engine = Engine(lm.model, lm.tokenizer)
    engine.generate(PROMPTS, max_new_tokens=8)
    engine.generate(PROMPTS, max_new_tokens=8)
    assert not engine.compile and not engine._static
