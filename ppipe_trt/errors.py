"""The project's exception hierarchy.

Every error raised on purpose by ppipe-trt derives from :class:`PPipeError`.  Messages name the
bad value and what was expected, so that a caller (CLI, HTTP front end) can show them verbatim.
"""

from __future__ import annotations


class PPipeError(Exception):
    """Root of all ppipe-trt errors."""


class BadInputError(PPipeError, ValueError):
    """A user-supplied value (file, argument, request) is malformed or out of range."""


class ProfileFormatError(BadInputError):
    """A profile file is missing, ragged, or holds non-positive / non-monotonic latencies."""


class ConfigError(BadInputError):
    """A cluster, workload or plan file does not follow its schema."""


class InfeasiblePlanError(PPipeError):
    """No plan satisfies the constraints (SLO too tight, not enough GPUs, ...)."""


class SolverError(PPipeError):
    """A MILP solver failed or is unavailable."""


class EngineBuildError(PPipeError):
    """Building, extracting or compiling a sub-graph engine failed."""


class BackendUnavailableError(PPipeError):
    """An execution backend (TensorRT, CUDA, PyTorch, ONNX Runtime provider) is not installed."""


class EngineMismatchError(PPipeError):
    """An engine was built for another GPU class, TensorRT version or source model."""


class SchedulerError(PPipeError):
    """The scheduler was driven inconsistently (unknown batch, time going backwards, ...)."""


class ModelNotFoundError(BadInputError):
    """A request names a model that is not served."""


class RequestRejectedError(PPipeError):
    """A request could not be served within its deadline; ``reason`` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PlanSwapError(PPipeError):
    """A plan cannot be swapped in now (other models or SLOs, a policy that cannot hand its
    queue over, the runtime not running, another swap in between)."""
