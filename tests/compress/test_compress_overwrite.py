"""`slm compress` never turns a user's file into a model directory, and replaces an existing directory only
with --overwrite."""

from __future__ import annotations

import pytest

from slmkit.compress.pipeline import compress
from slmkit.errors import UserError
from slmkit_testing import run_slm


def test_compress_refuses_a_file_even_with_overwrite(tiny_model_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for extra in ((), ("--overwrite",)):
        proc = run_slm("compress", tiny_model_dir, "--method", "int8", "--out", notes, "--no-measure", *extra)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "is a file" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert notes.read_text() == "mine"


def test_compress_replaces_a_directory_only_with_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    compress(tiny_model_dir, "int8", out, measure=False)
    first = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match=r"already exists \(pass --overwrite to replace it\)"):
        compress(tiny_model_dir, "int4", out, measure=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == first
    proc = run_slm("compress", tiny_model_dir, "--method", "int8", "--out", out, "--no-measure")
    assert proc.returncode == 2 and "pass --overwrite to replace it" in proc.stderr
    result = compress(tiny_model_dir, "int4", out, measure=False, overwrite=True)
    assert result.record["bits"] == 4
