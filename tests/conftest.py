"""Shared fixtures.  The shared PPipe profiles live beside the checkout (../shared)."""

from __future__ import annotations

import pytest

from ppipe_trt.profiles import default_profiles_dir


@pytest.fixture(scope="session")
def profiles_dir():
    path = default_profiles_dir()
    if not (path / "block-timing-tf32").is_dir():
        pytest.fail(f"shared PPipe profiles not found at {path}; set PPIPE_PROFILES")
    return path


@pytest.fixture(scope="session")
def shared_profiles(profiles_dir):
    from ppipe_trt.profiles import load_profiles
    return load_profiles(profiles_dir)
