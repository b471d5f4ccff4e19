"""What `slm build` is asked for: the budget, the targets and the data, parsed and checked before any work."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from slmkit.errors import UserError

# `--mixer auto`: the transformer, the hybrid (Mamba-2 + attention) and the mixture of experts, one ladder each
AUTO_FAMILIES = ("attention", "hybrid", "moe")
_DURATION_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_LATENCY_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
STOP_ENV = "SLMKIT_BUILD_STOP_AFTER"


class BuildStopped(Exception):
    """Raised where SLMKIT_BUILD_STOP_AFTER (or `build(stop_after=...)`) says, as if the process were killed there."""


def parse_duration(text: str, option: str = "--budget") -> float:
    """Seconds of '90s', '30m', '1.5h' or '1h30m'; UserError for anything else or a non-positive total."""
    cleaned = str(text).strip().lower().replace(" ", "")
    parts = re.findall(_NUMBER + r"(min|sec|s|m|h)", cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise UserError(f"{option} {text!r}: give a duration with a unit, e.g. 90s, 30m, 1.5h or 1h30m")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UserError(f"{option} {text!r}: the duration must be more than zero")
    return seconds


def _parse_unit(text: str, units: dict[str, float], option: str, example: str) -> float:
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]+)", str(text).strip())
    if match is None or match.group(2).lower() not in units:
        raise UserError(f"{option} {text!r}: give a number with a unit ({', '.join(units)}), e.g. {example}")
    value = float(match.group(1)) * units[match.group(2).lower()]
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{option} {text!r}: must be more than zero")
    return value


def parse_size(text: str, option: str = "--max-size") -> int:
    """Bytes of '20MB' (decimal units) or '16MiB' (binary units)."""
    return int(_parse_unit(text, _SIZE_UNITS, option, "20MB"))


def parse_latency(text: str, option: str = "--max-latency") -> float:
    """Milliseconds of '5ms', '800us' or '0.01s'."""
    return _parse_unit(text, _LATENCY_UNITS, option, "5ms")


@dataclass
class BuildRequest:
    """One build, as asked; stored in build.json so that `--resume` can refuse a different request."""

    data: list[str]  # a data dir from `slm data prepare`, or sources to prepare (files, dirs, builtin:pystdlib)
    budget_seconds: float
    device: str = "cpu"
    max_latency_ms: float | None = None
    max_size_bytes: int | None = None
    tasks: list[str] = field(default_factory=list)
    mixer: str = "attention"  # a mixer family, a comma-separated list of them, or "auto"
    seed: int = 1337
    vocab_size: int = 4096  # when `data` are sources to prepare
    fit: list[str] = field(default_factory=list)  # ladder dirs from `slm ladder` to plan with instead of a new one
    threads: int | None = None  # torch CPU threads for every stage (None: torch's default)

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("--data: give a data dir from `slm data prepare` or the sources to prepare")
        if not (self.budget_seconds > 0 and math.isfinite(self.budget_seconds)):
            raise UserError(f"--budget must be more than zero, got {self.budget_seconds} s")
        if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", self.device):
            raise UserError(f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.vocab_size < 256:
            raise UserError(f"--vocab-size must be at least 256, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mixers(self) -> list[str]:
        """The mixer families to plan in (one ladder each). With `--fit`, the given ladders' families: `--mixer`
        left at attention or auto follows them, another family that is not theirs is refused."""
        from slmkit.scaling.shapes import parse_mixer

        if self.mixer == "auto":
            asked = list(AUTO_FAMILIES)
        else:
            asked = [parse_mixer(m.strip()) for m in self.mixer.split(";") if m.strip()]
        if not self.fit:
            return asked
        from slmkit.scaling.planner import ladder_family

        fitted = [ladder_family(path) for path in self.fit]
        if self.mixer not in ("attention", "auto") and sorted(set(asked)) != sorted(set(fitted)):
            raise UserError(
                f"--mixer {self.mixer} but the --fit ladders are of {', '.join(fitted)}: give ladders of the families "
                "asked for, or leave --mixer out"
            )
        return fitted
