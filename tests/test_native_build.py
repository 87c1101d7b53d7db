"""The compiled hot path's build (``setup.py``): without a working C compiler it builds
nothing and says so, and the install goes on (the pure-Python references run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "ppipe_trt" / "_native").mkdir(parents=True)
    for rel in ("setup.py", "pyproject.toml", "README.md", "ppipe_trt/_native/__init__.py",
                "ppipe_trt/_native/reservation.pyx", "ppipe_trt/_native/timed.pyx"):
        (tree / rel).write_bytes((ROOT / rel).read_bytes())
    return tree


def test_without_a_c_compiler_the_build_goes_on_and_says_so(tmp_path):
    pytest.importorskip("Cython", reason="setup.py compiles with Cython (the dev extra)")
    tree = _tree(tmp_path)
    env = dict(os.environ, CC="/bin/false", LDSHARED="/bin/false")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "ppipe_trt._native.reservation not compiled" in out
    assert "ppipe_trt._native.timed not compiled" in out
    assert not list((tree / "ppipe_trt" / "_native").glob("*.so"))
