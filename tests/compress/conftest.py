"""Small float models (random init, widths the int4 CPU kernel accepts) saved with the data_dir tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_model_dir(directory: Path, data_dir: Path, seed: int = 0, vectors: float = 0.0, **overrides) -> Path:
    """`vectors`: the scale of random noise added to 1-D parameters (biases start at zero and norms at one,
    where a method that mishandles them would go unnoticed)."""
    from slmkit.config import ModelConfig
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import save_model
    from slmkit.models import build_model

    data = load_data_dir(data_dir)
    fields = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    fields["vocab_size"] = data.vocab_size  # a larger vocab_size override pads the vocabulary
    fields.update(overrides)
    config = ModelConfig(bos_token_id=data.eot_token_id, eos_token_id=data.eot_token_id, **fields)
    model = build_model(config)
    model.init_weights(seed=seed)
    # larger than init-scale weights so that blocks matter and rounding errors are visible in the logits
    import torch

    from slmkit.models.mamba2 import Mamba2Mixer

    # Mamba-2's in_proj starts at the reference scale (bound 1/sqrt(width): std 0.072 at width 64, 3.6x the 0.02
    # of the other matrices); z, B and C multiply, so x5 on top of that swamps the logits with one layer. It is
    # brought to the others' 5 x 0.02 instead.
    ssm_inputs = {id(m.in_proj.weight) for m in model.modules() if isinstance(m, Mamba2Mixer)}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if id(p) in ssm_inputs:
                p.mul_(5.0 * 0.02 / float(p.std()))
            elif p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
            elif p.dim() == 1 and vectors:
                p.add_(torch.randn(p.shape, generator=gen) * vectors)
    return save_model(model, directory, tokenizer_dir=data_dir)


@pytest.fixture(scope="session")
def float_model_dir(tmp_path_factory, data_dir) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("compress") / "float", data_dir)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads are many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")  # a plain function: module-scoped fixtures may build models with it too
def make_model():
    """make_model(directory, data_dir, **config overrides) -> a saved random-init model dir."""
    return make_model_dir
