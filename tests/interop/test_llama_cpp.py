"""Our GGUF in llama.cpp (the prebuilt xllamacpp wheel, tests/llamacpp_peer.py): same greedy continuation through
its llama-server, close logits and the same perplexity through libllama.

Skipped where xllamacpp is not installed (`make install` installs the pinned version)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llamacpp_peer import available
from slmkit_testing import llama_cpp_eval

pytestmark = pytest.mark.skipif(not available(), reason="xllamacpp (llama.cpp wheel) is not installed")


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def test_declared_structs_match_the_library():
    """The struct sizes the library writes and the defaults it fills in land on our declared fields."""
    from llamacpp_peer import check_layout, library

    check_layout(library())


# f32: same greedy tokens, logits within 1e-4 and perplexity to 1e-5 relative (measured: 1.4e-6, equal to 6
# digits); q8_0 and q4_1 within the gaps docs/interop.md gives (measured: 0.0095 / 0.063 logits, perplexity
# +0.000% / +0.017%; llama.cpp also rounds activations to 8 bits in these matmuls).
@pytest.mark.parametrize("dtype, tolerance, ppl_gap", [("f32", 1e-4, 1e-5), ("q8_0", 0.05, 0.002), ("q4_1", 0.3, 0.01)])
def test_llama_cpp_matches_slmkit(tiny_model_dir, tmp_path, corpus_file, dtype, tolerance, ppl_gap):
    from llamacpp_peer import llama_server_greedy
    from slmkit.api import load
    from slmkit.infer.generate import generate_ids
    from slmkit.interop.gguf import export_gguf

    path = export_gguf(tiny_model_dir, tmp_path / "m.gguf", dtype)
    lm = load(tiny_model_dir)
    prompt = lm.tokenizer.encode("The model is trained on").ids
    llm, theirs = llama_cpp_eval(path, prompt)  # f32 KV cache
    with torch.no_grad():
        ours = lm.model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() < tolerance

    window = lm.tokenizer.encode(json.loads(corpus_file.read_text().splitlines()[0])["text"]).ids[:120]
    with torch.no_grad():
        ours_ppl = _perplexity(lm.model(torch.tensor([window]))[0].numpy(), window)
    theirs_ppl = _perplexity(llm.logits(window), window)
    assert abs(theirs_ppl / ours_ppl - 1) < ppl_gap, (theirs_ppl, ours_ppl)

    if dtype == "f32":
        tokens, rate = llama_server_greedy(path, prompt, 12)
        assert tokens == list(generate_ids(lm.model, prompt, 12))
        assert rate > 0


# mamba, mamba2 and yarn exports in llama.cpp: tests/interop/test_gguf_llama_cpp_more.py
