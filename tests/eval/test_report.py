"""Efficiency measurement, report.json/report.html with Pareto fronts, and model cards."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from evalfixtures import MC_EXAMPLES, one_thread, write_jsonl  # noqa: F401

from slmkit.errors import UserError
from slmkit.eval.report import pareto_front, write_report

SMALL = {"prompt_tokens": 8, "new_tokens": 6, "batch_size": 2, "repeats": 1}


@pytest.fixture(scope="module")
def second_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A different model of the same shape: the tiny model with its weights perturbed and re-saved."""
    from slmkit.interop.checkpoint import load_model, save_model

    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("models") / "noisy"
    save_model(model, out, tokenizer_dir=tiny_model_dir)
    return out


@pytest.fixture(scope="module")
def report(tiny_model_dir, second_model, tmp_path_factory):
    from slmkit.eval.runner import run_eval

    tmp = tmp_path_factory.mktemp("report")
    task = write_jsonl(tmp / "mc.jsonl", MC_EXAMPLES)
    text = tmp / "doc.txt"
    text.write_text("Small language models are trained on small corpora within a compute budget. " * 8)
    return run_eval(
        [tiny_model_dir, second_model],
        data=[text],
        tasks=[str(task)],
        templates=["plain", "qa"],
        efficiency=True,
        efficiency_options={**SMALL, "threads": 1},
        isolate_efficiency=False,  # the CLI test covers the fresh-process path
    )


def test_measure_efficiency(tiny_model_dir):
    from slmkit.eval.efficiency import measure_efficiency
    from slmkit.interop.hf import load_config

    config = load_config(tiny_model_dir / "config.json")
    e = measure_efficiency(tiny_model_dir, **SMALL)
    assert e["params"] == config.num_params() and e["non_embedding_params"] == config.num_params(False)
    assert e["train_flops_per_token"] == config.flops_per_token() == 3 * e["forward_flops_per_token"]
    assert e["weights_bytes"] == (tiny_model_dir / "model.safetensors").stat().st_size
    assert e["peak_rss_bytes"] >= e["rss_before_load_bytes"] > 0
    for key in ("time_to_first_token_ms", "prefill_tokens_per_second", "decode_tokens_per_second"):
        assert e[key] > 0, key
    assert e["batch_decode_tokens_per_second"] > 0 and e["batch_size"] == 2
    assert e["threads"] == torch.get_num_threads() and e["device"] == "cpu" and e["device_name"]
    with pytest.raises(UserError, match=">= 1"):
        measure_efficiency(tiny_model_dir, repeats=0)
    # KV bytes per token of the chosen cache, measured from the state (fields as a dict, as the CLI passes them)
    d = config.dim_per_head
    assert e["kv_bytes_per_token"] == config.n_layers * config.n_kv_heads * 2 * d * 4 and e["kv_cache"]
    int8 = measure_efficiency(tiny_model_dir, **SMALL, kv_cache={"dtype": "int8"})
    assert int8["kv_bytes_per_token"] == config.n_layers * config.n_kv_heads * 2 * (d + 4)
    assert "int8" in int8["kv_cache"] and int8["decode_tokens_per_second"] > 0


def test_peak_rss_sees_an_allocation():
    import numpy as np

    from slmkit.eval.efficiency import PeakRSS

    with PeakRSS() as peak:
        start = peak.peak
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        del block
    assert peak.peak - start >= 50 * 2**20


def test_pareto_front():
    # (cost, quality): b is dominated by a (cheaper and better); c is the best but costliest
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (1.0, 0.5)]
    assert pareto_front(points) == [0, 2, 3]
    # lower quality is better (bits per byte): now b and c are dominated by a
    assert pareto_front([(1.0, 1.2), (2.0, 1.5), (3.0, 1.3)], higher_is_better=False) == [0]


def test_pareto_front_treats_costs_within_the_noise_as_ties():
    """A model 2 MB lighter by the noise of a peak-RSS reading, and worse, does not reach the memory front."""
    points = [(100.0, 0.50), (98.0, 0.40), (60.0, 0.30)]
    assert pareto_front(points) == [0, 1, 2]  # exact costs: the 2 MB counts
    assert pareto_front(points, noise=(0.05, 8.0)) == [0, 2]  # within the noise: a tie, and quality decides
    assert pareto_front([(100.0, 0.5), (98.0, 0.5)], noise=(0.05, 8.0)) == [0, 1]  # a full tie: both stay


def test_report_files(report, tmp_path, second_model):
    assert [m["name"] for m in report["models"]] == ["tiny/final", "noisy"]
    for m in report["models"]:
        assert set(m) >= {"text", "tasks", "efficiency", "costs", "quality"}
        (task,) = m["tasks"]
        assert m["quality"]["value"] == pytest.approx(task["metrics"]["acc_norm"]["mean"])
        assert m["efficiency"]["model"] == m["path"]
    json_path, html_path = write_report(report, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert set(saved["pareto"]) == {"decode_ms_per_token", "model_rss_bytes", "weights_bytes"}
    page = html_path.read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    for m in report["models"]:
        assert m["name"] in page
    assert f"{report['models'][0]['tasks'][0]['metrics']['acc']['mean']:.3f}" in page


def test_report_without_measurements_has_size_plot_only(report, tmp_path):
    stripped = {**report, "models": [{k: v for k, v in m.items() if k != "efficiency"} for m in report["models"]]}
    _, html_path = write_report(stripped, tmp_path / "out")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 1 and "--efficiency" in page


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, html_path = write_report(report, tmp_path / "out")
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=3000", "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-images-loaded="3/3"' in proc.stdout  # the page's own check: every plot decoded
    assert "Uncaught" not in proc.stderr and "CONSOLE(" not in proc.stderr


def _find_image(screen, image) -> tuple[int, int] | None:
    """(row, column) where image (H, W, 3 uint8) appears in screen at 1:1, or None. A distinctive row of the image
    is searched for with bytes.find in each screen row, then the whole block is compared (mean |diff| < 2: no
    resampling, only PNG decode/encode of the same sRGB pixels)."""
    import numpy as np

    rows = [r for r in range(image.shape[0]) if len(np.unique(image[r].reshape(-1, 3), axis=0)) > 8]
    probe = rows[len(rows) // 2]
    needle = image[probe].tobytes()
    for y in range(probe, screen.shape[0] - image.shape[0] + probe + 1):
        at = screen[y].tobytes().find(needle)
        while at >= 0 and at % 3:
            at = screen[y].tobytes().find(needle, at + 1)
        if at < 0:
            continue
        top, left = y - probe, at // 3
        block = screen[top : top + image.shape[0], left : left + image.shape[1]].astype(int)
        if block.shape == image.shape and np.abs(block - image).mean() < 2:
            return top, left
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed")
def test_report_screenshot_shows_every_plot(report, tmp_path):
    """The page as a browser paints it: every plot embedded in report.html is on the screenshot, pixel for pixel,
    and the plots contain the Pareto front's red points."""
    import io

    import numpy as np
    from PIL import Image

    _, html_path = write_report(report, tmp_path / "out")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--force-color-profile=srgb", "--window-size=1200,5000",
         "--virtual-time-budget=3000", f"--screenshot={shot}", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    screen = np.asarray(Image.open(shot).convert("RGB"))
    page = html_path.read_text()
    plots = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(plots) == 3
    for encoded in plots:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
        assert _find_image(screen, image) is not None, "a plot is missing from the rendered page"
        red = (np.abs(image.astype(int) - [0xD6, 0x27, 0x28]).sum(-1) < 30).sum()
        assert red > 50  # the front's points and step line are drawn
    # and the check can fail: a page whose plots do not decode does not show them
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA"))
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--force-color-profile=srgb", "--window-size=1200,5000",
         "--virtual-time-budget=3000", f"--screenshot={shot}", broken.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    screen = np.asarray(Image.open(shot).convert("RGB"))
    assert _find_image(screen, image) is None


# ---- model cards --------------------------------------------------------------------------------


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_card_from_report(report, second_model, tmp_path, tiny_model_dir):
    from slmkit.eval.card import write_card

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    report = json.loads(json.dumps(report))
    report["models"][0]["path"] = str(model)
    json_path, _ = write_report(report, tmp_path / "rep")
    readme = write_card(model, json_path, license="apache-2.0")
    text = readme.read_text()
    meta = _front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    entry = report["models"][0]
    results = meta["model-index"][0]["results"]
    acc = next(m for m in results[0]["metrics"] if m["type"] == "acc")
    assert acc["value"] == round(entry["tasks"][0]["metrics"]["acc"]["mean"], 4)
    assert f"{entry['text']['bits_per_byte']:.4f}" in text
    assert "## Intended use and limitations" in text and "optimizer steps" in text  # trainer_state.json read
    assert f"{entry['efficiency']['decode_tokens_per_second']:.1f} tokens/s" in text

    # an update keeps what the user wrote outside the generated block, and their own metadata
    readme.write_text(text.replace("license: apache-2.0", "license: apache-2.0\nlanguage: en") + "\nMy notes.\n")
    write_card(model)
    updated = readme.read_text()
    assert "My notes." in updated and _front_matter(updated)["language"] == "en"
    assert updated.count("## Intended use") == 1 and "Not evaluated yet" in updated


def test_card_errors(report, tmp_path, tiny_model_dir):
    from slmkit.eval.card import write_card

    json_path, _ = write_report(report, tmp_path / "rep")
    model = tmp_path / "other"
    shutil.copytree(tiny_model_dir, model)
    with pytest.raises(UserError, match="has no results for"):
        write_card(model, json_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        write_card(model, tmp_path / "bad.json")
    with pytest.raises(UserError, match="no report.json"):
        write_card(model, tmp_path / "empty-dir-that-does-not-exist")


def test_card_of_a_mixture_of_experts_counts_what_a_token_uses(tmp_path, tiny_model_dir):
    from slmkit.config import preset
    from slmkit.eval.card import write_card
    from slmkit.interop.checkpoint import save_model
    from slmkit.loading import load
    from slmkit.models import build_model

    vocab = load(tiny_model_dir).model.config.vocab_size
    config = preset("micro-moe", vocab_size=vocab, d_model=32, n_heads=2, n_kv_heads=1, d_ff=32, n_layers=2)
    directory = save_model(build_model(config), tmp_path / "moe", tokenizer_dir=tiny_model_dir)
    text = write_card(directory).read_text()
    counts = config.param_counts()
    assert counts["active_params"] < counts["params"]
    assert f"{counts['params']:,} parameters" in text and f"{counts['active_params']:,} per token" in text
    assert "MoE MLPs (top-2 of 8 experts)" in text and "AutoModelForCausalLM" in text
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers" and {"mixtral", "mixture-of-experts"} <= set(meta["tags"])
    native = save_model(build_model(config.replace(family="slmkit")), tmp_path / "native", tokenizer_dir=tiny_model_dir)
    text = write_card(native).read_text()
    assert "slmkit.load" in text and _front_matter(text)["library_name"] == "slmkit"
