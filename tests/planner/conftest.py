"""Planner test fixtures: the paper's setting (profiles come from tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Run as plain `pytest` (not `python -m pytest`), the repo root is not on sys.path and this
# folder's name would make `import planner` resolve to tests/planner as a namespace package.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
if "planner" in sys.modules and getattr(sys.modules["planner"], "__file__", None) is None:
    del sys.modules["planner"]

from ppipe_trt.cluster import load_paper_setting  # noqa: E402


@pytest.fixture(scope="session")
def setting(profiles_dir):
    return load_paper_setting(profiles_dir)
