"""KServe v2 / Triton ``GRPCInferenceService`` on ``grpc.aio``: the REST routes' twin.

Messages and stubs are the ones ``tritonclient`` ships (``service_pb2``, ``model_config_pb2``);
nothing here is hand-written protobuf.  A thin adapter, as the REST routes (:mod:`api.v2`): each
RPC parses its request, calls the :class:`~api.service.InferenceService` both front ends share,
and renders the answer, so both give the same figures and the same error messages:

* ``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``RepositoryIndex``;
* ``ModelReady``, ``ModelMetadata``, ``ModelConfig`` (a real ``model_config_pb2.ModelConfig``),
  ``ModelStatistics`` (the REST statistics, field for field);
* ``ModelInfer`` and ``ModelStreamInfer``: inputs in ``raw_input_contents`` (little-endian,
  row-major, one entry per input) or in the typed ``contents`` fields; outputs always in
  ``raw_output_contents``; request parameters ``timeout`` (us) / ``timeout_ms`` and output
  parameter ``classification`` as over REST.  A request of N samples becomes N scheduler
  requests, exactly as over REST.
* Model control, shared memory, trace and log settings answer ``UNIMPLEMENTED``.

Errors: :func:`grpc_status` is the one place that turns an exception into a status code.  It
derives the code from the HTTP status REST gives (:func:`api.errors.status_for`), so both
front ends always agree, and it keeps REST's message text.  Messages over
``ApiSettings.max_body_bytes`` are refused by gRPC itself with ``RESOURCE_EXHAUSTED``.  With
``ApiSettings.auth_token`` set, :class:`BearerTokenInterceptor` answers ``UNAUTHENTICATED`` to
every RPC but ``ServerLive``/``ServerReady`` that lacks ``authorization: Bearer <token>``.

Entry points: :class:`GrpcFrontEnd` (``await start(service, ...)`` / ``await stop(...)`` on
the caller's event loop) and :class:`GrpcServerThread` (a context manager hosting one on its
own event loop in a thread, for tests and scripts).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from api.app import ApiSettings
from api.auth import OPEN_RPCS, BearerAuth
from api.auth import REFUSAL as AUTH_REFUSAL
from api.binary import V2_TO_NUMPY, tensor_from_bytes
from api.codec import (ParsedInfer, check_input, kept_for, output_as_requested, request_batch,
                       requested_outputs, tensor_bytes, timeout_us_of)
from api.errors import status_for
from api.service import SERVER_NAME, InferenceService, InferOutcome
from ppipe_trt.errors import BadInputError, PPipeError, RequestRejectedError
from ppipe_trt.serving.runtime import ServedModel

log = logging.getLogger("ppipe.api.grpc")

#: Decode typed ``contents`` above this many bytes in a worker thread, not on the event loop
#: (raw contents are never copied, so they are decoded in place).
_OFFLOAD_BYTES = 256 * 1024

#: Trailing metadata key carrying a rejection's reason (REST's ``"reason"`` field).
REJECT_REASON_KEY = "ppipe-reject-reason"


# ---- errors -> status codes (the one place) --------------------------------------------------
_CODE_OF_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message answering ``exc``: the code of the HTTP status REST gives
    the same error, and REST's message; anything not raised on purpose is ``INTERNAL``."""
    code = _CODE_OF_HTTP_STATUS.get(status_for(exc), grpc.StatusCode.INTERNAL)
    if isinstance(exc, PPipeError):
        return code, str(exc) or type(exc).__name__
    return code, f"internal error: {type(exc).__name__}: {exc}"


class MalformedRequest:
    """What a tolerant deserializer (:func:`tolerant_handlers`) hands the servicer for bytes
    that do not parse as the RPC's request message; the servicer answers it
    ``INVALID_ARGUMENT``."""

    __slots__ = ("message",)
    model_name = id = ""  # as a ModelInferRequest's, for ModelStreamInfer's error answer

    def __init__(self, message: str):
        self.message = message

    def error(self) -> BadInputError:
        return BadInputError(f"malformed request message: {self.message}")


def _tolerant(decode):
    """``decode`` (a request deserializer) that hands a :class:`MalformedRequest` to the
    servicer instead of raising: grpcio answers a request its deserializer cannot parse
    ``UNKNOWN`` (and logs an error); the servicer answers it ``INVALID_ARGUMENT`` like any bad
    input."""
    def tolerant(data: bytes):
        try:
            return decode(data)
        except DecodeError as exc:
            return MalformedRequest(str(exc))

    return tolerant


class _Registrations:
    """Stands for a server while ``add_GRPCInferenceServiceServicer_to_server`` registers the
    servicer's method handlers, so that they can be changed before the real server has them."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers, wrapped in a generic one: register_handlers makes it anew

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.registered.append((service, handlers))


def tolerant_handlers(servicer) -> tuple[str, dict[str, grpc.RpcMethodHandler]] | None:
    """``servicer``'s method handlers (the service's name, the handlers by method) with every
    request deserializer made tolerant (:func:`_tolerant`) once, at registration, so that no
    per-RPC interceptor is needed (an interceptor costs every RPC a coroutine chain and a new
    handler: ~10 % of a ``ModelInfer``'s server CPU, measured).  ``None`` when the generated
    code does not expose its handlers (an older ``tritonclient``): then use
    :class:`TolerantDecoding`."""
    reg = _Registrations()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, reg)
    if len(reg.registered) != 1:
        return None
    service, handlers = reg.registered[0]
    return service, {name: h._replace(request_deserializer=_tolerant(h.request_deserializer))
                     if h.request_deserializer is not None else h
                     for name, h in handlers.items()}


def register_handlers(server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Register what :func:`tolerant_handlers` returned, as the generated code would."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class TolerantDecoding(grpc.aio.ServerInterceptor):
    """:func:`tolerant_handlers` as an interceptor, per RPC, for generated code that does not
    expose its method handlers."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        decode = getattr(handler, "request_deserializer", None)
        if decode is None:
            return handler
        return handler._replace(request_deserializer=_tolerant(decode))


def _answers_errors(method):
    """Wrap a unary RPC so that every exception becomes a status (never an unhandled one)."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every caller gets a status, see grpc_status
            await _abort(context, exc, method.__name__)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, rpc: str) -> None:
    """End the RPC with ``exc``'s status (an unexpected one logged)."""
    code, message = grpc_status(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", rpc, exc_info=exc)
    trailing = ((REJECT_REASON_KEY, exc.reason),) \
        if isinstance(exc, RequestRejectedError) else ()
    await context.abort(code, message, trailing_metadata=trailing)


# ---- requests in ----------------------------------------------------------------------------
#: KServe v2 datatype -> the typed field of ``InferTensorContents`` holding it (FP16 has none).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _parameter_values(params) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values (``None`` when unset)."""
    out = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out




def _from_contents(contents, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None or datatype == "BYTES":
        raise BadInputError(f"{where}: {datatype} inputs cannot be sent in typed contents "
                            "here; send them in raw_input_contents")
    values = getattr(contents, field)
    expected = int(np.prod(shape, dtype=np.int64))
    if len(values) != expected:
        raise BadInputError(f"{where}: contents.{field} has {len(values)} elements but shape "
                            f"{list(shape)} needs {expected}")
    try:
        return np.fromiter(values, dtype=V2_TO_NUMPY[datatype], count=expected).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadInputError(f"{where}: contents.{field} holds a value out of range for "
                            f"{datatype} ({exc})") from None


#: Checked request layouts kept per model (see parse_model_infer), and the most kept.
LAYOUTS_PER_MODEL = 256
#: model name -> (the ServedModel they were checked against, {key: layout})
_LAYOUTS: dict[str, tuple[ServedModel, dict[tuple, tuple]]] = {}


def _layout_key(request: service_pb2.ModelInferRequest) -> tuple | None:
    """What a request's validation depends on, besides its model: its input and output
    declarations and its parameters (as their wire bytes) and the sizes of its raw contents;
    ``None`` when it has no raw contents (parsed every time)."""
    if not request.raw_input_contents:
        return None
    params = request.parameters
    return (tuple([t.SerializeToString() for t in request.inputs]),
            tuple([o.SerializeToString() for o in request.outputs]),
            tuple([len(r) for r in request.raw_input_contents]),
            tuple(sorted([(k, p.SerializeToString()) for k, p in params.items()]))
            if params else ())


def parse_model_infer(request: service_pb2.ModelInferRequest, model: ServedModel) -> ParsedInfer:
    """Validate a ``ModelInferRequest`` against ``model``; the returned arrays have shape
    ``(batch, ...)`` and the model's dtypes.  Arrays decoded from ``raw_input_contents`` are
    read-only views of the request's bytes (no copy).  Raises ``BadInputError`` with REST's
    wording wherever the check is the same.

    A client sends the same declarations with every frame: a request whose inputs, outputs
    and parameters are declared as an earlier one's (byte for byte, the raw contents of the
    same sizes; its id may differ) is answered from what was checked then."""
    key = _layout_key(request)
    if key is None:
        return _parse_model_infer(request, model)
    layouts = kept_for(_LAYOUTS, model)
    layout = layouts.get(key)
    raw = request.raw_input_contents
    if layout is not None:
        inputs, batch, outputs, timeout_us, params = layout
        return ParsedInfer(request.id or None, batch,
                           {name: np.frombuffer(raw[i], dtype=dtype).reshape(shape)
                            for name, i, dtype, shape in inputs},
                           list(outputs), timeout_us=timeout_us,
                           parameters=dict(params) if params else {})
    parsed = _parse_model_infer(request, model)
    if len(layouts) >= LAYOUTS_PER_MODEL:
        layouts.clear()
    layouts[key] = (tuple((t.name, i, parsed.inputs[t.name].dtype, parsed.inputs[t.name].shape)
                          for i, t in enumerate(request.inputs)),
                    parsed.batch_size, tuple(parsed.outputs), parsed.timeout_us,
                    dict(parsed.parameters))
    return parsed


def _parse_model_infer(request: service_pb2.ModelInferRequest,
                       model: ServedModel) -> ParsedInfer:
    items, raw = request.inputs, request.raw_input_contents
    if raw and len(raw) != len(items):
        raise BadInputError(f"request has {len(raw)} raw_input_contents for {len(items)} "
                            "inputs; give raw contents for every input or for none")
    arrays: dict[str, np.ndarray] = {}
    for i, item in enumerate(items):
        name, datatype = item.name, item.datatype
        where = f"input {name!r}"
        shape = check_input(model, name, datatype, list(item.shape), arrays)
        if raw:
            if item.HasField("contents"):
                raise BadInputError(f"{where}: has both raw_input_contents and contents; "
                                    "give one")
            arrays[name] = tensor_from_bytes(raw[i], datatype, shape, name,
                                             source="raw_input_contents has")
        elif item.HasField("contents"):
            arrays[name] = _from_contents(item.contents, datatype, shape, where)
        else:
            raise BadInputError(f"{where}: has neither raw_input_contents nor contents")
    batch = request_batch(model, arrays)
    params = _parameter_values(request.parameters)
    wanted = [{"name": o.name, "parameters": _parameter_values(o.parameters)}
              for o in request.outputs]
    return ParsedInfer(request.id or None, batch, arrays,
                       requested_outputs(wanted or None, params, model),
                       timeout_us=timeout_us_of(params), parameters=params)


# ---- responses out ----------------------------------------------------------------------------
#: Responses without their raw contents, id and parameters, by what they hold (the model,
#: the outputs' names, datatypes and shapes), as wire bytes; and the most kept.
_RESPONSES: dict[tuple, bytes] = {}
RESPONSES_KEPT = 1024


def build_model_infer_response(model: ServedModel, parsed: ParsedInfer,
                               outcome: InferOutcome) -> service_pb2.ModelInferResponse:
    """The requested outputs (batch-major, the samples in request order) as
    ``raw_output_contents``; parameters ``ppipe_latency_ms`` and ``ppipe_batch_size`` are the
    worst sample's, as REST's ``X-PPipe-*`` headers.

    The rest of a response (model, outputs' names, datatypes, shapes) is built once per
    such combination and kept; each response starts from a copy of it."""
    key: list[Any] = [model.name]
    raws = []
    for want in parsed.outputs:
        array, datatype = output_as_requested(want, outcome.outputs[want.name])
        raws.append(tensor_bytes(array, datatype))
        key += (want.name, datatype, array.shape)
    key = tuple(key)
    kept = _RESPONSES.get(key)
    if kept is None:
        full = _build_model_infer_response(model, parsed, outcome)
        bare = service_pb2.ModelInferResponse()
        bare.CopyFrom(full)
        bare.ClearField("id")
        bare.ClearField("raw_output_contents")
        bare.ClearField("parameters")
        if len(_RESPONSES) >= RESPONSES_KEPT:
            _RESPONSES.clear()
        _RESPONSES[key] = bare.SerializeToString()
        return full
    response = service_pb2.ModelInferResponse.FromString(kept)
    if parsed.request_id:
        response.id = parsed.request_id
    response.raw_output_contents.extend(raws)
    params = response.parameters
    params["ppipe_latency_ms"].double_param = outcome.worst_latency_ms
    params["ppipe_batch_size"].int64_param = outcome.worst_batch_size
    return response


def _build_model_infer_response(model: ServedModel, parsed: ParsedInfer,
                                outcome: InferOutcome) -> service_pb2.ModelInferResponse:
    tensors, raws = [], []
    for want in parsed.outputs:
        array, datatype = output_as_requested(want, outcome.outputs[want.name])
        tensors.append(service_pb2.ModelInferResponse.InferOutputTensor(
            name=want.name, datatype=datatype, shape=array.shape))
        raws.append(tensor_bytes(array, datatype))
    return service_pb2.ModelInferResponse(
        model_name=model.name, model_version="1", id=parsed.request_id or "",
        outputs=tensors, raw_output_contents=raws,
        parameters={"ppipe_latency_ms": service_pb2.InferParameter(
                        double_param=outcome.worst_latency_ms),
                    "ppipe_batch_size": service_pb2.InferParameter(
                        int64_param=outcome.worst_batch_size)})


# ---- the servicer --------------------------------------------------------------------------
def _unimplemented(rpc: str, why: str):
    async def method(self, request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{rpc} is not supported by {SERVER_NAME}: {why}")

    method.__name__ = rpc
    return method


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The RPCs over ``service``.  Called on the server's event loop; waits for answers
    without blocking it."""

    def __init__(self, service: InferenceService):
        self._service = service

    # ---- server ----
    @_answers_errors
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @_answers_errors
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self._service.ready)

    @_answers_errors
    async def ServerMetadata(self, request, context):
        meta = self._service.server_metadata()
        return service_pb2.ServerMetadataResponse(name=meta.name, version=meta.version,
                                                  extensions=meta.extensions)

    @_answers_errors
    async def RepositoryIndex(self, request, context):
        index = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state)
            for e in self._service.repository_index(ready_only=request.ready)])

    # ---- models ----
    @_answers_errors
    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(
            ready=self._service.model_ready(request.name, request.version))

    @_answers_errors
    async def ModelMetadata(self, request, context):
        meta = self._service.model_metadata(request.name, request.version)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape)
                     for t in meta.outputs])

    @_answers_errors
    async def ModelConfig(self, request, context):
        config = self._service.model_config(request.name, request.version)
        return service_pb2.ModelConfigResponse(
            config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @_answers_errors
    async def ModelStatistics(self, request, context):
        stats = self._service.statistics(request.name, request.version)
        return service_pb2.ModelStatisticsResponse(
            model_stats=[json_format.ParseDict(s, service_pb2.ModelStatistics()) for s in stats])

    # ---- inference ----
    async def _infer(self, request: service_pb2.ModelInferRequest
                     ) -> service_pb2.ModelInferResponse:
        if isinstance(request, MalformedRequest):
            raise request.error()
        model = self._service.model(request.model_name, request.model_version)
        if not request.raw_input_contents and request.ByteSize() > _OFFLOAD_BYTES:
            parsed = await asyncio.to_thread(parse_model_infer, request, model)
        else:
            parsed = parse_model_infer(request, model)
        outcome = await self._service.infer(model, parsed)
        return build_model_infer_response(model, parsed, outcome)

    async def ModelInfer(self, request, context):
        # _answers_errors and _infer, inline: every inference comes here
        try:
            if isinstance(request, MalformedRequest):
                raise request.error()
            service = self._service
            model = service.model(request.model_name, request.model_version)
            if not request.raw_input_contents and request.ByteSize() > _OFFLOAD_BYTES:
                parsed = await asyncio.to_thread(parse_model_infer, request, model)
            else:
                parsed = parse_model_infer(request, model)
            outcome = await service.infer(model, parsed)
            return build_model_infer_response(model, parsed, outcome)
        except Exception as exc:  # noqa: BLE001 - as _answers_errors
            await _abort(context, exc, "ModelInfer")

    async def ModelStreamInfer(self, request_iterator, context):
        """Answers each request of the stream as soon as it is done (not in order; match
        them by ``id``); a failed request is answered with ``error_message`` and the stream
        goes on."""
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def answer(request) -> None:
            try:
                answers.put_nowait(service_pb2.ModelStreamInferResponse(
                    infer_response=await self._infer(request)))
            except Exception as exc:  # noqa: BLE001 - answered on the stream, see grpc_status
                code, message = grpc_status(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("ModelStreamInfer failed")
                answers.put_nowait(service_pb2.ModelStreamInferResponse(
                    error_message=message, infer_response=service_pb2.ModelInferResponse(
                        model_name=request.model_name, id=request.id)))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.wait(list(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # surfaces a broken request stream
        finally:
            for task in [reader, *running]:
                task.cancel()

    # ---- not offered ----
    RepositoryModelLoad = _unimplemented(
        "RepositoryModelLoad", "models are loaded from the plan at start-up")
    RepositoryModelUnload = _unimplemented(
        "RepositoryModelUnload", "models are loaded from the plan at start-up")
    SystemSharedMemoryStatus = _unimplemented(
        "SystemSharedMemoryStatus", "send tensors in the request")
    SystemSharedMemoryRegister = _unimplemented(
        "SystemSharedMemoryRegister", "send tensors in the request")
    SystemSharedMemoryUnregister = _unimplemented(
        "SystemSharedMemoryUnregister", "send tensors in the request")
    CudaSharedMemoryStatus = _unimplemented(
        "CudaSharedMemoryStatus", "send tensors in the request")
    CudaSharedMemoryRegister = _unimplemented(
        "CudaSharedMemoryRegister", "send tensors in the request")
    CudaSharedMemoryUnregister = _unimplemented(
        "CudaSharedMemoryUnregister", "send tensors in the request")
    TraceSetting = _unimplemented("TraceSetting", "tracing is not offered")
    LogSettings = _unimplemented("LogSettings", "log settings are fixed at start-up")


# ---- access control ------------------------------------------------------------------------------
class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses an RPC without ``authorization: Bearer <token>`` metadata with
    ``UNAUTHENTICATED`` (:mod:`api.auth`), except the health RPCs.  The refusing handler
    takes the request undecoded, so that a malformed message is refused for its missing
    token, not parsed."""

    def __init__(self, auth: BearerAuth):
        self._auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_RPCS:
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                if self._auth.allows(value):
                    return handler
                break
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_REFUSAL)

    async def refuse_stream(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_REFUSAL)
        yield  # an async generator, as a response-streaming handler must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


# ---- hosting ------------------------------------------------------------------------------------
def server_options(settings: ApiSettings) -> list[tuple[str, int]]:
    """Channel options: REST's body limit as the largest message received (gRPC refuses a
    larger one with RESOURCE_EXHAUSTED), and no port sharing, so that a port already in use
    is an error rather than a second server silently taking half the connections -- unless
    ``settings.reuse_port`` (front-end processes of one server share its ports)."""
    return [("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0)]


class GrpcFrontEnd:
    """The gRPC front end on the caller's event loop.  ``start`` once, ``stop`` once."""

    def __init__(self) -> None:
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self, service: InferenceService, host: str = "127.0.0.1",
                    port: int = 8001, settings: ApiSettings | None = None) -> int:
        """Listen on ``host:port`` (``port`` 0: any free port) and answer from ``service``
        (UNAVAILABLE while it has no runtime).  ``settings``: the message size limit and the
        bearer token (``auth_token``).
        Returns the bound port; raises ``PPipeError`` when the address cannot be bound."""
        if self._server is not None:
            raise PPipeError("the gRPC front end is already started")
        settings = settings or ApiSettings()
        servicer = InferenceServicer(service)
        handlers = tolerant_handlers(servicer)
        interceptors: list = [] if handlers is not None else [TolerantDecoding()]
        if settings.auth_token is not None:
            interceptors.append(BearerTokenInterceptor(BearerAuth(settings.auth_token)))
        # no interceptor on the common path: grpcio then skips its per-RPC chain
        server = grpc.aio.server(options=server_options(settings),
                                 interceptors=interceptors or None)
        if handlers is not None:
            register_handlers(server, *handlers)
        else:
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") \
            else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PPipeError(f"cannot listen for gRPC on {address}: {exc}") from None
        if not bound:
            raise PPipeError(f"cannot listen for gRPC on {address} (address in use?)")
        await server.start()
        self._server, self.port = server, bound
        return bound

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new RPCs, give those in flight ``grace_s`` seconds, then cancel them."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace_s)


class GrpcServerThread:
    """A :class:`GrpcFrontEnd` on its own event loop in a daemon thread.

    ``with GrpcServerThread(service) as srv:`` serves on ``srv.url`` (``host:port``) until
    the block ends; the service's runtime stays the caller's to start and stop.
    """

    def __init__(self, service: InferenceService, host: str = "127.0.0.1", port: int = 0,
                 settings: ApiSettings | None = None, grace_s: float = 1.0,
                 start_timeout_s: float = 30.0):
        self._args = (service, host, port, settings)
        self._grace_s = grace_s
        self._start_timeout_s = start_timeout_s
        self._front = GrpcFrontEnd()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name="ppipe-grpc")
        self.host = host
        self.port = 0

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                self.port = loop.run_until_complete(self._front.start(*self._args))
            except BaseException as exc:  # handed to the thread that waits in __enter__
                self._error = exc
                return
            finally:
                self._started.set()
            loop.run_forever()
        finally:
            loop.close()

    def __enter__(self) -> "GrpcServerThread":
        self._thread.start()
        if not self._started.wait(self._start_timeout_s):
            raise PPipeError(f"the gRPC server did not start within {self._start_timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._front.stop(self._grace_s), loop).result(
            self._grace_s + 30.0)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(30.0)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
