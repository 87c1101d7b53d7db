"""Which implementation of the request path's hot parts runs: compiled (``ppipe_trt._native``)
or the pure-Python reference.

Two parts are compiled (Cython, state in C arrays), each with its Python reference:

* ``reservation``: the reservation scheduler (reference: :mod:`ppipe_trt.scheduler.
  reservation`); ``tests/scheduler/test_decision_digest.py`` pins both to the same decisions;
* ``timed``: the thread-less timing-only workers of an emulated cluster, on one timer heap
  per runtime loop (reference: :mod:`ppipe_trt.serving.timed_worker`).

A compiled part is used when

* it was built (``pip install -e .`` / ``make install`` compile it with Cython; without a C
  compiler the install still succeeds and the references run),
* its build is not stale (the SHA-256 of its ``.pyx`` compiled into it matches the source
  next to it; an edited source without a rebuild falls back, with a warning), and
* ``PPIPE_NATIVE`` allows it: unset or ``1``, every compiled part; ``0``, none (the
  references run); a comma-separated list of parts (``reservation``, ``timed``), those.

:func:`native_status` says which runs and why (``ppipe serve``'s banner and ``/v2/status``
show it).  The scheduler's choice is made per cluster state: ``ClusterState(native=...)``
holds the link timelines in the form its schedulers need, and :func:`~ppipe_trt.scheduler.
factory.build_schedulers` builds the matching scheduler.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

from ppipe_trt.scheduler.interface import Scheduler

log = logging.getLogger("ppipe.scheduler")

PARTS = ("reservation", "timed")
_NATIVE_DIR = Path(__file__).resolve().parent.parent / "_native"
_SOURCE = _NATIVE_DIR / "reservation.pyx"   # (tests point it elsewhere)
_loaded: dict[str, tuple[ModuleType | None, str]] | None = None


def _source(part: str) -> Path:
    return _SOURCE if part == "reservation" else _NATIVE_DIR / f"{part}.pyx"


def _load(part: str = "reservation") -> tuple[ModuleType | None, str]:
    global _loaded
    if _loaded is None:
        _loaded = {}
    if part not in _loaded:
        try:
            mod = importlib.import_module(f"ppipe_trt._native.{part}")
        except ImportError as exc:
            _loaded[part] = (None, f"not built ({exc}); install with `pip install -e .` and a C "
                                   "compiler to build it")
        else:
            src = _source(part)
            stale = False
            if src.exists():
                sha = hashlib.sha256(src.read_bytes()).hexdigest()
                stale = sha != getattr(mod, "SOURCE_SHA256", None)
            if stale:
                _loaded[part] = (None, f"stale build: {src.name} changed since it was "
                                       "compiled; rebuild with `pip install -e .`")
                log.warning("compiled %s not used: %s", part, _loaded[part][1])
            else:
                if part == "reservation":
                    Scheduler.register(mod.NativeReservationScheduler)
                _loaded[part] = (mod, "compiled")
    return _loaded[part]


def _setting() -> str:
    return os.environ.get("PPIPE_NATIVE", "1").strip()


def _disabled(part: str = "reservation") -> bool:
    """Whether ``PPIPE_NATIVE`` turns the compiled ``part`` off."""
    value = _setting()
    if value in ("", "1", "all"):
        return False
    if value == "0":
        return True
    return part not in {p.strip() for p in value.split(",")}


def native_module(part: str = "reservation") -> ModuleType | None:
    """The compiled ``part``'s module (``"reservation"`` or ``"timed"``) when it is to be
    used (see the module docstring), else ``None``."""
    if _disabled(part):
        return None
    return _load(part)[0]


def NativeReservationScheduler() -> type:
    """The compiled scheduler's class (for a cluster state made ``native``: the state chose,
    whatever ``PPIPE_NATIVE`` says now)."""
    mod = _load("reservation")[0]
    if mod is None:
        from ppipe_trt.errors import ConfigError
        raise ConfigError(f"the compiled scheduler is not available: {_load()[1]}")
    return mod.NativeReservationScheduler


def finish_router(schedulers: dict, wake: dict):
    """The compiled ``FinishRouter`` over a loop's ``schedulers`` and wake-up times (see
    ``DecisionLoop.timed_pool``), or ``None`` where the compiled scheduler is not built (it
    only serves compiled schedulers)."""
    mod = _load("reservation")[0]
    return None if mod is None else mod.FinishRouter(schedulers, wake)


def native_status(part: str = "reservation") -> dict:
    """``{"scheduler": "compiled" | "python", "detail": why}`` for ``part`` (the key is
    ``"scheduler"`` whatever the part, for the status page's sake)."""
    if _disabled(part):
        return {"scheduler": "python", "detail": f"PPIPE_NATIVE={_setting()}"}
    mod, detail = _load(part)
    return {"scheduler": "compiled" if mod is not None else "python", "detail": detail}


def implementation(policy: str = "reservation", timing_only: bool = True) -> str:
    """One line for banners: which implementation of ``policy`` runs (and, when some model
    is ``timing_only``, of the timing-only workers), and why."""
    if policy != "reservation":
        line = f"{policy} (Python; only the reservation policy is compiled)"
    else:
        st = native_status()
        line = ("reservation (compiled)" if st["scheduler"] == "compiled"
                else f"reservation (Python reference: {st['detail']})")
    if not timing_only:
        return line
    tw = native_status("timed")
    return line + ("; timing-only workers compiled" if tw["scheduler"] == "compiled"
                   else f"; timing-only workers: Python reference ({tw['detail']})")


def scheduler_implementation(schedulers) -> dict:
    """For a status page: the policy classes that run and whether they are the compiled
    ones (``schedulers``: the runtime's, one per model)."""
    classes = sorted({type(s).__name__ for s in schedulers})
    compiled = bool(classes) and classes == ["NativeReservationScheduler"]
    return {"implementation": "compiled" if compiled else "python", "classes": classes,
            "detail": "compiled" if compiled else native_status()["detail"]}


def timed_worker_implementation(workers) -> str | None:
    """``"compiled"`` / ``"python"`` for the thread-less timing-only workers among
    ``workers`` (``None``: there are none)."""
    kinds = {type(w).__name__ for w in workers if getattr(w, "threadless", False)}
    if not kinds:
        return None
    return "compiled" if kinds == {"PooledWorker"} else "python"
