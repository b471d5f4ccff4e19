"""A run directory's bookkeeping: trainer state in checkpoints, which checkpoint to resume, pruning, metrics.

A run is `RUN/checkpoints/step-N/` and `RUN/final/`, each a model directory plus `trainer_state.pt`
(optimizer, sampler position, RNG states, counters) and `trainer_state.json` (the counters, readable),
`RUN/metrics.jsonl`, and the run's config file (`train_config.json`, `distill_config.json`, ...) that
`--resume` reads back. Training and distillation share every function here.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from slmkit.errors import UserError
from slmkit.interop.checkpoint import WEIGHTS, checkpoint_step, latest_checkpoint

STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"

_STEP_DIR = re.compile(r"^step-(\d+)$")


# what a run writes into its directory; `--overwrite` replaces these and leaves anything else there alone
RUN_ENTRIES = ("checkpoints", "final", "metrics.jsonl", "metrics.tmp")


def refuse_existing_run(run_dir: Path, config_file: str = "", overwrite: bool = False) -> None:
    """Before a new run into `run_dir`: refuse to write over what is there (an earlier run's checkpoints, or
    any other file) unless `overwrite`; with `overwrite`, remove the earlier run's files. A file given as
    the run dir, one under a file and an unwritable place are refused either way."""
    from slmkit.interop.outputs import OVERWRITE_HINT, check_output

    clean_killed_writes(run_dir)
    if not overwrite and run_dir.is_dir() and (latest_checkpoint(run_dir) or (run_dir / "final" / WEIGHTS).exists()):
        raise UserError(
            f"{run_dir}: run directory already has checkpoints; pass --resume to continue it, choose a new --out, "
            f"or {OVERWRITE_HINT}"
        )
    check_output(run_dir, "dir", overwrite=overwrite)
    if overwrite and run_dir.is_dir() and _is_main_process():
        for name in (*RUN_ENTRIES, *([config_file] if config_file else [])):
            entry = run_dir / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif os.path.lexists(entry):
                entry.unlink()


def clean_killed_writes(run_dir: Path) -> None:
    """Remove what writes killed mid-way left in a run dir (`.step-N.tmp-*`, `.final.tmp-*`) and put back a
    `final/` or `step-N/` that a kill between the two renames of its replacement left as `.NAME.old-PID`."""
    from slmkit.interop.outputs import clean_stale_temporaries

    if _is_main_process() and run_dir.is_dir():
        clean_stale_temporaries(run_dir)
        clean_stale_temporaries(run_dir / "checkpoints")


def _is_main_process() -> bool:
    """Rank 0 under torchrun (every rank checks the run dir; one removes an overwritten run's files)."""
    return os.environ.get("RANK", "0") == "0"


def latest_resumable(run_dir: Path, config_file: str, kind: str) -> Path:
    """The checkpoint a resumed run starts from: the later of the latest `step-N/` and `final/` that hold
    trainer state (a run extended past its budget is past its old `final/`). `kind` ("training",
    "distillation") names the run in the error."""
    if not (run_dir / config_file).is_file():
        raise UserError(
            f"{run_dir}: nothing to resume (no {kind} checkpoint: {config_file} is missing); "
            "start the run without --resume"
        )
    from slmkit.interop.outputs import check_output

    check_output(run_dir, "dir", overwrite=True)  # a resumed run writes there: it must be writable
    clean_killed_writes(run_dir)
    candidates = [
        p for p in (latest_checkpoint(run_dir), run_dir / "final") if p is not None and (p / STATE_PT).is_file()
    ]
    if not candidates:
        raise UserError(
            f"{run_dir}: run directory has no {kind} checkpoint to resume from; start it again without --resume"
        )
    return max(candidates, key=checkpoint_step)


def tokenized_with(tokenizer_json: Path, data: Any) -> bool:
    """Whether the data dir `data` (a `load_data_dir` result) was tokenized with this tokenizer.json."""
    from slmkit.data.tokenizer import file_sha256

    return tokenizer_json.is_file() and file_sha256(tokenizer_json) == data.meta.get("tokenizer_sha256")


def data_identity(data: Any) -> dict[str, Any]:
    """What a run records of its training data, so that a resume on other data is refused."""
    return {
        "tokenizer_sha256": data.meta.get("tokenizer_sha256"),
        "train_tokens": int(len(data.train)),
    }


def check_resume_data(checkpoint: Path, data: Any, data_dir: str | Path) -> None:
    """A resumed run continues on the data it started on: the tokenizer its checkpoints carry, and (for runs
    that recorded it) the same train split. Other data of the same vocabulary would train on silently."""
    if not tokenized_with(checkpoint / "tokenizer.json", data):
        raise UserError(
            f"{data_dir} was not tokenized with the tokenizer of the run being resumed ({checkpoint}); "
            "resume with the run's own data dir, or start a new run (--out elsewhere)"
        )
    try:
        recorded = json.loads((checkpoint / STATE_JSON).read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        recorded = {}
    tokens = recorded.get("train_tokens")
    if tokens is not None and tokens != len(data.train):
        raise UserError(
            f"{data_dir}: train split has {len(data.train):,} tokens, but the run being resumed ({checkpoint}) "
            f"trained on {tokens:,}; resume with the run's own data dir, or start a new run (--out elsewhere)"
        )


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the `keep` latest `checkpoints/step-N/` directories."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any] | torch.Tensor, device: torch.device) -> None:
    if isinstance(state, torch.Tensor):  # distillation checkpoints from before the shared loop: CPU state only
        state = {"torch": state}
    # the checkpoint is loaded with map_location=device, which moves these to the GPU; RNG states are CPU bytes
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_checkpoint(directory: Path, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint's full weights into the (unwrapped) model; return its trainer state."""
    from slmkit.interop.checkpoint import from_hf_state_dict, load_weights

    config = model.config  # type: ignore[attr-defined]
    weights = from_hf_state_dict(load_weights(directory), config)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{directory}: checkpoint does not match this run's model ({exc})") from None
    return load_trainer_state(directory / STATE_PT, device)


def load_trainer_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's trainer state: tensors, numbers, strings and containers of them only.

    It is read with `weights_only=True`, so a crafted run directory cannot run code when resumed: a pickle
    that names any other object (a function to call, a class to build) is refused.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing what it cannot load
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(GLOBAL|global) ([\w.]+)", str(exc))
        what = f" ({found.group(2)})" if found else ""
        raise UserError(
            f"{path}: trainer state holds objects other than tensors and numbers{what}; refused, since loading "
            "it could run code. Resume only runs you made, or start the run again without --resume"
        ) from None
    except Exception as exc:  # a truncated or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: unreadable trainer state ({first[:300]}); start the run again without --resume"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: trainer state is a {type(state).__name__}, expected a dict")
    return state


def trainer_state_writer(trainer_state: dict[str, Any], summary: dict[str, Any]) -> Any:
    """A function that adds the trainer state (`.pt`) and summary (`.json`) to a checkpoint being written."""

    def add_state(tmp: Path) -> None:
        torch.save(trainer_state, tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(summary, indent=2) + "\n")

    return add_state
