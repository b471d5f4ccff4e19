"""Per family: a tiny random transformers model, saved, loaded by slmkit, same logits and greedy text."""

from __future__ import annotations

import pytest
import torch
from _interop_models import CASES, VOCAB, hf_dirs  # noqa: F401

from slmkit.infer.generate import generate_ids
from slmkit.interop.checkpoint import load_model


def load_hf(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_generation_match_transformers(case, hf_dirs):  # noqa: F811
    directory = hf_dirs[case]
    theirs = load_hf(directory)
    ours = load_model(directory)
    assert ours.config.family == CASES[case][0]
    # past the trained context for dynamic rope scaling, where its base grows
    length = 24 if case == "llama-rope-dynamic" else 20
    idx = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() < 1e-4

    prompt = idx[0, :5].tolist()
    new = 10
    theirs.generation_config.eos_token_id = None  # run the full length on both sides; no token suppressed
    with torch.no_grad():
        hf_out = theirs.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert hf_out.shape[1] == len(prompt) + new
    assert list(generate_ids(ours, prompt, new)) == hf_out[0, len(prompt) :].tolist()
