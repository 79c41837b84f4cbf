"""Building the project's wheel is warning-free and carries its license (PEP 639).

`pip wheel` of a copy of the source tree with this virtualenv's setuptools (no build
isolation and no index: nothing is downloaded), then the wheel's metadata read back.

Run: .venv/bin/python -m pytest -q tests/test_packaging.py   (~15 s)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_license_warnings_and_ships_the_license(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("pretrain", "data_pipeline"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Warning" not in out and "deprecated" not in out, out[-4000:]
    (wheel,) = (tmp_path / "wheels").glob("clip_pretrain-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_text = z.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
