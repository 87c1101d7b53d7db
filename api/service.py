"""The inference service: what the REST and gRPC front ends both answer, protocol-neutral.

:class:`InferenceService` looks models up (by name and version), says whether the server and
a model are ready, describes models (metadata, Triton's model configuration, the repository
index), infers (one ``ServingRuntime.submit`` per sample, waits for every answer, joins the
outputs), and keeps the statistics.  It knows no wire format: the front ends parse their
requests into :class:`~api.codec.ParsedInfer`, call it, render what it returns, and map its
exceptions to status codes (:mod:`api.errors` for HTTP; :mod:`api.grpc_server` derives its
codes from that).  Its methods are called on the front end's event loop; ``infer`` waits
without blocking it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from api.binary import v2_datatype
from api.codec import ParsedInfer, RequestedOutput
from api.frames import decode_frame
from ppipe_trt.errors import BadInputError, ModelNotFoundError, PPipeError, RequestRejectedError
from ppipe_trt.serving.answers import CallbackAnswer
from ppipe_trt.serving.runtime import InferenceResult, ServedModel, ServingRuntime

SERVER_NAME = "ppipe-trt"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "statistics",
              "frames")
#: Every model is served as this one version.
MODEL_VERSION = "1"
#: How long past a request's deadline the service still waits for its answer (default).
DEFAULT_ANSWER_GRACE_S = 2.0

RuntimeGetter = Callable[[], "ServingRuntime | None"]


class ServerNotReadyError(RequestRejectedError):
    """No runtime is serving yet (or any more): the request cannot be answered now."""

    def __init__(self, message: str = "server is not ready: the serving runtime is not "
                                      "running"):
        super().__init__("not_ready", message)


class AnswerTimeoutError(PPipeError):
    """No answer came within the request's deadline plus the grace period."""


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """A model input or output; ``shape`` has ``-1`` as the batch dimension."""

    name: str
    datatype: str  # KServe v2 datatype, e.g. "FP32"
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """KServe v2 model metadata; ``parameters`` are ours (SLO, how the model runs)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    """One row of the repository index; ``state`` is ``"READY"`` or ``"UNAVAILABLE"``."""

    name: str
    version: str
    state: str


@dataclass(frozen=True, slots=True)
class InferOutcome:
    """The answer to one request of ``batch`` samples.

    ``outputs``: each requested output as one batch-major array (the samples in request
    order), owned by the caller.  ``results``: each sample's answer from the runtime.
    ``worst_latency_us`` / ``worst_batch_size``: the slowest sample's latency (runtime clock,
    arrival to last stage) and the size of the batch it ran in.
    """

    outputs: dict[str, np.ndarray]
    results: list[InferenceResult]
    worst_latency_us: float
    worst_batch_size: int

    @property
    def worst_latency_ms(self) -> float:
        return round(self.worst_latency_us / 1000.0, 3)


#: How often the answer guard looks for waits past their time (seconds): a wait is given
#: up at most this much after its deadline + grace.
GUARD_TICK_S = 0.05


class AnswerGuard:
    """Bounds the waits for answers (:meth:`InferenceService.infer`): the runtime answers
    every request (a result, a drop, a failure), so this only matters if it ever did not.

    One event-loop timer, every :data:`GUARD_TICK_S` while something is watched, not a timer
    per request: a watch is a list ``[deadline, waiter, timed_out]`` appended to the queue of
    its wait's length (each queue is in deadline order); the sweep gives up the waiters at
    the queues' heads whose deadline passed and that are still waiting.  The waiter calls
    :meth:`release` once answered, so that the guard does not keep its answer alive."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queues: dict[float, collections.deque] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, waiter: asyncio.Future, budget_s: float) -> list:
        """Give up ``waiter`` (cancel it) if it is still waiting ``budget_s`` from now; the
        returned watch's ``[2]`` is then True."""
        entry = [self._loop.time() + budget_s, waiter, False]
        queue = self._queues.get(budget_s)
        if queue is None:
            queue = self._queues[budget_s] = collections.deque()
        queue.append(entry)
        if self._timer is None:
            self._timer = self._loop.call_later(GUARD_TICK_S, self._sweep)
        return entry

    @staticmethod
    def release(entry: list) -> None:
        """The waiter of ``entry`` got its answer."""
        entry[1] = None

    def _sweep(self) -> None:
        now = self._loop.time()
        for budget, queue in list(self._queues.items()):
            while queue and queue[0][0] <= now:
                entry = queue.popleft()
                waiter = entry[1]
                if waiter is not None and not waiter.done():
                    entry[2] = True
                    waiter.cancel()
            if not queue:
                del self._queues[budget]
        self._timer = (self._loop.call_later(GUARD_TICK_S, self._sweep) if self._queues
                       else None)


def _slo_raised(model: ServedModel) -> dict[str, Any]:
    """The model's ``configured_slo_ms`` and ``slo_raised_reason`` when it is served above the
    SLO it asked for (``slo_ms`` is then the one in force); nothing when served as asked."""
    if model.configured_slo_us is None:
        return {}
    return {"configured_slo_ms": model.configured_slo_us / 1000.0,
            "slo_raised_reason": model.slo_raised_reason or ""}


def _tensors(specs) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(s.name, v2_datatype(s.dtype), tuple(int(d) for d in s.shape))
                 for s in specs)


class InferenceService:
    """Validates, submits, waits and counts over the runtime ``runtime_getter()`` returns
    (``None`` while none runs: then every call but :attr:`ready` and :meth:`server_metadata`
    raises :class:`ServerNotReadyError`).

    ``answer_grace_s``: how long past a request's deadline :meth:`infer` still waits for its
    answer before it raises :class:`AnswerTimeoutError`.  One service serves every front end
    of an application, so that they count together.
    """

    def __init__(self, runtime_getter: RuntimeGetter,
                 answer_grace_s: float = DEFAULT_ANSWER_GRACE_S):
        self.runtime_getter = runtime_getter
        self.answer_grace_s = answer_grace_s
        # Per model: when its last request was answered (wall clock, ms since the epoch),
        # Triton's ``last_inference``; the runtime counts everything else.
        self._last_inference_ms: dict[str, int] = {}
        self._guards: dict[asyncio.AbstractEventLoop, AnswerGuard] = {}

    # ---- server ----------------------------------------------------------------------------
    def runtime(self) -> ServingRuntime:
        """The runtime now serving; raises :class:`ServerNotReadyError` while none runs."""
        rt = self.runtime_getter()
        if rt is None:
            raise ServerNotReadyError()
        return rt

    @property
    def ready(self) -> bool:
        rt = self.runtime_getter()
        return rt is not None and rt.ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, SERVER_VERSION, EXTENSIONS)

    def repository_index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        """Every served model by name (``ready_only``: none while the runtime is not
        ready)."""
        rt = self.runtime()
        if ready_only and not rt.ready:
            return []
        state = "READY" if rt.ready else "UNAVAILABLE"
        return [ModelIndexEntry(m, MODEL_VERSION, state) for m in sorted(rt.models)]

    def status(self) -> dict[str, Any]:
        """The runtime's status document (plan, models, workers, counters)."""
        return self.runtime().status()

    async def push_plan(self, body: Any) -> dict[str, Any]:
        """Swap in the plan ``body`` names (a plan document, or weights to re-plan for: see
        :func:`~ppipe_trt.serving.adaptive.parse_plan_push`); waits for the switch and
        returns its report.  In a front-end process the runtime's process does it."""
        from ppipe_trt.serving.adaptive import parse_plan_push, push_plan

        rt = self.runtime()
        if hasattr(rt, "push_plan"):          # a front-end process (api.remote)
            return await rt.push_plan(body)
        push = parse_plan_push(body)
        report = await asyncio.to_thread(push_plan, rt, push)
        return report.to_dict()

    # ---- models ----------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name``; ``version`` ``None`` or ``""`` means the latest (the
        only one, ``"1"``).  Raises ``ModelNotFoundError``."""
        model = self.runtime().model(name)
        if version not in (None, "", MODEL_VERSION):
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; "
                                     f"versions: [{MODEL_VERSION!r}]")
        return model

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.model(name, version)
        return self.runtime().ready

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        model = self.model(name, version)
        return ModelMetadata(
            model.name, (MODEL_VERSION,), SERVER_NAME, _tensors(model.inputs),
            _tensors(model.outputs),
            {"slo_ms": model.slo_us / 1000.0, "mode": model.mode, "emulated": model.emulated,
             "timing_only": model.timing_only, "frames": model.image is not None,
             "postprocess": model.postprocess.kind, **_slo_raised(model)})

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration of the model, as the JSON document of
        ``model_config.proto`` (field names as in the proto)."""
        model = self.model(name, version)

        def dims(spec) -> list[int]:
            return [int(d) for d in spec.shape[1:]]

        return {
            "name": model.name, "platform": SERVER_NAME, "backend": SERVER_NAME,
            "version_policy": {"latest": {"num_versions": 1}},
            # the configuration's, as Triton reports it: the plan's batch changes from one
            # plan to the next, and a client may send more (one request per sample inside)
            "max_batch_size": model.config_max_batch or model.max_batch,
            "input": [{"name": s.name, "data_type": "TYPE_" + v2_datatype(s.dtype),
                       "format": "FORMAT_NONE", "dims": dims(s)} for s in model.inputs],
            "output": [{"name": s.name, "data_type": "TYPE_" + v2_datatype(s.dtype),
                        "dims": dims(s)} for s in model.outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": 0},
            "parameters": {"slo_ms": {"string_value": f"{model.slo_us / 1000.0:g}"},
                           "emulated": {"string_value": str(model.emulated).lower()},
                           "timing_only": {"string_value": str(model.timing_only).lower()},
                           "mode": {"string_value": model.mode},
                           **{k: {"string_value": f"{v:g}" if isinstance(v, float) else v}
                              for k, v in _slo_raised(model).items()}},
        }

    def statistics(self, name: str | None = None,
                   version: str | None = None) -> list[dict[str, Any]]:
        """Triton's statistics documents (``model_statistics``): of model ``name``, or of
        every served model by name when ``name`` is ``None`` or ``""``.  Counts are samples;
        times are nanoseconds of end-to-end runtime latency."""
        rt = self.runtime()
        if name:
            self.model(name, version)
            names = [name]
        else:
            names = sorted(rt.models)
        snapshot = rt.stats.snapshot()
        return [self._statistics_of(n, snapshot[n]) for n in names]

    def _statistics_of(self, name: str, c) -> dict[str, Any]:
        ns = int(c.latency_s.total * 1e9)
        return {
            "name": name, "version": MODEL_VERSION,
            "last_inference": self._last_inference_ms.get(name, 0),
            "inference_count": c.completions, "execution_count": sum(c.batch_sizes.values()),
            "inference_stats": {
                "success": {"count": c.completions, "ns": ns},
                "fail": {"count": c.failures + sum(c.drops.values()), "ns": 0},
                "queue": {"count": c.completions, "ns": 0},
                "compute_input": {"count": c.completions, "ns": 0},
                "compute_infer": {"count": c.completions, "ns": ns},
                "compute_output": {"count": c.completions, "ns": 0},
                "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": {"count": n, "ns": 0},
                 "compute_infer": {"count": n, "ns": 0}, "compute_output": {"count": n, "ns": 0}}
                for size, n in sorted(c.batch_sizes.items())],
        }

    # ---- inference -------------------------------------------------------------------------
    async def infer(self, model: ServedModel, parsed: ParsedInfer) -> InferOutcome:
        """Run a validated request: one scheduler request per sample, all submitted at once.

        Waits for every answer, at most the request's deadline (``parsed.timeout_us``, else
        the model's SLO) plus ``answer_grace_s``; the first error any sample gets is raised
        (``RequestRejectedError`` for a drop, with its reason), ``AnswerTimeoutError`` past
        the wait."""
        waiter, budget_s = self._submit(model, parsed)
        # The runtime answers every request (a result, a drop, a failure); the guard only
        # bounds the wait if it ever did not.
        watch = self._guard().watch(waiter, budget_s)
        try:
            answer = await waiter
        except asyncio.CancelledError:
            if watch[2]:
                raise self._timeout(model, budget_s) from None
            raise
        finally:
            watch[1] = None  # AnswerGuard.release
        return self._outcome(model, parsed, answer)

    def infer_soon(self, model: ServedModel, parsed: ParsedInfer,
                   done: Callable[[InferOutcome | None, BaseException | None], None],
                   loop: asyncio.AbstractEventLoop | None = None) -> None:
        """:meth:`infer` without a coroutine, for a caller on the event loop that answers
        from a callback (the HTTP protocol's fast path, :mod:`api.http_protocol`): submits
        now, then calls ``done(outcome, None)`` or ``done(None, error)`` exactly once, on the
        event loop, with what :meth:`infer` would have returned or raised (the same guard
        against a missing answer).  Raises at once what :meth:`infer` raises before it waits
        (not ready, not found).  ``loop``: the running event loop, when the caller has it at
        hand (``asyncio.get_running_loop`` costs a ``getpid`` system call)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        if parsed.batch_size == 1:
            rt = self.runtime()
            submit_answer = getattr(rt, "submit_answer", None)
            if submit_answer is not None:
                if self._infer_by_callback(submit_answer, model, parsed, done, loop):
                    return
        waiter, budget_s = self._submit(model, parsed)
        watch = self._guard(loop).watch(waiter, budget_s)

        def finished(fut: asyncio.Future) -> None:
            watch[1] = None  # AnswerGuard.release
            if fut.cancelled():
                error: BaseException = (self._timeout(model, budget_s) if watch[2]
                                        else asyncio.CancelledError())
                return done(None, error)
            error = fut.exception()
            if error is not None:
                return done(None, error)
            try:
                outcome = self._outcome(model, parsed, fut.result())
            except Exception as exc:  # noqa: BLE001 - given to the caller, as infer raises it
                return done(None, exc)
            done(outcome, None)

        waiter.add_done_callback(finished)

    def _infer_by_callback(self, submit_answer, model: ServedModel, parsed: ParsedInfer,
                           done: Callable[[InferOutcome | None, BaseException | None], None],
                           loop: asyncio.AbstractEventLoop) -> bool:
        """:meth:`infer_soon` of one sample on a runtime that runs on this event loop: the
        runtime calls back when it answers (no future); False when it does not run here."""
        budget_s = (parsed.timeout_us if parsed.timeout_us is not None
                    else model.slo_us) / 1e6 + self.answer_grace_s
        watch: list = []  # the guard's watch, set below (before any call back: see arm)

        def answered(result: Any, error: BaseException | None) -> None:
            watch[1] = None  # AnswerGuard.release
            if error is not None:
                if watch[2] and isinstance(error, asyncio.CancelledError):
                    error = self._timeout(model, budget_s)
                return done(None, error)
            try:
                outcome = self._outcome(model, parsed, result)
            except Exception as exc:  # noqa: BLE001 - given to the caller, as infer raises it
                return done(None, exc)
            done(outcome, None)

        answer = CallbackAnswer(answered, loop)
        if not submit_answer(model.name, parsed.inputs, parsed.timeout_us, answer):
            return False
        watch = self._guard(loop).watch(answer, budget_s)
        answer.arm()
        return True

    def _guard(self, loop: asyncio.AbstractEventLoop | None = None) -> AnswerGuard:
        """The answer guard of the running event loop (``loop``, when given)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        guard = self._guards.get(loop)
        if guard is None:
            for other in [o for o in self._guards if o.is_closed()]:
                del self._guards[other]
            guard = self._guards[loop] = AnswerGuard(loop)
        return guard

    def _submit(self, model: ServedModel, parsed: ParsedInfer) -> tuple[asyncio.Future, float]:
        """Submit every sample of ``parsed``: the future of their answers (one result, or a
        list for a batch) and how long to wait for it (deadline + grace), in seconds."""
        rt = self.runtime()
        name = model.name
        if parsed.batch_size == 1:  # the common case: no slicing, no gathering future
            waiter = rt.submit_async(name, parsed.inputs, parsed.timeout_us)
        else:
            waiter = asyncio.gather(*[
                rt.submit_async(name, {k: v[i:i + 1] for k, v in parsed.inputs.items()},
                                parsed.timeout_us) for i in range(parsed.batch_size)])
        budget_s = (parsed.timeout_us if parsed.timeout_us is not None
                    else model.slo_us) / 1e6 + self.answer_grace_s
        return waiter, budget_s

    @staticmethod
    def _timeout(model: ServedModel, budget_s: float) -> AnswerTimeoutError:
        return AnswerTimeoutError(f"no answer from model {model.name!r} within "
                                  f"{budget_s * 1000:.0f} ms (deadline + grace)")

    def _outcome(self, model: ServedModel, parsed: ParsedInfer, answer: Any) -> InferOutcome:
        """The outcome of a request whose samples were all answered (``answer``: what the
        future of :meth:`_submit` gave)."""
        self._last_inference_ms[model.name] = time.time_ns() // 1_000_000
        if parsed.batch_size == 1:
            results = answer.outputs
            return InferOutcome({want.name: results[want.name] for want in parsed.outputs},
                                [answer], answer.latency_us, answer.batch_size)
        results = list(answer)
        outputs = {want.name: np.concatenate([r.outputs[want.name] for r in results])
                   for want in parsed.outputs}
        worst = max(results, key=lambda r: r.latency_us)
        return InferOutcome(outputs, results, worst.latency_us, worst.batch_size)

    def frames_model(self, name: str) -> ServedModel:
        """The served model ``name``, which must have frames preprocessing (an image input
        declared in its configuration)."""
        model = self.model(name)
        if model.image is None:
            raise BadInputError(
                f"model {name!r} has no frames preprocessing; declare its image input with "
                "format: FORMAT_NCHW (or FORMAT_NHWC) or add preprocessing parameters (mean, "
                f"std, resize) to its config, or send tensors to /v2/models/{name}/infer")
        return model

    async def infer_frame(self, model: ServedModel, image: bytes,
                          timeout_us: float | None = None) -> InferOutcome:
        """Decode one JPEG/PNG frame for ``model`` (a model :meth:`frames_model` returned;
        decoded in a worker thread) and infer it as one sample with every output."""
        tensor = await asyncio.to_thread(decode_frame, image, model.image)
        parsed = ParsedInfer(None, 1, {model.image.input_name: tensor},
                             [RequestedOutput(o.name, False) for o in model.outputs],
                             timeout_us=timeout_us)
        return await self.infer(model, parsed)
