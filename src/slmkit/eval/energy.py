"""Energy counters for the efficiency probes: joules from RAPL (CPU packages, /sys/class/powercap) or from
`nvidia-smi` (a CUDA device's total energy counter), and a plain reason when neither can be read.

RAPL counts whole CPU packages (every process on them, DRAM not included unless a package exposes it), so on a
shared machine a figure includes the others' work; it is a measurement of the machine, not of the model alone.
Since 2020 Linux makes `energy_uj` readable by root only; containers and most VMs expose no powercap at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class Energy:
    joules: float | None  # None: not measurable here
    source: str  # what was read, or why nothing could be


def _rapl_packages(root: Path) -> list[Path]:
    """Top-level RAPL domains (intel-rapl:0, intel-rapl:1, ...; AMD exposes the same interface); subdomains
    (intel-rapl:0:0, core/uncore/dram) are inside their package's count and are skipped."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))


class EnergyMeter:
    """`start()`, run the work, `stop()` -> Energy. Wraps a RAPL counter that overflows once between the two."""

    def __init__(self, device: str = "cpu", root: Path = POWERCAP) -> None:
        self.device, self.root = str(device), root
        self._start: list[float] | None = None
        self.reason = ""
        self.packages = []
        if self.device.startswith("cuda"):
            if shutil.which("nvidia-smi") is None:
                self.reason = "not measurable here: no nvidia-smi"
            return
        self.packages = _rapl_packages(root)
        if not self.packages:
            self.reason = f"not measurable here: no RAPL counters under {root}"
            return
        try:
            self._read()
        except (OSError, ValueError) as exc:
            self.reason = f"not measurable here: RAPL counters unreadable ({exc.__class__.__name__})"

    def _read(self) -> list[float]:
        if self.device.startswith("cuda"):
            index = self.device.split(":")[1] if ":" in self.device else "0"
            query = ["--query-gpu=total_energy_consumption", "--format=csv,noheader,nounits"]
            out = subprocess.run(
                ["nvidia-smi", f"--id={index}", *query], capture_output=True, text=True, timeout=10, check=True
            ).stdout
            return [float(out.strip()) / 1e3]  # mJ -> J
        return [int((p / "energy_uj").read_text()) / 1e6 for p in self.packages]

    def start(self) -> None:
        if not self.reason:
            try:
                self._start = self._read()
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self.reason = f"not measurable here: energy counter unreadable ({exc.__class__.__name__})"

    def stop(self) -> Energy:
        if self.reason or self._start is None:
            return Energy(None, self.reason or "not measurable here: not started")
        try:
            end = self._read()
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            return Energy(None, f"not measurable here: energy counter unreadable ({exc.__class__.__name__})")
        total = 0.0
        for i, (a, b) in enumerate(zip(self._start, end, strict=True)):
            delta = b - a
            if delta < 0 and self.packages:  # the counter wrapped at max_energy_range_uj
                delta += int((self.packages[i] / "max_energy_range_uj").read_text()) / 1e6
            total += delta
        if self.device.startswith("cuda"):
            return Energy(total, "nvidia-smi total_energy_consumption (the whole GPU)")
        return Energy(total, f"RAPL {', '.join(p.name for p in self.packages)} (whole CPU packages, all processes)")
