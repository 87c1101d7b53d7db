"""Profiles: per-block latency tables and cut sizes, from the PPipe artifact or our own store.

``load_profiles(path)`` accepts either format and returns a :class:`ProfileSet`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ppipe_trt.errors import ProfileFormatError
from ppipe_trt.profiles.ppipe_format import is_ppipe_profile_dir, load_ppipe_profiles
from ppipe_trt.profiles.store_format import (load_store_profiles, read_profile, write_profile)
from ppipe_trt.profiles.types import BlockLatencyTable, ModelProfile, ProfileSet

#: Where the shared PPipe profiles live relative to a checkout; override with PPIPE_PROFILES.
DEFAULT_PROFILES_DIR = "../shared/ppipe-profiles"


def default_profiles_dir() -> Path:
    """``$PPIPE_PROFILES`` if set, else ``../shared/ppipe-profiles`` next to the repo root."""
    env = os.environ.get("PPIPE_PROFILES")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "ppipe-profiles"
    return candidate if candidate.is_dir() else Path(DEFAULT_PROFILES_DIR)


def load_profiles(path: Path | str | None = None, models: Iterable[str] | None = None) -> ProfileSet:
    """Load profiles from a PPipe artifact folder, an engines/ store or one profile.json."""
    path = Path(path) if path is not None else default_profiles_dir()
    if not path.exists():
        raise ProfileFormatError(
            f"profile path {path} does not exist; pass --profiles DIR (default "
            f"{DEFAULT_PROFILES_DIR}, or set PPIPE_PROFILES)"
        )
    if path.is_dir() and is_ppipe_profile_dir(path):
        return load_ppipe_profiles(path, models)
    return load_store_profiles(path, models)


__all__ = [
    "BlockLatencyTable", "ModelProfile", "ProfileSet", "load_profiles", "load_ppipe_profiles",
    "load_store_profiles", "read_profile", "write_profile", "default_profiles_dir",
    "DEFAULT_PROFILES_DIR",
]
