"""KServe v2 inference requests in, responses out: parsing and validation against a model.

Every problem raises :class:`~ppipe_trt.errors.BadInputError` with a message naming the
field and what was expected (the router turns it into a 400).  Numbers are checked strictly:
a tensor's element count must equal the product of its shape, and binary sections must add
up to exactly the bytes after the JSON header.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from api.binary import (V2_DATATYPES, V2_TO_NUMPY, encode_bytes_tensor, split_body,
                        tensor_from_bytes, v2_datatype)
from ppipe_trt.errors import BadInputError
from ppipe_trt.serving.runtime import ServedModel

_LITTLE_ENDIAN = sys.byteorder == "little"
#: Samples one HTTP request may carry (each becomes one scheduler request).
MAX_SAMPLES_PER_REQUEST = 64


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int = 0  # > 0: return the top-k "score:index" strings instead


@dataclass(slots=True)
class ParsedInfer:
    """A validated request: ``inputs`` arrays have shape ``(batch, ...)`` and the model's
    dtypes; ``outputs`` lists what to return."""

    request_id: str | None
    batch_size: int
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput]
    timeout_us: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _loads(header: bytes) -> Any:
    try:
        return json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"malformed JSON in the request body: {exc}") from None


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in value):
        raise BadInputError(f"{where}: 'shape' must be a list of non-negative integers, got "
                            f"{value!r}")
    return tuple(value)


def timeout_us_of(params: dict[str, Any]) -> float | None:
    if "timeout_ms" in params:
        value, scale, key = params["timeout_ms"], 1000.0, "timeout_ms"
    elif "timeout" in params:  # Triton's per-request timeout, in microseconds
        value, scale, key = params["timeout"], 1.0, "timeout"
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise BadInputError(f"parameters.{key} must be a positive number, got {value!r}")
    return float(value) * scale


def check_input(model: ServedModel, name: str, datatype: Any, shape: Any,
                seen: dict[str, np.ndarray]) -> tuple[int, ...]:
    """Check one declared input tensor (any protocol) against ``model``: known name, not in
    ``seen`` yet, the model's datatype, a shape matching the model's with batch >= 1.
    Returns the shape."""
    where = f"input {name!r}"
    spec = model.input(name)
    if spec is None:
        raise BadInputError(f"unknown input {name!r} for model {model.name!r}; expected "
                            f"inputs: {sorted(s.name for s in model.inputs)}")
    if name in seen:
        raise BadInputError(f"input {name!r} is given twice")
    if datatype not in V2_DATATYPES:
        raise BadInputError(f"{where}: unknown datatype {datatype!r}; expected one of "
                            f"{list(V2_DATATYPES)}")
    want = v2_datatype(spec.dtype)
    if datatype != want:
        raise BadInputError(f"{where}: datatype {datatype} but model {model.name!r} "
                            f"expects {want}")
    shape = _shape(shape, where)
    if len(shape) != len(spec.shape) or any(
            e not in (-1, d) for e, d in zip(spec.shape[1:], shape[1:])) or not shape \
            or shape[0] < 1:
        expect = ["N" if d == -1 else d for d in spec.shape]
        raise BadInputError(f"{where}: shape {list(shape)} does not match the model's "
                            f"{expect} (N = batch >= 1)")
    return shape


def request_batch(model: ServedModel, arrays: dict[str, np.ndarray]) -> int:
    """The request's batch once every input is decoded (any protocol): all inputs present,
    one batch dimension, at most ``MAX_SAMPLES_PER_REQUEST`` samples."""
    missing = sorted({s.name for s in model.inputs} - set(arrays))
    if missing:
        raise BadInputError(f"missing inputs {missing} for model {model.name!r}")
    batches = {a.shape[0] for a in arrays.values()}
    if len(batches) != 1:
        raise BadInputError(f"inputs disagree on the batch dimension: {sorted(batches)}")
    batch = batches.pop()
    if batch > MAX_SAMPLES_PER_REQUEST:
        raise BadInputError(f"batch {batch} is larger than {MAX_SAMPLES_PER_REQUEST} samples "
                            "per request")
    return batch


@dataclass(frozen=True, slots=True)
class _Layout:
    """What a validated JSON header says, for the model it was checked against: every input
    binary (name, numpy wire dtype, shape, offset, size in the binary section), and the rest
    of the :class:`ParsedInfer` it gave."""

    inputs: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]
    binary_size: int
    request_id: str | None
    batch_size: int
    outputs: tuple[RequestedOutput, ...]
    timeout_us: float | None
    parameters: dict[str, Any]


#: Validated headers kept per model (a client sends the same JSON header with every frame of
#: a stream; only the binary section changes), and the largest header kept.
LAYOUTS_PER_MODEL = 256
LAYOUT_MAX_HEADER_BYTES = 4096
#: model name -> (the ServedModel the layouts were checked against, {header: layout})
_LAYOUTS: dict[str, tuple[ServedModel, dict[bytes | tuple[str, bytes], _Layout]]] = {}
#: A header's leading string id, as clients write it: ``{"id":"...",`` (no escapes, no
#: control characters: such an id is read by the full parse).
_LEADING_ID = re.compile(
    rb'\{[ \t\n\r]*"id"[ \t\n\r]*:[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*,')


def kept_for(store: dict[str, tuple[ServedModel, dict]], model: ServedModel) -> dict:
    """``model``'s dict of what was checked for it in ``store`` (by model name; started over
    when a new model object takes the name, e.g. after a plan swap)."""
    entry = store.get(model.name)
    if entry is None or entry[0] is not model:
        entry = store[model.name] = (model, {})
    return entry[1]


def parse_infer_request(body: bytes, header_length: str | None,
                        model: ServedModel) -> ParsedInfer:
    """Parse and validate a KServe v2 request body (JSON, or a JSON header and binary
    tensors) for ``model``.

    A JSON header whose inputs are all binary is checked once per model: the next request
    with the same header bytes and the same binary size is answered from what was checked
    (its tensors are views of its own bytes), without decoding the JSON again.  Requests
    carrying ``data`` in the JSON are parsed every time."""
    header, binary = split_body(body, header_length)
    layouts = kept_for(_LAYOUTS, model)
    # A header that opens with its id (perf_analyzer and Triton's clients write a new one in
    # every request) is kept without it: the id is read from the request itself.
    request_id = None
    key: bytes | tuple[str, bytes] = header
    m = _LEADING_ID.match(header)
    if m is not None:
        try:
            request_id = m.group(1).decode("utf-8")
        except UnicodeDecodeError:  # not JSON: the full parse says so
            m = None
        else:
            key = ("id", header[m.end():])
    layout = layouts.get(key)
    if layout is not None and layout.binary_size == len(binary):
        return ParsedInfer(
            request_id if m is not None else layout.request_id, layout.batch_size,
            {name: np.frombuffer(binary[off:off + size], dtype=dtype).reshape(shape)
             for name, dtype, shape, off, size in layout.inputs},
            list(layout.outputs), layout.timeout_us,
            dict(layout.parameters) if layout.parameters else {})
    parsed, places = _parse(header, binary, model)
    if places is not None and len(header) <= LAYOUT_MAX_HEADER_BYTES \
            and (m is None or parsed.request_id == request_id):  # (not: the id given twice)
        if len(layouts) >= LAYOUTS_PER_MODEL:  # e.g. a client with an id in every header
            layouts.clear()
        layouts[key] = _Layout(
            tuple((name, parsed.inputs[name].dtype, parsed.inputs[name].shape, off, size)
                  for name, off, size in places),
            len(binary), parsed.request_id, parsed.batch_size, tuple(parsed.outputs),
            parsed.timeout_us, dict(parsed.parameters))
    return parsed


def _parse(header: bytes, binary: memoryview, model: ServedModel
           ) -> tuple[ParsedInfer, list[tuple[str, int, int]] | None]:
    """Parse and check the JSON ``header`` and its ``binary`` section; also (name, offset,
    size) of every input when all are binary, else ``None``."""
    doc = _loads(header)
    if not isinstance(doc, dict):
        raise BadInputError("request body must be a JSON object with an 'inputs' list")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadInputError("request needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadInputError("'parameters' must be a JSON object")
    arrays: dict[str, np.ndarray] = {}
    places: list[tuple[str, int, int]] | None = []
    offset = 0
    for i, item in enumerate(items):
        where = f"inputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadInputError(f"{where} must be an object with a string 'name'")
        name = item["name"]
        where = f"input {name!r}"
        datatype = item.get("datatype")
        shape = check_input(model, name, datatype, item.get("shape"), arrays)
        iparams = item.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise BadInputError(f"{where}: 'parameters' must be a JSON object")
        size = iparams.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise BadInputError(f"{where}: has both 'data' and binary_data_size; give one")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadInputError(f"{where}: binary_data_size must be a non-negative integer,"
                                    f" got {size!r}")
            if offset + size > len(binary):
                raise BadInputError(
                    f"binary sizes do not add up: input {name!r} needs bytes "
                    f"{offset}..{offset + size} of the binary section but it has "
                    f"{len(binary)} bytes after the {len(header)}-byte JSON header")
            arrays[name] = tensor_from_bytes(binary[offset:offset + size], datatype, shape, name)
            if places is not None:
                places.append((name, offset, size))
            offset += size
        elif "data" in item:
            arrays[name] = _json_tensor(item["data"], datatype, shape, where)
            places = None
        else:
            raise BadInputError(f"{where}: has neither 'data' nor parameters.binary_data_size")
    if offset != len(binary):
        raise BadInputError(f"binary sizes do not add up: inputs declare {offset} bytes but "
                            f"{len(binary)} bytes follow the JSON header")
    return ParsedInfer(
        request_id=str(doc["id"]) if doc.get("id") is not None else None,
        batch_size=request_batch(model, arrays), inputs=arrays,
        outputs=requested_outputs(doc.get("outputs"), params, model),
        timeout_us=timeout_us_of(params), parameters=params), places


def _json_tensor(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    if datatype == "BYTES":
        raise BadInputError(f"{where}: BYTES inputs are not supported by this server")
    try:
        array = np.asarray(data, dtype=V2_TO_NUMPY[datatype])
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{where}: 'data' is not a (nested) list of {datatype} numbers "
                            f"({exc})") from None
    expected = int(np.prod(shape, dtype=np.int64))
    if array.size != expected:
        raise BadInputError(f"{where}: 'data' has {array.size} elements but shape "
                            f"{list(shape)} needs {expected}")
    return array.reshape(shape)


def requested_outputs(items: Any, params: dict[str, Any],
                       model: ServedModel) -> list[RequestedOutput]:
    default_binary = bool(params.get("binary_data_output", False))
    names = [o.name for o in model.outputs]
    if items is None:
        return [RequestedOutput(n, default_binary) for n in names]
    if not isinstance(items, list):
        raise BadInputError("'outputs' must be a list of {\"name\": ...} objects")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadInputError(f"outputs[{i}] must be an object with a string 'name'")
        if item["name"] not in names:
            raise BadInputError(f"unknown output {item['name']!r} for model {model.name!r}; "
                                f"outputs: {names}")
        p = item.get("parameters") or {}
        if not isinstance(p, dict):
            raise BadInputError(f"outputs[{i}].parameters must be a JSON object")
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadInputError(f"output {item['name']!r}: classification must be a "
                                f"non-negative integer, got {k!r}")
        out.append(RequestedOutput(item["name"], bool(p.get("binary_data", default_binary)), k))
    return out


def classification_strings(scores: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: per sample, the top ``k`` as ``b"score:index"``."""
    flat = scores.reshape(scores.shape[0], -1).astype(np.float64)
    k = min(k, flat.shape[1])
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    return np.array([[f"{flat[r, c]:f}:{c}".encode() for c in row] for r, row in enumerate(top)],
                    dtype=object)


def output_as_requested(want: RequestedOutput, array: np.ndarray) -> tuple[np.ndarray, str]:
    """An output as it is sent (any protocol) and its KServe v2 datatype: the top-k strings
    (``BYTES``) when ``want`` asks for classification, else the array itself."""
    if want.classification:
        return classification_strings(array, want.classification), "BYTES"
    return array, v2_datatype(array.dtype)


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    """A tensor's binary form (any protocol): row-major, little-endian; ``BYTES`` elements
    each with a 4-byte length prefix."""
    if datatype == "BYTES":
        return encode_bytes_tensor(list(array.ravel()))
    order = array.dtype.byteorder
    if order == "<" or order == "|" or (order == "=" and _LITTLE_ENDIAN):  # as they are
        return array.tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


#: JSON headers of binary responses, by what they depend on (see _binary_response).
_RESPONSE_HEADERS: dict[tuple, bytes] = {}
RESPONSE_HEADERS_KEPT = 1024


def build_infer_response(model: ServedModel, parsed: ParsedInfer,
                         outputs: dict[str, np.ndarray],
                         extra_parameters: dict[str, Any] | None = None
                         ) -> tuple[bytes, int | None]:
    """Serialize ``outputs`` (batch-major arrays) as the request asked.

    Returns ``(body, json_header_length)``; the length is ``None`` when the body is plain
    JSON (no output was asked in binary).
    """
    if not extra_parameters:
        answer = _binary_response(model, parsed, outputs)
        if answer is not None:
            return answer
    return _build_response(model, parsed, outputs, extra_parameters)


def _binary_response(model: ServedModel, parsed: ParsedInfer,
                     outputs: dict[str, np.ndarray]) -> tuple[bytes, int] | None:
    """:func:`build_infer_response` of a request that asked every output in binary and none
    as a classification: the JSON header depends only on the model, the outputs' names,
    datatypes and shapes (and the request's id, which comes last), so it is built once and
    kept; ``None`` for any other request."""
    key: list[Any] = [model.name]
    raws = []
    for want in parsed.outputs:
        if not want.binary or want.classification:
            return None
        array = outputs[want.name]
        datatype = v2_datatype(array.dtype)
        raws.append(tensor_bytes(array, datatype))
        key += (want.name, datatype, array.shape)
    key = tuple(key)
    header = _RESPONSE_HEADERS.get(key)
    if header is None:
        body, length = _build_response(model, dataclasses.replace(parsed, request_id=None),
                                       outputs, None)
        header = body[:length]
        if len(_RESPONSE_HEADERS) >= RESPONSE_HEADERS_KEPT:
            _RESPONSE_HEADERS.clear()
        _RESPONSE_HEADERS[key] = header
    if parsed.request_id is not None:  # as json.dumps writes it, last: ,"id":"..."}
        header = b"".join((header[:-1], b',"id":', json.dumps(parsed.request_id).encode(),
                           b"}"))
    return header + b"".join(raws), len(header)


def _build_response(model: ServedModel, parsed: ParsedInfer, outputs: dict[str, np.ndarray],
                    extra_parameters: dict[str, Any] | None) -> tuple[bytes, int | None]:
    entries, chunks = [], []
    for want in parsed.outputs:
        array, datatype = output_as_requested(want, outputs[want.name])
        entry: dict[str, Any] = {"name": want.name, "datatype": datatype,
                                 "shape": list(array.shape)}
        if want.binary:
            raw = tensor_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = ([b.decode() for b in array.ravel()] if datatype == "BYTES"
                             else array.ravel().tolist())
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": entries}
    if parsed.request_id is not None:
        doc["id"] = parsed.request_id
    if extra_parameters:
        doc["parameters"] = extra_parameters
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
