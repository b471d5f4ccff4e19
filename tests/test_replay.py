"""Continued pre-training with replay: `slm train --init MODEL --replay OLD:FRACTION`."""

from __future__ import annotations

import json

import numpy as np
import torch

from slmkit.train.batches import ReplaySampler, WindowSampler
from slmkit_testing import run_slm, tiny_train_config


def samplers(fraction: float, rank: int = 0, world: int = 1) -> ReplaySampler:
    new = np.arange(0, 1000, dtype=np.int64)  # token ids < 1000: new data
    old = np.arange(5000, 6000, dtype=np.int64)  # >= 5000: replayed data
    return ReplaySampler(
        WindowSampler(new, 8, seed=1, rank=rank, world_size=world),
        WindowSampler(old, 8, seed=2, rank=rank, world_size=world),
        fraction,
    )


def test_replay_share_is_exact_and_resumable():
    sampler = samplers(0.1)
    batches = [sampler.next_batch(6) for _ in range(20)]
    replayed = sum(int((x[:, 0] >= 5000).sum()) for x, _ in batches)
    assert replayed == int(20 * 6 * 0.1)  # 12 of 120 rows, whatever the batch size
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])  # each row is one window of one source
    resumed = samplers(0.1)
    replay_to = samplers(0.1)
    for _ in range(7):
        replay_to.next_batch(6)
    resumed.position = replay_to.position
    for later in batches[7:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(6), later, strict=True))


def test_ranks_take_disjoint_rows_with_the_same_mix():
    ranks = [samplers(0.25, rank=r, world=2) for r in range(2)]
    for _ in range(5):
        x0, _ = ranks[0].next_batch(4)
        x1, _ = ranks[1].next_batch(4)
        assert int((x0[:, 0] >= 5000).sum()) == int((x1[:, 0] >= 5000).sum())
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())


def test_continued_training_logs_the_replayed_data_loss(tiny_model_dir, data_dir, tmp_path):
    from slmkit.train.loop import train

    cfg = tiny_train_config(
        preset="tiny", model={}, init=str(tiny_model_dir), replay=str(data_dir), replay_fraction=0.25, max_steps=3
    )
    result = train(cfg, data_dir, tmp_path / "run")
    assert "replay_val_loss" in result.val and np.isfinite(result.val["replay_val_loss"])
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["replay"] == str(data_dir) and saved["replay_fraction"] == 0.25


def test_replay_option_errors(tiny_model_dir, data_dir, tmp_path):
    for value in ("nofraction", f"{data_dir}:1.5", ":0.1"):
        done = run_slm(
            "train", "--data", data_dir, "--out", tmp_path / "r", "--init", tiny_model_dir, "--replay", value
        )
        assert done.returncode == 2 and "--replay expects DATA_DIR:FRACTION" in done.stderr
    done = run_slm(
        "train",
        "--data",
        data_dir,
        "--out",
        tmp_path / "r",
        "--init",
        tiny_model_dir,
        "--replay",
        f"{tmp_path / 'absent'}:0.1",
        "--max-steps",
        "1",
    )
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "absent" in done.stderr
