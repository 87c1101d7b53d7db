"""Triton's binary tensor extension and the KServe v2 datatypes.

A request or response body may be a JSON header followed by raw tensor bytes; the header's
length is given by the ``Inference-Header-Content-Length`` HTTP header, and each binary
tensor's size by its ``parameters.binary_data_size``, in the order the tensors are listed.
Tensors are little-endian, row-major; a ``BYTES`` element is a 4-byte little-endian length
followed by that many bytes.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from ppipe_trt.errors import BadInputError

HEADER_LENGTH = "Inference-Header-Content-Length"

#: KServe v2 datatype -> numpy dtype (BYTES is handled separately).
V2_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2 = {v.name: k for k, v in V2_TO_NUMPY.items()}
V2_DATATYPES = tuple(V2_TO_NUMPY) + ("BYTES",)
#: The little-endian numpy dtype each datatype is read as.
_V2_TO_WIRE = {k: v.newbyteorder("<") for k, v in V2_TO_NUMPY.items()}
#: v2_datatype's answers by argument (a dtype or its name): the hot path asks the same few.
_V2_OF: dict = {}


def v2_datatype(numpy_dtype: str | np.dtype) -> str:
    try:
        return _V2_OF[numpy_dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable argument
        pass
    name = np.dtype(numpy_dtype).name
    try:
        v2 = NUMPY_TO_V2[name]
    except KeyError:
        raise BadInputError(f"numpy dtype {name} has no KServe v2 datatype") from None
    if len(_V2_OF) < 256:
        _V2_OF[numpy_dtype] = v2
    return v2


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """Split a request body into (JSON header, binary section).

    ``header_length`` is the raw ``Inference-Header-Content-Length`` value or ``None`` (then
    the whole body is JSON and the binary section is empty).
    """
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise BadInputError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadInputError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes; "
                            f"expected 1..{len(body)}")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def tensor_from_bytes(raw: memoryview | bytes, datatype: str, shape: tuple[int, ...],
                      name: str, source: str = "binary_data_size is") -> np.ndarray:
    """A read-only array over ``raw`` (no copy) after checking its size against ``shape``.
    ``source`` names where the bytes came from in the error (REST's binary_data_size,
    gRPC's raw_input_contents)."""
    dtype = _V2_TO_WIRE[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadInputError(f"input {name!r}: {source} {len(raw)} bytes but shape "
                            f"{list(shape)} of {datatype} needs {expected} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    """Serialize a BYTES tensor (flattened, row-major) the Triton way."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes_tensor(raw: memoryview | bytes) -> list[bytes]:
    out, i, raw = [], 0, bytes(raw)
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadInputError("BYTES tensor is truncated (a 4-byte length prefix is cut off)")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise BadInputError(f"BYTES tensor element of {n} bytes runs past the end")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out
