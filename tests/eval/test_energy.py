"""Energy per token from RAPL counters (a fake powercap tree here), or "not measurable here"."""

from __future__ import annotations

from slmkit.eval.energy import EnergyMeter


def _package(root, name, uj, max_uj=10_000_000):
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_packages_summed_and_wraparound(tmp_path):
    a = _package(tmp_path, "intel-rapl:0", 1_000_000)
    b = _package(tmp_path, "intel-rapl:1", 9_500_000)
    _package(tmp_path, "intel-rapl:0:0", 0)  # a subdomain: inside its package's count, not added again
    meter = EnergyMeter("cpu", root=tmp_path)
    meter.start()
    (a / "energy_uj").write_text("3500000\n")  # +2.5 J
    (b / "energy_uj").write_text("500000\n")  # wrapped at 10 J: +1.0 J
    energy = meter.stop()
    assert energy.joules == 3.5
    assert "intel-rapl:0" in energy.source and "intel-rapl:0:0" not in energy.source


def test_not_measurable_here(tmp_path):
    energy = EnergyMeter("cpu", root=tmp_path / "absent")
    energy.start()
    out = energy.stop()
    assert out.joules is None and out.source.startswith("not measurable here")
    unreadable = _package(tmp_path / "p", "intel-rapl:0", 0)
    (unreadable / "energy_uj").write_text("garbage")
    out = EnergyMeter("cpu", root=tmp_path / "p").stop()
    assert out.joules is None and "unreadable" in out.source


def test_efficiency_reports_energy_or_why_not(tiny_model_dir, tmp_path):
    from slmkit.eval.efficiency import measure_efficiency

    e = measure_efficiency(tiny_model_dir, prompt_tokens=8, new_tokens=4, batch_size=2, repeats=1, threads=1)
    assert "energy_source" in e
    if e["energy_joules_per_token"] is None:  # this machine (no readable RAPL)
        assert e["energy_source"].startswith("not measurable here")
    else:
        assert e["energy_joules_per_token"] > 0 and "RAPL" in e["energy_source"]
