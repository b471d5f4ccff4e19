"""Packaging: `pip install .` accepts a range of torch and transformers versions, the Makefile installs the exact
versions the tests run against (inside those ranges), the extras match the install hints of `slmkit.optional`, and
a wheel built from this checkout holds the package and the `slm` command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement

from slmkit_testing import SRC

ROOT = SRC.parent
MAKE = shutil.which("make")


def metadata() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(specs: list[str]) -> dict[str, Requirement]:
    return {(r := Requirement(spec)).name: r for spec in specs}


def makefile_pins() -> dict[str, str]:
    """NAME_VERSION := X lines of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z]+)_VERSION\s*:?=\s*(\S+)\s*$", text, flags=re.MULTILINE))


def test_dependencies_are_ranges_that_admit_the_makefile_pins():
    core = requirements(metadata()["dependencies"])
    pins = makefile_pins()
    assert {"TORCH", "TRANSFORMERS", "XGRAMMAR"} <= set(pins), pins
    for requirement in core.values():
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), f"{requirement}: give a range"
    for name in ("torch", "transformers"):
        specifier = core[name].specifier
        assert any(s.operator == "<" for s in specifier), f"{name}: bound the next major version"
        assert specifier.contains(pins[name.upper()]), f"{name} {specifier} refuses the Makefile's {pins}"
    [xgrammar] = [Requirement(s) for s in metadata()["optional-dependencies"]["constrained"]]
    assert xgrammar.name == "xgrammar" and xgrammar.specifier.contains(pins["XGRAMMAR"])
    assert not any(s.operator == "==" for s in xgrammar.specifier)
    # peft: the adapter parity tests' peer, a range in the dev extra and pinned by the Makefile
    peft = requirements(metadata()["optional-dependencies"]["dev"])["peft"]
    assert "PEFT" in pins and peft.specifier.contains(pins["PEFT"]), (peft, pins)


def test_extras_match_the_install_hints():
    from slmkit.optional import EXTRAS

    extras = metadata()["optional-dependencies"]
    for name, extra in EXTRAS.items():
        assert extra.requirement in extras[name], (name, extras[name])
        assert extra.install == f"pip install '{extra.requirement}'"


def test_datasketch_extra_admits_the_makefile_pin():
    """`slm data clean`'s near dedup: a range in the `clean` and `dev` extras, the exact version in the Makefile."""
    pins = makefile_pins()
    extras = metadata()["optional-dependencies"]
    for name in ("clean", "dev"):
        requirement = requirements(extras[name])["datasketch"]
        assert requirement.specifier.contains(pins["DATASKETCH"]), (name, requirement, pins)
        assert not any(s.operator == "==" for s in requirement.specifier)
    install = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "-e '.[dev]'" in line)
    assert "datasketch==$(DATASKETCH_VERSION)" in install.split()


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_makefile_installs_the_pins_torch_first(tmp_path):
    pins = makefile_pins()
    # -B: print every step even where this checkout's .venv is up to date; VENV elsewhere: nothing of it is read
    out = subprocess.run(
        [MAKE, "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    installs = [line for line in out.splitlines() if " -m pip install " in line and not line.lstrip().startswith("#")]
    torch_at = [i for i, line in enumerate(installs) if f"torch=={pins['TORCH']}" in line.split()]
    package_at = [i for i, line in enumerate(installs) if "-e" in line.split()]
    assert torch_at and package_at and torch_at[0] < package_at[0], installs  # the CPU build before anything pulls one
    assert f"transformers=={pins['TRANSFORMERS']}" in installs[package_at[0]].split(), installs
    assert f"peft=={pins['PEFT']}" in installs[package_at[0]].split(), installs
    [xgrammar] = [line for line in installs if f"xgrammar=={pins['XGRAMMAR']}" in line.split()]
    assert "--no-deps" in xgrammar.split()  # triton serves GPUs only


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_install_stamp_is_rebuilt_when_the_makefile_changes(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()
    for name, age in (("Makefile", 100), ("pyproject.toml", 100), (".venv/.installed", 50)):
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))

    def up_to_date() -> bool:  # make -q: exit 0 when the target is up to date, 1 when its recipe would run
        return subprocess.run([MAKE, "-q", ".venv/.installed"], cwd=tmp_path, timeout=60).returncode == 0

    assert up_to_date()
    os.utime(tmp_path / "Makefile", (1e9, 1e9))  # a pin changed
    assert not up_to_date()


def test_wheel_holds_the_package_and_the_slm_command(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(SRC, source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [wheel] = (tmp_path / "dist").glob("slmkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for module in ("__init__.py", "cli.py", "optional.py", "errors.py", "infer/constrained.py", "serve/app.py"):
            assert f"slmkit/{module}" in names, module
        [info] = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        meta = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert re.search(r"^slm\s*=\s*slmkit\.cli:main$", entry_points, flags=re.MULTILINE), entry_points
    required = requirements([r for r in meta.get_all("Requires-Dist") if "extra ==" not in r])
    assert not any(s.operator == "==" for s in required["torch"].specifier), required["torch"]
    assert {"constrained", "lm-eval", "dev"} <= set(meta.get_all("Provides-Extra"))
