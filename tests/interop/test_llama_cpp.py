"""Our GGUF in llama.cpp (through llama-cpp-python): same greedy continuation and close logits.

Skipped where `llama_cpp` is not installed (it builds llama.cpp from source; CI need not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slmkit_testing import llama_cpp_eval

pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-3), ("q8_0", 0.5)])
def test_llama_cpp_matches_slmkit(tiny_model_dir, tmp_path, dtype, tolerance):
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
    if dtype == "f32":
        llm.reset()
        continuation = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            continuation.append(token)
            if len(continuation) == 12:
                break
        assert continuation == list(generate_ids(lm.model, prompt, 12))


def test_llama_cpp_runs_a_mamba_export_with_our_logits(tiny_model_dir, tmp_path):
    """llama.cpp's `mamba` architecture on our GGUF (tests/interop/test_mamba_hf.py checks the file itself)."""
    import json
    import shutil

    from slmkit.config import preset
    from slmkit.interop.checkpoint import save_model
    from slmkit.interop.gguf import export_gguf
    from slmkit.models import build_model

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = build_model(preset("micro-mamba", vocab_size=vocab, d_model=64, n_layers=2)).eval()
    model.init_weights(seed=0)
    save_model(model, tmp_path / "m")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    path = export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    prompt = list(range(1, 20))
    _, theirs = llama_cpp_eval(path, prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(theirs - ours).max() < 1e-3
