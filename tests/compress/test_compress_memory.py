"""Compressing a model with a product-key memory layer: the memory's gate and down projections are quantized like
an MLP's; its query, sub-keys and value table stay in float (a rounding error in a score changes which rows are
read, not just how much)."""

from __future__ import annotations

import pytest
import torch


# measured on 4 x 24 seeded tokens: 0.038 (the fallback corpus's 325-token vocabulary) to 0.055-0.066 (the shared
# corpus's 512, over 5 seeds): an int8 rounding that flips a memory row's top-k choice moves whole rows; a broken
# quantizer is off by ~1
@pytest.mark.parametrize("method,err", [("int8", 0.1)])
def test_int8_quantizes_the_memory_projections_and_keeps_the_tables(method, err, data_dir, tmp_path, make_model):
    from slmkit.compress.pipeline import CompressOptions, compress
    from slmkit.interop.checkpoint import load_model
    from slmkit.models.memory import ProductKeyMemory
    from slmkit.models.quantized import Int8Linear

    source = make_model(
        tmp_path / "float", data_dir, mlp_pattern=("memory", "gated"), memory_keys=16, memory_topk=4,
        memory_heads=2, memory_key_dim=16, family="slmkit",
    )  # fmt: skip
    out = tmp_path / method
    options = CompressOptions(group_size=32, calib_samples=4, calib_seq_len=32)
    compress(source, method, out, data=data_dir, options=options, measure=False, eval_windows=2)
    model = load_model(out)
    memory = model.layers[0].mlp
    assert isinstance(memory, ProductKeyMemory)
    assert isinstance(memory.gate_proj, Int8Linear) and isinstance(memory.down_proj, Int8Linear)
    assert type(memory.query_proj) is torch.nn.Linear and memory.values.weight.dtype == torch.float32
    assert isinstance(model.layers[1].mlp.up_proj, Int8Linear)
    # a fixed batch: the global RNG's state depends on which tests ran before
    idx = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(idx), load_model(source)(idx)
    assert (a - b).norm() / b.norm() < err
