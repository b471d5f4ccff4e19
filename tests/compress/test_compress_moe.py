"""Compressing a mixture-of-experts model: every expert (and the shared expert) quantized, the router kept in
float (a rounding error there changes which experts run, not just how)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("method,err", [("int8", 0.2), ("int4", 0.55), ("gptq-int4", 0.55), ("awq-int4", 0.55)])
# int4 errors: 0.33 (rtn), 0.39 (gptq), 0.33 (awq) measured on this model against 0.28, 0.34, 0.26 for the dense one of
# the same shape (weights x5 on random tokens; a flipped routing decision adds to the rounding: int8 0.01 -> 0.08-0.17
# when a few of the top-2 choices flip, see tests/compress/test_family_matrix.py)
def test_compression_quantizes_every_expert_and_keeps_the_router(method, err, data_dir, tmp_path, make_model):
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.interop.checkpoint import load_model
    from slmkit.models.quantized import Int4Linear, Int8Linear

    quantized = Int8Linear if method == "int8" else Int4Linear  # gptq: experts see only their own tokens

    source = make_model(
        tmp_path / "float", data_dir, mlp="moe", moe_experts=4, moe_top_k=2, moe_shared_d_ff=64, family="slmkit"
    )
    out = tmp_path / method
    options = CompressOptions(group_size=32, calib_samples=4, calib_seq_len=32)
    compress(source, method, out, data=data_dir, options=options, measure=False, eval_windows=2)
    model = load_model(out)
    mlp = model.layers[1].mlp
    assert all(isinstance(getattr(e, n), quantized) for e in mlp.experts for n in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(mlp.shared_expert.down_proj, quantized)
    assert type(mlp.gate) is torch.nn.Linear
    idx = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(idx), load_model(source)(idx)
    assert (a - b).norm() / b.norm() < err
