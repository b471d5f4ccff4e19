"""Outputs the user already has are not replaced without --overwrite, a file never by a directory (nor the
reverse), bad output paths are one `error:` line before any work, and killed writes are cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slmkit.errors import UserError
from slmkit.interop.outputs import check_output, clean_stale_temporaries, temp_prefix
from slmkit_testing import run_slm


def one_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# ---- export -------------------------------------------------------------------------------------------
def test_export_hf_refuses_an_existing_directory_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_error(run_slm("export", tiny_model_dir, "--format", "hf", "--out", out), "pass --overwrite to replace it")
    assert (out / "mine.txt").read_text() == "keep"
    proc = run_slm("export", tiny_model_dir, "--format", "hf", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()


def test_export_gguf_refuses_an_existing_file_without_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    one_error(run_slm("export", tiny_model_dir, "--format", "gguf", "--out", out), "pass --overwrite to replace it")
    assert out.read_text() == "mine"
    proc = run_slm("export", tiny_model_dir, "--format", "gguf", "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_export_never_swaps_a_file_and_a_directory(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_error(run_slm("export", tiny_model_dir, "--format", "hf", "--out", notes, "--overwrite"), "is a file")
    assert notes.read_text() == "mine"
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    one_error(run_slm("export", tiny_model_dir, "--format", "gguf", "--out", folder, "--overwrite"), "is a directory")
    assert folder.is_dir()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_out_under_a_file(tiny_model_dir, tmp_path, fmt):
    (tmp_path / "file").write_text("x")
    one_error(run_slm("export", tiny_model_dir, "--format", fmt, "--out", tmp_path / "file" / "sub" / "m"), "is a file")


def test_unwritable_output_is_one_error_line(tiny_model_dir, tmp_path):
    if os.geteuid() == 0:  # root writes through mode bits: use a place nobody may create files in
        place = "/proc/slmkit-out"
        if not os.path.isdir("/proc"):
            pytest.skip("no /proc here")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        place = str(locked / "out")
    one_error(run_slm("export", tiny_model_dir, "--format", "hf", "--out", place), "cannot write into")
    one_error(run_slm("export", tiny_model_dir, "--format", "gguf", "--out", f"{place}.gguf"), "cannot write into")
    with pytest.raises(UserError, match="cannot write into"):
        check_output(place, "dir")


# ---- other commands' output paths ---------------------------------------------------------------------
def test_prepare_train_card_and_report_paths(data_dir, tiny_model_dir, corpus_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    one_error(run_slm("data", "prepare", corpus_file, "--out", notes / "data", "--vocab-size", 300), "is a file")
    one_error(run_slm("data", "prepare", corpus_file, "--out", notes, "--vocab-size", 300), "is a file")
    one_error(run_slm("train", "--data", data_dir, "--out", notes, "--preset", "tiny", "--max-steps", 1), "is a file")
    one_error(run_slm("train", "--data", data_dir, "--out", notes / "run", "--max-steps", 1), "is a file")
    # eval --report is checked before the (slow) evaluation: a missing data dir would be reported after it
    proc = run_slm("eval", tiny_model_dir, "--data", tmp_path / "missing", "--report", notes / "r")
    one_error(proc, "--report", "is a file")
    assert notes.read_text() == "mine"
    if os.geteuid() == 0 and os.path.isdir("/proc"):
        one_error(run_slm("eval", tiny_model_dir, "--data", data_dir, "--report", "/proc/r"), "cannot write into")


def test_prepare_refuses_an_existing_data_dir_without_overwrite(corpus_file, tmp_path):
    data = tmp_path / "data"
    run = ("data", "prepare", corpus_file, "--out", data, "--vocab-size", 300, "--val-fraction", 0)
    assert run_slm(*run).returncode == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    (data / "mine.txt").write_text("mine")
    one_error(run_slm(*run, "--vocab-size", 260), "already exists", "--overwrite")
    assert (data / "mine.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != "mine.txt"} == before
    assert run_slm(*run, "--vocab-size", 260, "--overwrite").returncode == 0
    assert json.loads((data / "meta.json").read_text())["vocab_size"] == 260


def test_api_prepare_checks_out(corpus_file, tmp_path):
    import slmkit

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="lies under"):
        slmkit.prepare([str(corpus_file)], tmp_path / "f" / "data", vocab_size=300)
    slmkit.prepare([str(corpus_file)], tmp_path / "d", vocab_size=300, val_fraction=0)
    with pytest.raises(UserError, match="already exists"):
        slmkit.prepare([str(corpus_file)], tmp_path / "d", vocab_size=300, val_fraction=0)
    slmkit.prepare([str(corpus_file)], tmp_path / "d", vocab_size=300, val_fraction=0, overwrite=True)


# ---- killed writes --------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_cleaned_and_a_live_writers_kept(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale_dir = tmp_path / f".model.tmp-p{dead}-abc"
    old_style = tmp_path / ".model.tmp-k2j3h4"
    live_dir = tmp_path / f".model.tmp-p{alive}-xyz"
    stale_gguf = tmp_path / f".m.gguf.p{dead}-q1.tmp"
    live_gguf = tmp_path / f".m.gguf.p{alive}-q2.tmp"
    for d in (stale_dir, old_style, live_dir):
        d.mkdir()
        (d / "model.safetensors").write_text("half")
    for f in (stale_gguf, live_gguf):
        f.write_text("half")
    clean_stale_temporaries(tmp_path, "model")
    clean_stale_temporaries(tmp_path, "m.gguf")
    assert not stale_dir.exists() and not old_style.exists() and not stale_gguf.exists()
    assert live_dir.is_dir() and live_gguf.is_file()
    assert temp_prefix("x") == f".x.tmp-p{os.getpid()}-"


def test_a_lone_old_directory_is_put_back(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".model.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale_temporaries(tmp_path, "model")
    assert (tmp_path / "model" / "config.json").is_file() and not old.exists()
    # with `model` present, a dead process's .old copy is only garbage
    old.mkdir()
    clean_stale_temporaries(tmp_path, "model")
    assert not old.exists() and (tmp_path / "model" / "config.json").is_file()


def test_export_recovers_what_a_kill_left(tiny_model_dir, tmp_path):
    """A kill between the two renames of an atomic replace left only `.out.old-PID`; the next export into the
    same place puts it back first (so without --overwrite it is refused, as the output the user had)."""
    dead = _dead_pid()
    out = tmp_path / "exported"
    assert run_slm("export", tiny_model_dir, "--format", "hf", "--out", out).returncode == 0
    out.rename(tmp_path / f".exported.old-{dead}")
    (tmp_path / f".exported.tmp-p{dead}-zz").mkdir()
    (tmp_path / f".m.gguf.p{dead}-zz.tmp").write_text("half")
    from slmkit.interop.checkpoint import load_model, save_model

    save_model(load_model(tiny_model_dir), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".m.gguf.p{dead}-zz.tmp", "exported"]
    proc = run_slm("export", tiny_model_dir, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "m.gguf"]
