"""Tree speculation (speculate="tree", after Token Recycling, Luo et al. 2024): a draft tree from the recycler's
adjacency matrix, verified in one forward with a tree attention mask; the longest path of the target's own greedy
choices is kept and its keys and values made contiguous. Greedy output equals plain greedy decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from slmkit.infer.core import DecodeCore, GenerationRequest, decode_greedy
from slmkit.infer.engine import Engine, EngineStats
from slmkit.infer.speculative import TokenRecycler, accept_tree, parse_tree_widths, tree_mask
from slmkit_testing import run_slm

PROMPTS = [
    "the model and the data and the model and the data and the",
    "Small language models are small. Small language models are",
    "A",
]
# a tree with branches at two depths: root 0; 1, 2 below it; 3, 4 below 1; 5 below 2; 6 below 4
TOKENS = [5, 7, 9, 11, 13, 17, 19]
PARENTS = [-1, 0, 0, 1, 1, 2, 4]
PATHS = [[0, 1, 3], [0, 1, 4, 6], [0, 2, 5]]  # root-to-leaf


def tiny(mixer: str = "attention", seed: int = 0) -> torch.nn.Module:
    from slmkit.config import preset
    from slmkit.models import build_model

    extra = {} if mixer == "attention" else {"mixer": mixer}
    model = build_model(preset("tiny", vocab_size=64, max_seq_len=96, **extra))
    model.init_weights(seed)
    return model.eval()


def test_tree_mask_and_accept_tree():
    mask = tree_mask(PARENTS)
    assert mask[6].nonzero().flatten().tolist() == [0, 1, 4, 6]
    assert mask[5].nonzero().flatten().tolist() == [0, 2, 5] and mask.sum().item() == 1 + 2 + 2 + 3 + 3 + 3 + 4
    target = [7, 13, 4, 0, 19, 0, 3]  # root -> 7 (node 1) -> 13 (node 4) -> 19 (node 6) -> then 3
    assert accept_tree(target, TOKENS, PARENTS) == ([1, 4, 6], [7, 13, 19, 3])
    assert accept_tree([9, 0, 17, 0, 0, 2, 0], TOKENS, PARENTS) == ([2, 5], [9, 17, 2])
    assert accept_tree([8] * 7, TOKENS, PARENTS) == ([], [8])  # fully rejected: the target's own token


def test_recycler_draft_tree_follows_the_template():
    recycler = TokenRecycler(vocab_size=10, top_k=3)
    recycler.successors[1] = [2, 3, 4]
    recycler.successors[2] = [5, 6, -1]
    recycler.successors[3] = [6, -1, -1]
    tokens, parents = recycler.draft_tree(1, [2, 2, 1])
    assert tokens == [1, 2, 3, 5, 6, 6] and parents == [-1, 0, 0, 1, 1, 2]  # 5 and 6 unseen: depth 3 is empty
    assert recycler.draft_tree(0, [4]) == ([0], [-1])


def test_parse_tree_widths():
    assert parse_tree_widths("4,2,1") == [4, 2, 1]
    for bad in ("", "4,x", "0,1", "9", ",".join(["8"] * 4)):
        with pytest.raises(ValueError):
            parse_tree_widths(bad)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_tree_forward_equals_separate_forwards_of_each_path(positions):
    """The strongest unit test: one tree forward's logits at every node equal a plain forward of that node's
    root-to-node path after the same prefix, and the path's keys and values land where the tree put them."""
    from slmkit.config import preset
    from slmkit.models import build_model

    model = build_model(preset("tiny", vocab_size=64, max_seq_len=96, positions=positions))
    model.init_weights(3)
    model.eval()
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    n = len(prefix)
    with torch.no_grad():
        state = model.new_state(1, 64)
        model(torch.tensor([prefix]), state=state, pos=torch.arange(n), upto=n)
        t = len(TOKENS)
        tree_logits = model(
            torch.tensor([TOKENS]), state=state, pos=torch.arange(n, n + t), upto=n + t, tree=tree_mask(PARENTS)
        )[0]
        for path in PATHS:
            ids = prefix + [TOKENS[i] for i in path]
            plain = model(torch.tensor([ids]))[0, n:]  # stateless: causal over the whole sequence
            torch.testing.assert_close(tree_logits[path], plain, atol=1e-5, rtol=1e-5)


def test_tree_forward_refuses_recurrent_state():
    model = tiny("mamba2")
    state = model.new_state(1, 32)
    assert not model.takes_tree(state)
    with pytest.raises(ValueError, match="takes_tree"):
        model(torch.tensor([[1, 2]]), state=state, pos=torch.arange(2), upto=2, tree=tree_mask([-1, 0]))


@pytest.mark.parametrize("case", ["second_branch", "full_first_branch", "chain", "rejected"])
def test_compacted_cache_equals_plain_decoding_cache(case):
    """After a verification pass (a path off the second branch; the first branch down to its leaf; a chain, fully
    accepted, whose slots are already in place; nothing), the output is greedy's and the row's keys and values
    (every layer) equal those of feeding the same tokens plainly."""
    model = tiny(seed=4)
    prompt = [1, 2, 3, 4, 5, 6]
    core = DecodeCore(model, None, max_batch=1, max_len=64)
    seq = core.admit(GenerationRequest(prompt, 20, detokenize=False, ignore_eos=True))
    greedy = decode_greedy(model, [prompt], 8)[0][0]
    with torch.inference_mode():
        core.step()  # prefill and the first token
        first = seq.pending
        nxt = greedy[1:]  # what greedy appends after `first`
        wrong = [(t + 1) % 64 for t in nxt]
        if case == "second_branch":  # root -> wrong | root -> right -> right -> right
            tokens, parents, accepted = [first, wrong[0], nxt[0], nxt[1], nxt[2]], [-1, 0, 0, 2, 3], 3
        elif case == "full_first_branch":  # root -> right -> right -> right (a leaf) | root -> wrong
            tokens, parents, accepted = [first, nxt[0], wrong[0], nxt[1], nxt[2]], [-1, 0, 0, 1, 3], 3
        elif case == "chain":  # the whole tree accepted, no slot moves
            tokens, parents, accepted = [first, nxt[0], nxt[1], nxt[2]], [-1, 0, 1, 2], 3
        else:
            tokens, parents, accepted = [first, wrong[0], (wrong[0] + 1) % 64, wrong[1]], [-1, 0, 0, 1], 0
        core.step(tree=(seq, tokens, parents))
        assert seq.out == greedy[: accepted + 2] and seq.accepted == accepted
        kept = prompt + seq.out[:-1]  # in the state: everything but the pending token
        assert seq.length == len(kept)
        ref = model.new_state(1, 64)
        model(torch.tensor([kept]), state=ref, pos=torch.arange(len(kept)), upto=len(kept))
        for i in range(len(model.layers)):
            got, want = core.state.layer(i), ref.layer(i)
            torch.testing.assert_close(got.k[0, :, : len(kept)], want.k[0, :, : len(kept)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.v[0, :, : len(kept)], want.v[0, :, : len(kept)], atol=1e-5, rtol=1e-5)
        while not seq.finished:  # decoding on from the compacted cache stays greedy
            core.step()
        assert seq.out == decode_greedy(model, [prompt], 20)[0][0]


@pytest.fixture(scope="module")
def shaken(lm):
    """The trained tiny model repeats itself (drafts mostly right); shaken weights vary its output."""
    model = copy.deepcopy(lm.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("which", ["trained", "shaken"])
def test_engine_tree_greedy_equals_plain_greedy(lm, shaken, which):
    model = lm.model if which == "trained" else shaken
    engine = Engine(model, lm.tokenizer)
    plain_engine = Engine(model, lm.tokenizer)
    for prompt in PROMPTS:
        for n in (1, 7, 40):
            [plain] = plain_engine.generate(prompt, max_new_tokens=n)
            for widths in ("4,2,1,1", "1,1,1,1,1,1", "3"):
                stats = EngineStats()
                [spec] = engine.generate(
                    prompt, max_new_tokens=n, speculate="tree", tree_widths=widths, min_acceptance=0.0, stats=stats
                )
                assert spec.token_ids == plain.token_ids, (which, prompt, n, widths)
                assert stats.tree_fallback is None
                if n == 40:
                    assert stats.rounds > 0 and stats.accepted <= stats.drafted
    if which == "trained":  # repetitive output: whole paths accepted
        stats = EngineStats()
        engine.generate(PROMPTS[0], max_new_tokens=40, speculate="tree", min_acceptance=0.0, stats=stats)
        assert stats.tokens_per_forward > 1.5
        assert "speculation (tree): accepted" in stats.summary()


def test_engine_tree_fully_rejected_still_greedy():
    """A random model whose matrix is filled with wrong successors: every tree is rejected at its root."""
    model = tiny(seed=5)
    engine = Engine(model, None)
    prompt = [[7, 8, 9, 10]]
    [plain] = Engine(model, None).generate_ids(prompt, max_new_tokens=24)
    engine.recycler = TokenRecycler(64)
    stats = EngineStats()
    engine.recycler.observe = lambda *a, **k: None  # keep the wrong matrix
    out = plain.token_ids
    for token in range(64):
        engine.recycler.successors[token] = [(token + 1 + j) % 64 for j in range(8)]
    for i, token in enumerate([*prompt[0], *out[:-1]]):
        nxt = out[i - len(prompt[0]) + 1] if i >= len(prompt[0]) - 1 else None
        if nxt is not None and nxt in engine.recycler.successors[token]:
            row = [s for s in range(64) if s != nxt][:8]
            engine.recycler.successors[token] = row
    [spec] = engine.generate_ids(prompt, max_new_tokens=24, speculate="tree", min_acceptance=0.0, stats=stats)
    assert spec.token_ids == out
    assert stats.rounds > 0 and stats.accepted == 0


@pytest.mark.parametrize("mixer", ["mamba2", "hybrid"])
def test_tree_falls_back_to_linear_recycle_on_recurrent_models(mixer):
    if mixer == "hybrid":
        from slmkit.config import preset
        from slmkit.models import build_model

        model = build_model(
            preset("tiny", vocab_size=64, max_seq_len=96, n_layers=2, layer_pattern=("mamba2", "attention"))
        )
        model.init_weights(0)
        model.eval()
    else:
        model = tiny(mixer)
    prompt = [[1, 2, 3, 1, 2, 3, 1, 2]]
    [plain] = Engine(model, None).generate_ids(prompt, max_new_tokens=24)
    stats = EngineStats()
    [spec] = Engine(model, None).generate_ids(
        prompt, max_new_tokens=24, speculate="tree", min_acceptance=0.0, stats=stats
    )
    assert spec.token_ids == plain.token_ids
    assert stats.tree_fallback is not None and "recurrent" in stats.tree_fallback
    assert "no tree" in stats.summary()


def test_tree_with_sampling_falls_back_to_linear_recycle(lm):
    from slmkit.infer.sampling import SamplingParams

    stats = EngineStats()
    sampling = SamplingParams(temperature=0.8, seed=1)
    [out] = Engine(lm.model, lm.tokenizer).generate(
        PROMPTS[0], max_new_tokens=12, sampling=sampling, speculate="tree", stats=stats
    )
    assert len(out.token_ids) > 0 and stats.tree_fallback is not None and "greedy" in stats.tree_fallback


def test_engine_tree_bad_options(lm):
    from slmkit.errors import UserError

    engine = Engine(lm.model, lm.tokenizer)
    with pytest.raises(UserError, match="tree widths"):
        engine.generate("A", max_new_tokens=4, speculate="tree", tree_widths="4,0")
    with pytest.raises(UserError, match="speculate='tree'"):
        engine.generate("A", max_new_tokens=4, speculate="recycle", tree_widths="4")


def test_cli_generate_speculate_tree(lm, tiny_model_dir):
    import json

    prompt = PROMPTS[0]
    [plain] = Engine(lm.model, lm.tokenizer).generate(prompt, max_new_tokens=16)
    r = run_slm(
        "generate", tiny_model_dir, "--prompt", prompt, "--max-new-tokens", 16, "--json", "--speculate", "tree",
        "--tree-widths", "3,2,1", "--verbose", "--device", "cpu",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == plain.token_ids
    assert "speculation (tree): accepted" in r.stderr


@pytest.mark.parametrize("case", ["sliding_window", "int8_cache"])
def test_tree_falls_back_on_windows_and_compressed_caches(case):
    from slmkit.config import preset
    from slmkit.models import build_model
    from slmkit.models.state import KVCacheSpec

    window = 8 if case == "sliding_window" else None
    model = build_model(preset("tiny", vocab_size=64, max_seq_len=96, sliding_window=window))
    model.init_weights(6)
    model.eval()
    cache = KVCacheSpec(dtype="int8") if case == "int8_cache" else None
    prompt = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]]
    [plain] = Engine(model, None, kv_cache=cache).generate_ids(prompt, max_new_tokens=24)
    stats = EngineStats()
    [spec] = Engine(model, None, kv_cache=cache).generate_ids(
        prompt, max_new_tokens=24, speculate="tree", min_acceptance=0.0, stats=stats
    )
    assert spec.token_ids == plain.token_ids
    assert stats.tree_fallback is not None and "sliding-window" in stats.tree_fallback


def test_batcher_tree_greedy_equals_plain(lm, shaken):
    """One running row: tree passes; several (rows joining): linear recycle drafts. Output is plain greedy's."""
    from slmkit.infer.batcher import ContinuousBatcher
    from slmkit_testing import run_batcher

    prompts = [lm.tokenizer.encode(p).ids for p in PROMPTS + ["The cat sat", "one two three one two three"]]
    for model in (lm.model, shaken):
        plain = ContinuousBatcher(model, lm.tokenizer, max_batch=3).run(
            [GenerationRequest(p, 28, detokenize=False) for p in prompts]
        )
        single = ContinuousBatcher(model, lm.tokenizer, max_batch=1, speculate="tree", tree_widths="3,2,1,1")
        assert single.tree_ok
        out = single.run([GenerationRequest(p, 28, detokenize=False) for p in prompts])
        assert [s.out for s in out] == [s.out for s in plain]
        assert single.stats.drafted > 0 and 0 <= single.stats.accepted <= single.stats.drafted
        joined = ContinuousBatcher(model, lm.tokenizer, max_batch=3, speculate="tree", speculate_k=5)
        spec = run_batcher(joined, [GenerationRequest(p, 28, detokenize=False) for p in prompts], join_after=2, steps=4)
        assert [s.out for s in spec] == [s.out for s in plain]
        if model is lm.model:  # the trained model's drafts are often right
            assert single.stats.tokens_per_forward > 1.0


def test_batcher_tree_off_for_recurrent_models_and_bad_widths():
    from slmkit.errors import UserError
    from slmkit.infer.batcher import ContinuousBatcher

    model = tiny("mamba2")
    batcher = ContinuousBatcher(model, None, max_batch=1, speculate="tree")
    assert not batcher.tree_ok
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    [plain] = ContinuousBatcher(model, None, max_batch=1).run([GenerationRequest(prompt, 20, detokenize=False)])
    [spec] = batcher.run([GenerationRequest(prompt, 20, detokenize=False)])
    assert spec.out == plain.out
    with pytest.raises(UserError, match="tree widths"):
        ContinuousBatcher(tiny(), None, speculate="tree", tree_widths="0")
    with pytest.raises(UserError, match="speculate='tree'"):
        ContinuousBatcher(tiny(), None, speculate="recycle", tree_widths="2")


def test_server_speculate_tree(lm):
    """`slm serve --speculate tree`: a request alone runs tree passes; the completion is plain greedy's."""
    from fastapi.testclient import TestClient

    from slmkit.serve.app import create_app

    engine = Engine(lm.model, lm.tokenizer)
    [plain] = Engine(lm.model, lm.tokenizer).generate(PROMPTS[0], max_new_tokens=24)
    with TestClient(create_app(engine, model_name="m", speculate="tree")) as client:
        body = {"model": "m", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
    assert r.json()["choices"][0]["text"] == plain.text
    [drafted] = [line for line in metrics.splitlines() if line.startswith("slm_speculative_drafted_tokens_total")]
    assert float(drafted.split()[-1]) > 0


def test_engine_tree_logprobs_equal_plain(lm):
    engine = Engine(lm.model, lm.tokenizer)
    [plain] = Engine(lm.model, lm.tokenizer).generate(PROMPTS[0], max_new_tokens=24, top_logprobs=2)
    stats = EngineStats()
    [spec] = engine.generate(
        PROMPTS[0], max_new_tokens=24, top_logprobs=2, speculate="tree", min_acceptance=0.0, stats=stats
    )
    assert spec.token_ids == plain.token_ids and stats.accepted > 0
    assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    assert [[t for t, _ in top] for top in spec.top_logprobs] == [[t for t, _ in top] for top in plain.top_logprobs]
