"""Domain mixtures: `slm train --mix code=0.7,papers=0.3` (MixtureSampler, realised shares, exact resume)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from slmkit.errors import UserError
from slmkit.train.batches import MixtureSampler, WindowSampler
from slmkit.train.config import TrainConfig
from slmkit.train.loop import train
from slmkit_testing import mixed_data_dir, run_slm, tiny_train_config


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, corpus_file):
    return mixed_data_dir(tmp_path_factory.mktemp("mixed"), corpus_file)


def sampler(shares: dict[str, float], rank: int = 0, world: int = 1) -> MixtureSampler:
    # domain i holds token ids i*1000 .. i*1000+999, so a row's first token says where it came from
    samplers = {
        name: WindowSampler(
            np.arange(i * 1000, i * 1000 + 1000, dtype=np.int64), 8, seed=i, rank=rank, world_size=world
        )
        for i, name in enumerate(shares)
    }
    return MixtureSampler(samplers, shares)


def origins(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // 1000).tolist()


@pytest.mark.parametrize("shares", [{"a": 0.7, "b": 0.3}, {"a": 0.13, "b": 0.5, "c": 0.37}, {"a": 5, "b": 1}])
@pytest.mark.parametrize("batch", [1, 6, 16])
def test_realised_shares_track_the_target(shares, batch):
    mix = sampler(shares)
    total = sum(shares.values())
    counts = np.zeros(len(shares))
    for step in range(1, 61):
        x, y = mix.next_batch(batch)
        assert torch.equal(x[:, 1:], y[:, :-1])  # every row is one window of one domain
        np.add.at(counts, origins(x), 1)
        rows = step * batch
        # within one row of the exact share at every step; within 1% once there are 100 rows
        assert np.all(np.abs(counts - rows * np.array(list(shares.values())) / total) < 1 + 1e-9)
        if rows >= 100:
            assert np.all(np.abs(counts / rows - np.array(list(shares.values())) / total) < 0.01)
    assert mix.realised_shares() == {name: c / counts.sum() for name, c in zip(shares, counts, strict=True)}


def test_resume_from_the_position_continues_the_same_batches():
    shares = {"a": 0.2, "b": 0.3, "c": 0.5}
    full = sampler(shares)
    batches = [full.next_batch(5) for _ in range(12)]
    head = sampler(shares)
    for _ in range(5):
        head.next_batch(5)
    resumed = sampler(shares)
    resumed.position = json.loads(json.dumps(head.position))  # as the trainer state stores it
    for later in batches[5:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(5), later, strict=True))


def test_ranks_take_the_same_mix_of_disjoint_windows():
    shares = {"a": 0.25, "b": 0.75}
    ranks = [sampler(shares, rank=r, world=2) for r in range(2)]
    single = sampler(shares)
    for _ in range(6):
        x0, _ = ranks[0].next_batch(4)
        x1, _ = ranks[1].next_batch(4)
        assert sorted(origins(x0)) == sorted(origins(x1))
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())
    # together the ranks saw what one process with the global batch sees
    seen = {tuple(r.position) for r in ranks}
    single.next_batch(6 * 8)
    assert seen == {tuple(single.position)}


def test_training_logs_realised_shares_and_domain_val_losses(mixed, tmp_path):
    result = train(tiny_train_config(max_steps=3, mix={"code": 0.7, "papers": 0.3}), mixed, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["share/code"] == pytest.approx(0.7, abs=1 / 12) and "share/numbers" not in steps[-1]
    assert steps[-1]["share/code"] + steps[-1]["share/papers"] == pytest.approx(1.0)
    for name in ("code", "papers", "numbers"):  # every domain's val loss, trained on or not
        assert np.isfinite(result.val[f"val_loss/{name}"]) and f"val_bits_per_byte/{name}" in result.val
    # each is the loss on that domain's val range
    from slmkit.data.shards import load_data_dir
    from slmkit.interop.checkpoint import load_model
    from slmkit.train.validation import token_nats

    data = load_data_dir(mixed)
    model = load_model(tmp_path / "run" / "final")
    nats, count = token_nats(model, data.domain("numbers").tokens(data, "val"), 32, 4, 4)
    assert result.val["val_loss/numbers"] == pytest.approx(nats / count, rel=1e-5)
    assert len({round(result.val[f"val_loss/{n}"], 4) for n in ("code", "papers", "numbers")}) == 3


def test_resume_mid_mixture_equals_uninterrupted(mixed, tmp_path):
    def cfg(**changes):
        return tiny_train_config(max_steps=6, mix={"code": 0.5, "papers": 0.3, "numbers": 0.2}, **changes)

    full = train(cfg(), mixed, tmp_path / "full")
    train(cfg(save_interval=3), mixed, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "final")
    state = torch.load(tmp_path / "part" / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert isinstance(state["sampler_position"], list) and len(state["sampler_position"]) == 3
    resumed = train(TrainConfig(), mixed, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[3:]
    weights = "model.safetensors"
    assert (tmp_path / "part" / "final" / weights).read_bytes() == (tmp_path / "full" / "final" / weights).read_bytes()


def test_mix_errors(mixed, corpus_file, tmp_path):
    with pytest.raises(UserError, match="unknown domain"):
        train(tiny_train_config(max_steps=1, mix={"code": 1, "poetry": 1}), mixed, tmp_path / "a")
    for bad in ({"code": 0}, {"code": -1}, {"code": float("nan")}, {}):
        with pytest.raises(UserError, match="mix"):
            tiny_train_config(max_steps=1, mix=bad)
    with pytest.raises(UserError, match="replay and mix cannot be combined"):
        tiny_train_config(max_steps=1, mix={"code": 1}, replay=str(mixed))
    with pytest.raises(UserError, match="curriculum and mix cannot be combined"):
        tiny_train_config(max_steps=1, mix={"code": 1}, curriculum="decomposition")
    old = tmp_path / "old"
    shutil.copytree(mixed, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["domains"]
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="records no domains"):
        train(tiny_train_config(max_steps=1, mix={"all": 1}), old, tmp_path / "b")
    for value, message in (("code=0.7,papers", "--mix expects"), ("code=x", "--mix expects"), ("code=0", "positive")):
        done = run_slm("train", "--data", mixed, "--out", tmp_path / "c", "--max-steps", "1", "--mix", value)
        assert done.returncode == 2 and done.stderr.count("error:") == 1 and message in done.stderr, done.stderr
    done = run_slm("train", "--data", mixed, "--out", tmp_path / "d", "--max-steps", "1", "--mix", "code=1,poetry=1")
    assert done.returncode == 2 and "poetry" in done.stderr and "code, papers, numbers" in done.stderr
