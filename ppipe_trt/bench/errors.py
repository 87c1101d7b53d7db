"""Errors of the benchmark library, under the project's root :class:`PPipeError`."""

from __future__ import annotations

from ppipe_trt.errors import BackendUnavailableError, PPipeError


class BenchError(PPipeError):
    """A benchmark could not be set up or run (a server, a build, a bad load point)."""


class ServerStartError(BenchError):
    """A server process exited or did not become ready in time; the message ends with the
    tail of its log."""


class TritonUnavailableError(BenchError, BackendUnavailableError):
    """``tritonserver`` could not be located or installed (no wheel, no stub for this
    Python, pip failed); the message says which and how to fix it."""


__all__ = ["BenchError", "ServerStartError", "TritonUnavailableError"]
