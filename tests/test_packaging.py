"""The built wheel installs one top-level import name, contrans_tl (analyses inside it, bench not at all)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_contrans_tl(tmp_path):
    source = tmp_path / "source"  # build from a copy: the build writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("contrans_tl", "analyses", "bench"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("contrans_tl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"contrans_tl", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "contrans_tl/analyses/emotion_transfer.py" in names  # the analyses ship under the library's name
    assert not any(n.startswith(("bench/", "analyses/", "tests/")) for n in names)
    assert "contrans_tl/data/emotions/fear.json" in names and "contrans_tl/data/neutral.txt" in names
