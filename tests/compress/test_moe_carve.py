"""CMoE-style carving: a dense FFN split into a shared expert and routed experts with a training-free router."""

from __future__ import annotations

import pytest
import torch

from slmkit.compress.calibration import calibration_batches
from slmkit.compress.moe import carved_model
from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit_testing import run_slm


def val_loss(model, data_dir, windows: int = 16, seq_len: int = 64) -> float:
    from slmkit.data.shards import load_data_dir

    tokens = torch.as_tensor(load_data_dir(data_dir).val[: windows * seq_len + 1].astype("int64"))
    x = tokens[:-1].reshape(windows, seq_len)
    y = tokens[1:].reshape(windows, seq_len)
    with torch.no_grad():
        return model.loss(x, y).item()


@pytest.fixture(scope="module")
def dense_and_batches(tiny_model_dir, data_dir):
    return load_model(tiny_model_dir).eval(), calibration_batches(data_dir, tiny_model_dir, 32, 64)


@pytest.mark.parametrize("experts,shared", [(4, None), (8, 0), (2, 32)])
def test_all_experts_active_reproduce_the_dense_model(dense_and_batches, experts, shared):
    dense, batches = dense_and_batches
    carved, record, partitions = carved_model(dense, batches, experts, experts, shared)
    idx = torch.randint(0, dense.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(carved(idx), dense(idx), atol=1e-5)
    d_ff = dense.config.d_ff
    for layer in partitions:  # every neuron in exactly one expert or the shared one
        neurons = layer["shared"] + [n for group in layer["experts"] for n in group]
        assert sorted(neurons) == list(range(d_ff))
        assert len({len(g) for g in layer["experts"]}) == 1
    assert carved.config.num_params() == sum(p.numel() for p in carved.parameters())
    assert record["expert_width"] * experts + record["shared_neurons"] == d_ff


def test_shared_neurons_are_the_most_often_active(dense_and_batches):
    from slmkit.compress.moe import _activations

    dense, batches = dense_and_batches
    _, record, partitions = carved_model(dense, batches, 4, 2)
    acts = _activations(dense, batches)[0]
    k = round(0.1 * dense.config.d_ff)
    rate = torch.zeros_like(acts).scatter_(1, acts.topk(k, dim=1).indices, 1.0).mean(0)
    shared = set(partitions[0]["shared"])
    others = [n for n in range(dense.config.d_ff) if n not in shared]
    assert min(rate[list(shared)]) >= max(rate[others])


def mlp_error(dense, carved, batches) -> float:
    """Relative error of the carved MLPs' outputs against the dense ones, on each layer's real inputs."""
    inputs = []
    hooks = [b.mlp.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach())) for b in dense.layers]
    with torch.no_grad():
        for batch in batches:
            dense(batch)
    for h in hooks:
        h.remove()
    n = len(dense.layers)
    errors = []
    with torch.no_grad():
        for j, x in enumerate(inputs):
            ref, got = dense.layers[j % n].mlp(x), carved.layers[j % n].mlp(x)
            errors.append(((got - ref).norm() / ref.norm()).item())
    return sum(errors) / len(errors)


def test_carving_by_coactivation_beats_a_random_partition(dense_and_batches, tiny_model_dir, data_dir):
    dense, batches = dense_and_batches
    held_out = calibration_batches(data_dir, tiny_model_dir, 8, 64, seed=1)  # other windows than the calibration's
    carved, _, _ = carved_model(dense, batches, 8, 2)
    random, _, _ = carved_model(dense, batches, 8, 2, random_partition=True)
    # measured: 0.21 carved, 0.48 random (top-2 of 8 experts plus the shared one, on the tiny trained model)
    assert mlp_error(dense, carved, held_out) < mlp_error(dense, random, held_out)


def test_the_router_of_a_carved_model_learns(dense_and_batches):
    dense, batches = dense_and_batches
    carved, _, _ = carved_model(dense, batches, 4, 2)
    carved.train()
    x = batches[0][:, :-1]
    carved.loss(x, batches[0][:, 1:]).backward()
    assert carved.layers[0].mlp.gate.weight.grad.abs().sum() > 0  # the straight-through term reaches it


def test_compress_moe_carve_end_to_end_and_bad_inputs(tiny_model_dir, data_dir, tmp_path, capsys):
    from slmkit.cli import run

    r = run_slm("compress", tiny_model_dir, "--method", "moe-carve", "--experts", "4", "--top-k", "2", "--data",
                data_dir, "--out", tmp_path / "carved", "--no-measure", "--calib-samples", "8", "--calib-seq-len",
                "32", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    carved = load_model(tmp_path / "carved")
    assert carved.config.mlp == "moe" and carved.config.moe_weighting == "unit"
    assert (carved.config.moe_experts, carved.config.moe_top_k) == (4, 2)
    bad = [
        (["--experts", "4"], "needs calibration data"),  # no --data
        (["--experts", "4", "--shared", "3", "--data", data_dir], "must split into 4 equal experts"),
        (["--experts", "4", "--top-k", "5", "--data", data_dir], "--top-k between 1 and --experts"),
    ]
    bad.append((["--data", data_dir], "this model's mlp is 'moe'"))  # carving a carved model
    for i, (args, message) in enumerate(bad):
        source = tmp_path / "carved" if i == len(bad) - 1 else tiny_model_dir
        code = run(
            ["compress", str(source), "--method", "moe-carve", "--out", str(tmp_path / f"b{i}"), *map(str, args)]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and message in err, err
        assert not (tmp_path / f"b{i}").exists()


def test_carving_refuses_what_it_cannot_split(dense_and_batches):
    dense, batches = dense_and_batches
    with pytest.raises(UserError, match="calibration data"):
        carved_model(dense, [], 4, 2)
    with pytest.raises(UserError, match="--experts must be >= 2"):
        carved_model(dense, batches, 1, 1)
