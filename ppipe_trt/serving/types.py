"""What the data plane hands the front end: served models, results, the stage-failure error,
and what the runtime keeps of a request while it is in the system."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import ModelNotFoundError, PPipeError
from ppipe_trt.repository.types import ImageSpec, Postprocess

__all__ = ["ImageSpec", "InferenceResult", "PendingRequest", "ServedModel", "StageFailedError"]


class StageFailedError(PPipeError):
    """A stage's engine (or the hand-off to the next stage) failed under a batch; every
    request of the batch gets this error."""


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What the front end needs to know about a model it serves.

    ``inputs``/``outputs``: tensor specs with ``-1`` as the batch dimension.  ``mode`` says
    how it runs (e.g. ``"onnxruntime cpu"``, ``"timing-only, emulated"``); ``emulated`` marks
    figures that come from emulated GPU classes.  ``image`` (frames preprocessing),
    ``postprocess`` and ``config_max_batch`` come from the model's repository configuration:
    ``max_batch`` is the largest batch the plan runs, ``config_max_batch`` the configuration's
    ``max_batch_size`` within the batch the engines were built for (what the model
    configuration endpoints report, as Triton does; ``None``: no configuration, they report
    ``max_batch``).  A client may send larger batches: each sample is one request inside.
    ``configured_slo_us``: the SLO the model asked for (its configuration's, or the one
    derived from its profile) when the plan serves it at a larger ``slo_us`` because the
    asked one cannot be met (``slo_raised_reason`` says why); ``None``: served as asked.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    slo_us: float
    max_batch: int
    mode: str
    emulated: bool = False
    timing_only: bool = False
    image: ImageSpec | None = None
    postprocess: Postprocess = Postprocess()
    config_max_batch: int | None = None
    configured_slo_us: float | None = None
    slo_raised_reason: str | None = None

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)


@dataclass(slots=True)
class InferenceResult:
    """One request's answer.  ``outputs`` arrays have a leading batch dimension of 1 and are
    owned by the caller.  Times are microseconds on the runtime clock.  (Not frozen: one is
    made per answered request, and a frozen dataclass costs 4x as much to make.)"""

    request_id: int
    model: str
    outputs: dict[str, np.ndarray]
    arrival_us: float
    finish_us: float
    deadline_us: float
    batch_size: int

    @property
    def latency_us(self) -> float:
        return self.finish_us - self.arrival_us

    @property
    def met_deadline(self) -> bool:
        return self.finish_us <= self.deadline_us


@dataclass(slots=True)
class PendingRequest:
    """The runtime's side of a request (the scheduler's ``Request.payload``; it never leaves
    the API process).  ``inputs``: batch-1 arrays by input name (``None`` for timing-only
    models); ``future``: answered exactly once; ``deadline_us``: the real deadline the answer
    is judged against (the scheduler plans against an earlier one)."""

    inputs: Mapping[str, np.ndarray] | None
    future: Future = field(default_factory=Future)
    deadline_us: float = 0.0
    # The request's activations between two dispatches of a policy that schedules stage by
    # stage (reactive): the outputs of the stage it last finished, keyed by tensor name.
    carried: dict[str, np.ndarray] | None = None
    # Counted in the runtime's pending requests until it is answered.
    counted: bool = False


def served_model(models: Mapping[str, ServedModel], name: str) -> ServedModel:
    """``models[name]``, or :class:`~ppipe_trt.errors.ModelNotFoundError` naming the served
    models (what every runtime, local or remote, answers for an unknown name)."""
    try:
        return models[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model {name!r}; served models: "
                                 f"{sorted(models)}") from None
