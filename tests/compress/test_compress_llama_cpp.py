"""Quantized GGUF files in llama.cpp (libllama from the prebuilt xllamacpp wheel): logits close to slmkit's own model.

Skipped where xllamacpp is not installed (`make install` installs the pinned version). llama.cpp's q8_0 / q4_1
matmuls also round the activations to 8 bits, so the tolerance is loose; a wrong layout would be off by whole
units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamacpp_peer import available
from slmkit.models.quantized import dequantized_matmuls
from slmkit_testing import llama_cpp_eval

pytestmark = pytest.mark.skipif(not available(), reason="xllamacpp (llama.cpp wheel) is not installed")


@pytest.mark.parametrize(
    "method, dtype, tolerance", [(None, "q8_0", 0.5), ("int8", "q8_0", 0.5), ("int4", "q4_1", 1.0)]
)
def test_llama_cpp_runs_quantized_gguf(tiny_model_dir, tmp_path, method, dtype, tolerance):
    from slmkit.api import load
    from slmkit.compress.pipeline import compress
    from slmkit.interop.gguf import export_gguf

    source = tiny_model_dir
    if method is not None:
        source = tmp_path / method
        compress(tiny_model_dir, method, source, measure=False)
    path = export_gguf(source, tmp_path / "m.gguf", dtype)
    lm = load(source)
    prompt = lm.tokenizer.encode("The model is trained on").ids
    # the file's weights against slmkit's exact dequantized matmul: its CPU kernels round activations to bf16, a
    # second approximation next to llama.cpp's 8-bit one that this briefly trained model's near-ties expose
    with torch.no_grad(), dequantized_matmuls():
        ours = lm.model(torch.tensor([prompt]))[0].numpy()
    _, theirs = llama_cpp_eval(path, prompt)
    assert np.abs(theirs - ours).max() < tolerance
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.8
