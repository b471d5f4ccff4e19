"""File safety of runs and model directories: resuming loads no code, shard indexes stay in their directory,
resume refuses other data, killed writes are cleaned up, written files follow the umask."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from slmkit.errors import UserError
from slmkit.train.config import TrainConfig
from slmkit.train.loop import train
from slmkit_testing import run_slm
from slmkit_testing import tiny_train_config as cfg


class _RunsCode:
    """Unpickling this calls os.system: what a crafted trainer_state.pt would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_code(state_path, marker) -> None:
    state = torch.load(state_path, weights_only=True)
    state["rng"] = _RunsCode(str(marker))
    with open(state_path, "wb") as fh:
        pickle.dump(state, fh)  # a plain pickle: torch.load reads those too


# ---- 1. trainer state loads no code -------------------------------------------------------------------
def test_resume_refuses_a_pickle_that_runs_code(data_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg(max_steps=2), data_dir, run)
    marker = tmp_path / "pwned"
    _plant_code(run / "final" / "trainer_state.pt", marker)
    with pytest.raises(UserError, match="trainer_state.pt: trainer state holds objects other than tensors.*refused"):
        train(TrainConfig(), data_dir, run, resume=True, budget_overrides={"max_steps": 3})
    assert not marker.exists()


def test_cli_resume_refuses_a_pickle_that_runs_code(data_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg(max_steps=2), data_dir, run)
    marker = tmp_path / "pwned"
    _plant_code(run / "final" / "trainer_state.pt", marker)
    proc = run_slm("train", "--data", data_dir, "--out", run, "--resume", "--max-steps", 3)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_trainer_state_is_plain_data(data_dir, tmp_path):
    """What a run saves loads with weights_only=True (tensors, numbers, strings), and resuming is exact."""
    full = train(cfg(max_steps=6), data_dir, tmp_path / "full")
    part = train(cfg(max_steps=6, save_interval=3), data_dir, tmp_path / "part")
    state = torch.load(tmp_path / "part" / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and isinstance(state["rng"]["torch"], torch.Tensor)
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train(TrainConfig(), data_dir, tmp_path / "part", resume=True)
    assert resumed.losses == full.losses[3:] == part.losses[3:]


# ---- 2. shard index names stay in the directory ---------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_shard_index_names_stay_in_the_directory(tiny_model_dir, tmp_path, name):
    from slmkit.interop.checkpoint import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    (model_dir / "sub").mkdir()
    shutil.copyfile(weights, tmp_path / "x.safetensors")
    shutil.copyfile(weights, model_dir / "sub" / "model.safetensors")
    weights.unlink()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, name)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="may only name files beside it"):
        load_model(model_dir)


def test_cli_shard_index_escape_is_one_error_line(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": str(tmp_path / "outside.safetensors")}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = run_slm("generate", model_dir, "--prompt", "a", "--max-new-tokens", 1, "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "may only name files beside it" in proc.stderr


# ---- 6. written files follow the umask ------------------------------------------------------------------
def test_saved_weights_follow_the_umask(tiny_model_dir, tmp_path):
    code = (
        "import os, sys; os.umask(0o022)\n"
        "from slmkit.interop.checkpoint import load_model, save_model\n"
        "save_model(load_model(sys.argv[1]), sys.argv[2], max_shard_bytes=sys.maxsize)\n"
        "save_model(load_model(sys.argv[1]), sys.argv[3], max_shard_bytes=20000)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(
        [sys.executable, "-c", code, tiny_model_dir, tmp_path / "one", tmp_path / "sharded"], check=True, env=env
    )
    files = [p for d in ("one", "sharded") for p in (tmp_path / d).iterdir()]
    assert any(p.name.startswith("model-00002") for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "one").stat().st_mode) == 0o755


# ---- 4. resume on the run's own data only ---------------------------------------------------------------
def test_resume_refuses_other_data(data_dir, corpus_file, tmp_path):
    from slmkit.data.prepare import prepare

    run = tmp_path / "run"
    train(cfg(max_steps=2), data_dir, run)
    tokenizer = (run / "final" / "tokenizer.json").read_bytes()
    lines = corpus_file.read_text().splitlines()
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    same_vocab = tmp_path / "same-vocab"  # the run's tokenizer, other text
    prepare([str(half)], same_vocab, vocab_size=None, tokenizer=data_dir / "tokenizer.json", val_fraction=0.1)
    other_tok = tmp_path / "other-tok"  # a tokenizer of the same size trained on other text
    prepare([str(half)], other_tok, vocab_size=512, val_fraction=0.1)
    with pytest.raises(UserError, match="trained on"):
        train(TrainConfig(), same_vocab, run, resume=True, budget_overrides={"max_steps": 3})
    proc = run_slm("train", "--data", other_tok, "--out", run, "--resume", "--max-steps", 3)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "not tokenized with" in proc.stderr
    assert (run / "final" / "tokenizer.json").read_bytes() == tokenizer
    assert json.loads((run / "final" / "trainer_state.json").read_text())["step"] == 2
    more = train(TrainConfig(), data_dir, run, resume=True, budget_overrides={"max_steps": 3})
    assert more.step == 3


# ---- 3. train does not empty a directory of the user's ------------------------------------------------
def test_train_refuses_a_non_run_directory_without_overwrite(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"pass --overwrite to replace it"):
        train(cfg(max_steps=1), data_dir, run)
    assert (run / "metrics.jsonl").read_text().startswith('{"step": 1')
    proc = run_slm("train", "--data", data_dir, "--out", run, "--preset", "tiny", "--max-steps", 1)
    assert proc.returncode == 2 and "pass --overwrite to replace it" in proc.stderr and "Traceback" not in proc.stderr
    train(cfg(max_steps=1), data_dir, run, overwrite=True)
    assert (run / "final" / "model.safetensors").is_file() and (run / "notes.md").read_text() == "mine"
    with pytest.raises(UserError, match="pass --resume to continue it.*--overwrite"):
        train(cfg(max_steps=1), data_dir, run)


# ---- 5. a resumed run cleans up what a kill left --------------------------------------------------------
def test_resume_cleans_killed_checkpoint_writes(data_dir, tmp_path):
    run = tmp_path / "run"
    train(cfg(max_steps=4, save_interval=2), data_dir, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # killed mid-write of step-4, and between the renames that replace final/
    (run / "checkpoints" / f".step-4.tmp-p{dead.pid}-ab").mkdir()
    (run / "checkpoints" / ".step-6.tmp-oldstyle").mkdir()
    (run / "final").rename(run / f".final.old-{dead.pid}")
    more = train(TrainConfig(), data_dir, run, resume=True, budget_overrides={"max_steps": 5})
    assert more.step == 5  # resumed from the recovered final/ (step 4), not from step-2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert not any(p.name.startswith(".") for p in run.iterdir())
