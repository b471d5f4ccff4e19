"""The top-level Python API, as the README shows it."""

import subprocess
import sys

from slmkit.train.config import TrainConfig
from slmkit_testing import SRC


def test_readme_api_flow(tmp_path, corpus_file):
    import slmkit.train.loop as loop  # the subpackage stays importable as a package
    from slmkit.api import evaluate, generate, load, prepare, train

    assert callable(loop.train)
    prepare([str(corpus_file)], tmp_path / "data", vocab_size=400, val_fraction=0.1)
    cfg = TrainConfig(preset="tiny", seq_len=32, batch_size=4, max_steps=3, model={"max_seq_len": 64})
    result = train(cfg, tmp_path / "data", tmp_path / "run")
    assert result.step == 3
    lm = load(tmp_path / "run")
    assert isinstance(generate(lm, "Language", max_new_tokens=4), str)
    assert evaluate(lm, tmp_path / "data").bits_per_byte > 0


def test_import_slmkit_does_not_import_torch():
    code = "import sys, slmkit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "False", out.stderr
