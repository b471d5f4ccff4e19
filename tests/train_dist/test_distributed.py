"""Training on 2 processes (gloo, CPU): DDP and FSDP give one process's losses, checkpoints resume across
strategies and world sizes, and a rank that dies or hangs makes the others stop with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmkit.errors import UserError
from slmkit.interop.checkpoint import load_model
from slmkit.train.config import TrainConfig
from slmkit.train.distributed import resolve_strategy
from slmkit.train.loop import train

SRC = Path(__file__).resolve().parents[2] / "src"
TOL = 1e-5

# one process with batch 4 sees what 2 ranks with batch 2 see together
SETTINGS = dict(
    optimizer="adamw",  # these tests are about the strategies; Muon under ddp has its own test below
    preset="tiny",
    model={"max_seq_len": 64},
    seq_len=32,
    lr=3e-3,
    warmup_steps=2,
    grad_accum=2,
    eval_interval=1000,
    eval_batches=2,
    save_interval=3,
    max_steps=6,
    device="cpu",
    seed=7,
)


def cli_args(data_dir: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    args = ["train", "--data", str(data_dir), "--out", str(out), "--batch-size", str(batch_size)]
    args += ["--preset", "tiny", "--set", "max_seq_len=64", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2"]
    args += ["--grad-accum", "2", "--eval-interval", "1000", "--save-interval", "3", "--device", "cpu", "--seed", "7"]
    if "--optimizer" not in extra:
        args += ["--optimizer", "adamw"]  # as SETTINGS
    return [*args, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], logs: Path, world_size: int = 2) -> list[subprocess.Popen]:
    """What torchrun does for one node: one `python -m slmkit` per rank with the rendezvous variables."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
        out = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen([sys.executable, "-m", "slmkit", *args], stdout=out, stderr=out, env=env))
    return procs


def wait_all(procs: list[subprocess.Popen], logs: Path, timeout: float = 150) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [(logs / f"rank{r}.log").read_text() for r in range(len(procs))]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    return outputs


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOL, (a, b)


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = TOL) -> None:
    a, b = load_model(dir_a).state_dict(), load_model(dir_b).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(**SETTINGS, batch_size=4), data_dir, run)
    return run


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    outputs = wait_all(launch(cli_args(data_dir, root / "run", 2, "--max-steps", "6", "--strategy", "ddp"), root), root)
    assert "ddp on 2 processes (gloo)" in outputs[0]
    assert "stopped (steps)" not in outputs[1]  # only rank 0 reports
    return root / "run"


def test_ddp_matches_one_process_with_the_global_batch(ddp_run, single_run):
    assert_close(losses(ddp_run), losses(single_run))
    records = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # written once, by rank 0
    assert steps[-1]["tokens"] == 6 * 2 * 2 * 2 * 32  # steps x micro-batch x grad-accum x ranks x seq_len
    state = json.loads((ddp_run / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["tokens"] == steps[-1]["tokens"]
    assert_same_weights(ddp_run / "final", single_run / "final")


def test_fsdp_matches_ddp(ddp_run, data_dir, tmp_path):
    args = cli_args(data_dir, tmp_path / "run", 2, "--max-steps", "6", "--strategy", "fsdp")
    wait_all(launch(args, tmp_path), tmp_path)
    assert_close(losses(tmp_path / "run"), losses(ddp_run))
    # the sharded weights were gathered into one ordinary model directory
    assert_same_weights(tmp_path / "run" / "final", ddp_run / "final")
    assert_same_weights(tmp_path / "run" / "checkpoints" / "step-3", ddp_run / "checkpoints" / "step-3")


def test_ddp_checkpoint_resumes_in_one_process(ddp_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.rmtree(run / "final")  # as if the run died after its step-3 checkpoint
    with pytest.raises(UserError, match="needs processes launched by torchrun"):
        train(TrainConfig(), data_dir, run, resume=True)  # the run asked for ddp; one process must say so
    resumed = train(TrainConfig(), data_dir, run, resume=True, budget_overrides={"strategy": "single"})
    assert resumed.step == 6
    assert_close(resumed.losses, losses(ddp_run)[3:])
    assert_same_weights(run / "final", ddp_run / "final")


def test_single_checkpoint_resumes_under_fsdp(single_run, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    shutil.rmtree(run / "final")
    args = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--strategy", "fsdp"]
    outputs = wait_all(launch(args, tmp_path), tmp_path)
    assert "resuming from" in outputs[0] and "step 3" in outputs[0]
    assert_close(losses(run), losses(single_run))  # steps 1-3 kept from before, 4-6 trained sharded
    assert_same_weights(run / "final", single_run / "final")


def _start_long_run(data_dir: Path, tmp_path: Path, timeout_seconds: float) -> tuple[list[subprocess.Popen], Path]:
    config = tmp_path / "train.yaml"
    config.write_text(f"dist_timeout_seconds: {timeout_seconds}\n")
    run = tmp_path / "run"
    args = cli_args(data_dir, run, 2, "--max-steps", "100000", "--save-interval", "2", "--config", str(config))
    procs = launch(args, tmp_path)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step-*")):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("the run wrote no checkpoint: " + (tmp_path / "rank0.log").read_text()[-2000:])
        time.sleep(0.2)
    return procs, run


def _assert_stops_with_error(proc: subprocess.Popen, log: Path, within: float) -> str:
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the surviving rank still runs {within} s after the other rank died")
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    assert "error: rank 0 of 2: another rank failed or stopped answering" in text
    assert "Traceback" not in text
    return text


def test_killed_rank_stops_the_others(data_dir, tmp_path):
    procs, run = _start_long_run(data_dir, tmp_path, timeout_seconds=30)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    text = _assert_stops_with_error(procs[0], tmp_path / "rank0.log", within=60)
    assert "is intact; continue with --resume" in text
    model = load_model(run)  # the last checkpoint loads
    assert model.config.n_layers == 2


def test_hung_rank_times_out(data_dir, tmp_path):
    procs, run = _start_long_run(data_dir, tmp_path, timeout_seconds=5)
    procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the collective timeout can notice
    try:
        text = _assert_stops_with_error(procs[0], tmp_path / "rank0.log", within=60)
        assert "within 5 s" in text
    finally:
        procs[1].kill()
        procs[1].wait()
    load_model(run)


def test_strategy_must_fit_the_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_strategy("auto") == "single"
    assert resolve_strategy("single") == "single"
    for name in ("ddp", "fsdp"):
        with pytest.raises(UserError, match=f"--strategy {name} needs processes launched by torchrun"):
            resolve_strategy(name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_strategy("auto") == "ddp"
    assert resolve_strategy("fsdp") == "fsdp"
    with pytest.raises(UserError, match="--strategy single, but this process is one of WORLD_SIZE=2"):
        resolve_strategy("single")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        resolve_strategy("auto")
    with pytest.raises(UserError, match="unknown strategy 'zero'"):
        resolve_strategy("zero")
    with pytest.raises(UserError, match="strategy must be auto, single, ddp or fsdp"):
        TrainConfig(strategy="zero")
    with pytest.raises(UserError, match="dist_timeout_seconds must be > 0"):
        TrainConfig(dist_timeout_seconds=0)


def test_distributed_strategy_without_torchrun_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="--strategy fsdp needs processes launched by torchrun"):
        train(TrainConfig(**SETTINGS, batch_size=2, strategy="fsdp"), data_dir, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_bad_launch_environment_is_a_clear_error(monkeypatch):
    from slmkit.train.distributed import start

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="RANK and WORLD_SIZE must be set"):
        start("ddp", torch.device("cpu"), 5.0)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="rank 0: could not join the process group of 2 .*MASTER_ADDR"):
        start("ddp", torch.device("cpu"), 5.0)


def test_ddp_distillation_matches_one_process(data_dir, tiny_model_dir, tmp_path):
    """`slm distill` runs on the trainer's loop, so under torchrun it is data-parallel like `slm train`."""
    from slmkit.compress.distill import distill

    options = dict(seq_len=32, lr=3e-3, warmup_steps=2, max_steps=3, device="cpu", seed=7, optimizer="adamw")
    single = distill(tiny_model_dir, "tiny", data_dir, tmp_path / "single", TrainConfig(**options, batch_size=4))
    args = ["distill", "--teacher", str(tiny_model_dir), "--student", "tiny", "--data", str(data_dir)]
    args += ["--out", str(tmp_path / "ddp"), "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3"]
    args += ["--warmup-steps", "2", "--max-steps", "3", "--device", "cpu", "--seed", "7", "--optimizer", "adamw"]
    outputs = wait_all(launch(args, tmp_path / "logs"), tmp_path / "logs")
    assert "saved to" in outputs[0]
    assert json.loads((tmp_path / "ddp" / "final" / "trainer_state.json").read_text())["world_size"] == 2
    assert_close(losses(tmp_path / "ddp"), single.losses)
    # the teacher's soft targets add a softmax/KL per token whose sum the all-reduce orders differently: on an AMD
    # EPYC (MKL) one weight of 0.09 moved by 1.01e-5 in 3 steps, the rest by < 1.3e-6 (an Intel Xeon stayed < 1e-5)
    assert_same_weights(tmp_path / "ddp" / "final", tmp_path / "single" / "final", atol=3e-5)


def test_muon_under_ddp_matches_one_process(data_dir, tmp_path):
    # Muon orthogonalises each whole matrix; under ddp every rank holds it and the all-reduced gradient
    single = tmp_path / "single"
    train(TrainConfig(**{**SETTINGS, "optimizer": "muon"}, batch_size=4), data_dir, single)
    args = cli_args(data_dir, tmp_path / "run", 2, "--max-steps", "6", "--strategy", "ddp", "--optimizer", "muon")
    wait_all(launch(args, tmp_path / "logs"), tmp_path / "logs")
    # Orthogonalisation lifts a matrix's small singular directions to unit size, rounding noise with them: the
    # all-reduce's other summation order moved losses by 3e-5 and Muon's matrices by up to 6e-4 (of 0.08) in 6 steps
    ddp, one = losses(tmp_path / "run"), losses(single)
    assert len(ddp) == len(one) == 6 and max(abs(a - b) for a, b in zip(ddp, one, strict=True)) < 2e-4
    a, b = load_model(tmp_path / "run" / "final").state_dict(), load_model(single / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-3, rtol=0, msg=name)
    with pytest.raises(UserError, match="muon does not work under strategy fsdp"):
        TrainConfig(**{**SETTINGS, "optimizer": "muon"}, batch_size=2, strategy="fsdp")
