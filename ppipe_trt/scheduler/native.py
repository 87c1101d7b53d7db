"""Which reservation scheduler runs: the compiled one (``ppipe_trt._native.reservation``) or
the pure-Python reference (:mod:`ppipe_trt.scheduler.reservation`).

Both decide exactly alike (``tests/scheduler/test_decision_digest.py`` pins both to the same
decisions); the compiled one spends a fraction of the CPU per decision pass.  It is used when

* it was built (``pip install -e .`` / ``make install`` compile it with Cython; without a C
  compiler the install still succeeds and the reference runs),
* its build is not stale (the SHA-256 of ``reservation.pyx`` compiled into it matches the
  source next to it; an edited source without a rebuild falls back, with a warning), and
* ``PPIPE_NATIVE`` is not ``0`` (set ``PPIPE_NATIVE=0`` to run the reference).

:func:`native_status` says which runs and why (``ppipe serve``'s banner and ``/v2/status``
show it).  The choice is made per cluster state: ``ClusterState(native=...)`` holds the
link timelines in the form its schedulers need, and :func:`~ppipe_trt.scheduler.factory.
build_schedulers` builds the matching scheduler.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

from ppipe_trt.scheduler.interface import Scheduler

log = logging.getLogger("ppipe.scheduler")

_SOURCE = Path(__file__).resolve().parent.parent / "_native" / "reservation.pyx"
_loaded: tuple[ModuleType | None, str] | None = None


def _load() -> tuple[ModuleType | None, str]:
    global _loaded
    if _loaded is None:
        try:
            from ppipe_trt._native import reservation as mod
        except ImportError as exc:
            _loaded = (None, f"not built ({exc}); install with `pip install -e .` and a C "
                             "compiler to build it")
        else:
            stale = False
            if _SOURCE.exists():
                sha = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()
                stale = sha != getattr(mod, "SOURCE_SHA256", None)
            if stale:
                _loaded = (None, f"stale build: {_SOURCE.name} changed since it was compiled; "
                                 "rebuild with `pip install -e .`")
                log.warning("compiled scheduler not used: %s", _loaded[1])
            else:
                Scheduler.register(mod.NativeReservationScheduler)
                _loaded = (mod, "compiled")
    return _loaded


def native_module() -> ModuleType | None:
    """The compiled scheduler's module when it is to be used (see the module docstring),
    else ``None``."""
    if os.environ.get("PPIPE_NATIVE", "1").strip() == "0":
        return None
    return _load()[0]


def NativeReservationScheduler() -> type:
    """The compiled scheduler's class (for a cluster state made ``native``: the state chose,
    whatever ``PPIPE_NATIVE`` says now)."""
    mod = _load()[0]
    if mod is None:
        from ppipe_trt.errors import ConfigError
        raise ConfigError(f"the compiled scheduler is not available: {_load()[1]}")
    return mod.NativeReservationScheduler


def native_status() -> dict:
    """``{"scheduler": "compiled" | "python", "detail": why}``."""
    if os.environ.get("PPIPE_NATIVE", "1").strip() == "0":
        return {"scheduler": "python", "detail": "PPIPE_NATIVE=0"}
    mod, detail = _load()
    return {"scheduler": "compiled" if mod is not None else "python", "detail": detail}


def implementation(policy: str = "reservation") -> str:
    """One line for banners: which implementation of ``policy`` runs, and why."""
    if policy != "reservation":
        return f"{policy} (Python; only the reservation policy is compiled)"
    st = native_status()
    if st["scheduler"] == "compiled":
        return "reservation (compiled)"
    return f"reservation (Python reference: {st['detail']})"


def scheduler_implementation(schedulers) -> dict:
    """For a status page: the policy classes that run and whether they are the compiled
    ones (``schedulers``: the runtime's, one per model)."""
    classes = sorted({type(s).__name__ for s in schedulers})
    compiled = bool(classes) and classes == ["NativeReservationScheduler"]
    return {"implementation": "compiled" if compiled else "python", "classes": classes,
            "detail": "compiled" if compiled else native_status()["detail"]}
