"""Graph analysis of an ONNX model: topological order, cut sets and their sizes.

A *position* ``p`` is the place right after node ``p`` in topological order (nodes that only
compute constants are left out of the order: every sub-graph that needs them gets a copy).  The
*cut set* at ``p`` is every non-constant tensor produced at or before ``p`` (model inputs count
as produced before node 0) and consumed after ``p`` or returned as a model output, so a long
skip connection from node 3 to node 40 is in the cut set of every position 3..39, and a model
output produced early is carried to the end.  Sizes are bytes *per sample*: the batch
dimension (dim 0 of every tensor whose first dimension is the symbolic batch) is excluded.

Batch dimensions are known, not guessed: :func:`normalize_model` hands the shape-inferred
model to :mod:`ppipe_trt.engines.batch_dims`, which measures the tensors inference leaves
unproven, folds or recomputes the non-batched ones where it can (a tensor without a batch
dimension may not cross a cut) and declares every live tensor in ``value_info``, so a saved
normalized model reloads with the same classification and no measurement.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ppipe_trt.engines.backends.base import TensorSpec
from ppipe_trt.errors import BadInputError

MIN_OPSET = 13
BATCH_DIM = "batch"
#: dim_param of a dimension that changes with the batch size but is not the batch (only in
#: non-batched tensors, e.g. ``x.view(-1)``); :class:`TensorInfo` writes it as ``VARYING_DIM``.
NONBATCH_DIM = "batch_dependent"
VARYING_DIM = -2
_FLOAT_TYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor's dtype and shape; ``shape[0] == -1`` when dim 0 is the batch dimension,
    ``VARYING_DIM`` (-2) for a dimension of a non-batched tensor that changes with the batch."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def has_batch_dim(self) -> bool:
        return bool(self.shape) and self.shape[0] == -1

    def bytes_per_sample(self, fp16_floats: bool = False) -> int:
        """Bytes of one sample; with ``fp16_floats`` float32/64 tensors count 2 bytes an element."""
        dims = self.shape[1:] if self.has_batch_dim else self.shape
        count = int(np.prod(dims, dtype=np.int64)) if dims else 1
        itemsize = np.dtype(self.dtype).itemsize
        if fp16_floats and self.dtype in ("float32", "float64"):
            itemsize = 2
        return count * itemsize

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)


def _dtype_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _subgraph_outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a nested graph (If/Loop/Scan body) reads from the enclosing scope."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    refs: set[str] = set()
    for node in graph.node:
        for name in _node_inputs(node):
            if name not in defined:
                refs.add(name)
        defined.update(node.output)
    return refs


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            names.extend(sorted(_subgraph_outer_refs(sub)))
    return names


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def load_onnx(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise BadInputError(f"ONNX model {path} not found; expected a path to a .onnx file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BadInputError(f"{path}: not a readable ONNX model ({exc})") from None


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with: opset checked, every node named uniquely, dim 0 of the model's inputs and
    outputs made the symbolic ``batch``, shapes re-inferred, then batch dimensions resolved
    (:func:`~ppipe_trt.engines.batch_dims.resolve_batch_dims`: non-batched tensors folded
    or recomputed where possible, every live tensor declared).  The source is not modified.
    Runs the model with ONNX Runtime at batch 2, 3 and 4 when shape inference leaves any live
    tensor unproven."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise BadInputError(
            f"model opset {opset}; expected >= {MIN_OPSET} (convert it with "
            "onnx.version_converter.convert_version(model, 17))")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    for vi in list(graph.input) + list(graph.output):
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.shape.dim:
            continue
        tt.shape.dim[0].ClearField("dim_value")
        tt.shape.dim[0].dim_param = BATCH_DIM
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # data propagation is the fragile part; retry without it
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False,
                                                         strict_mode=False)
        except Exception as exc:
            raise BadInputError(f"ONNX shape inference failed on the model: {exc}") from None
    from ppipe_trt.engines.batch_dims import resolve_batch_dims  # it builds on ModelGraph

    return resolve_batch_dims(inferred)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tt.elem_type == TensorProto.UNDEFINED:
        return None
    if not tt.HasField("shape"):
        return None
    dims: list[int] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param == NONBATCH_DIM:
            dims.append(VARYING_DIM)
        elif i == 0 and d.dim_param:
            dims.append(-1)  # symbolic leading dim: the batch
        else:
            return None
    return TensorInfo(vi.name, _dtype_name(tt.elem_type), tuple(dims))


class ModelGraph:
    """A normalized ONNX model with its topological order and cut sets.

    Built with :meth:`from_onnx`.  ``nodes`` are the non-constant nodes in topological order;
    ``const_nodes`` compute constants (inputs only from initializers and other constants).
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.initializers = {t.name for t in graph.initializer}
        self.inputs = tuple(i.name for i in graph.input if i.name not in self.initializers)
        self.outputs = tuple(o.name for o in graph.output)
        order = _topological_order(graph.node, set(self.inputs) | self.initializers)
        const: set[str] = set(self.initializers)
        const_nodes, nodes = [], []
        for node in order:
            ins = _node_inputs(node)
            if (not _has_subgraph(node) and all(n in const for n in ins)
                    and node.op_type not in ("RandomNormal", "RandomUniform", "Multinomial")):
                const.update(o for o in node.output if o)
                const_nodes.append(node)
            else:
                nodes.append(node)
        if not nodes:
            raise BadInputError("the model has no non-constant nodes to partition")
        self.const_tensors = frozenset(const)
        self.const_nodes = tuple(const_nodes)
        self.nodes = tuple(nodes)
        # producer position (-1 = model input), last consumer (len(nodes) = model output)
        self.producer: dict[str, int] = {name: -1 for name in self.inputs}
        self.last_use: dict[str, int] = {}
        for pos, node in enumerate(self.nodes):
            for name in _node_inputs(node):
                if name not in const:
                    self.last_use[name] = pos
            for name in node.output:
                if name:
                    self.producer[name] = pos
        for name in self.outputs:
            if name not in const:
                self.last_use[name] = len(self.nodes)
        missing = [n for n in self.last_use if n not in self.producer]
        if missing:
            raise BadInputError(f"tensors {missing[:5]} are consumed but never produced; "
                                "the model is not a valid DAG")

    @classmethod
    def from_onnx(cls, source: str | Path | onnx.ModelProto) -> "ModelGraph":
        return cls(normalize_model(load_onnx(source)))

    # ---- shapes -------------------------------------------------------------------------
    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """TensorInfo of every model input and live tensor, from the declared value_info
        (a normalized model declares them all); the rest measured with ONNX Runtime."""
        infos = _value_infos(self.model)
        out: dict[str, TensorInfo] = {}
        unknown: list[str] = []
        for name in dict.fromkeys(self.inputs + self.live_tensors):
            info = _tensor_info(infos[name]) if name in infos else None
            if info is None:
                unknown.append(name)
            else:
                out[name] = info
        if unknown:
            from ppipe_trt.engines.batch_dims import measure_shapes

            out.update(measure_shapes(self.model, self.inputs, unknown))
        return out

    @cached_property
    def live_tensors(self) -> tuple[str, ...]:
        """Non-constant tensors that are consumed or returned, ordered by producer position."""
        names = [n for n in self.last_use]
        return tuple(sorted(names, key=lambda n: (self.producer[n], n)))

    @cached_property
    def nonbatched_tensors(self) -> frozenset[str]:
        """Live tensors without a batch dimension.  In a normalized model these are the
        batch-dependent ones (and batch-independent ones too large to fold): none may cross
        a cut, since stages are batched and their I/O is split along dim 0."""
        return frozenset(n for n in self.live_tensors if not self.tensors[n].has_batch_dim)

    # ---- cuts ---------------------------------------------------------------------------
    def cut_tensors(self, position: int) -> tuple[str, ...]:
        """Tensors crossing a cut right after node ``position`` (-1: before node 0).

        Ordered by producer position, then name; after the last node, the model outputs in
        model order.
        """
        if not -1 <= position < len(self.nodes):
            raise BadInputError(f"cut position {position}; expected -1..{len(self.nodes) - 1}")
        if position == len(self.nodes) - 1:
            return tuple(n for n in self.outputs if n not in self.const_tensors)
        return tuple(n for n in self.live_tensors
                     if self.producer[n] <= position < self.last_use[n])

    def cut_bytes_per_sample(self, fp16_floats: bool = False) -> np.ndarray:
        """Bytes per sample crossing a cut after each node ``0 .. L-2`` (length ``L - 1``).

        Only batched tensors count: a non-batched one makes its positions forbidden
        (:meth:`allowed_cuts`), whatever their size; pass both to the pre-partition."""
        n = len(self.nodes)
        delta = np.zeros(n + 1, dtype=np.int64)
        for name in self.live_tensors:
            if name in self.nonbatched_tensors:
                continue
            size = self.tensors[name].bytes_per_sample(fp16_floats)
            delta[max(self.producer[name], 0)] += size
            delta[self.last_use[name]] -= size
        # alive at position p iff producer <= p < last_use
        alive = np.cumsum(delta)
        return alive[: n - 1] if n > 1 else np.zeros(0, dtype=np.int64)

    def allowed_cuts(self) -> np.ndarray:
        """Whether a cut after each node ``0 .. L-2`` is allowed (bool, length ``L - 1``):
        False where a non-batched tensor would cross it."""
        n = len(self.nodes)
        crossing = np.zeros(n + 1, dtype=np.int64)
        for name in self.nonbatched_tensors:
            crossing[max(self.producer[name], 0)] += 1
            crossing[self.last_use[name]] -= 1
        return (np.cumsum(crossing) == 0)[: n - 1] if n > 1 else np.zeros(0, dtype=bool)

    def specs(self, names: Iterable[str]) -> tuple[TensorSpec, ...]:
        return tuple(self.tensors[n].spec() for n in names)

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.specs(self.inputs)

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.specs(n for n in self.outputs if n not in self.const_tensors)


def _topological_order(nodes: Iterable[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, preferring the file's order (stable for already-sorted graphs)."""
    nodes = list(nodes)
    producer_of: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer_of[name] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, node in enumerate(nodes):
        d = set()
        for name in _node_inputs(node):
            if name in producer_of and name not in available:
                d.add(producer_of[name])
            elif name not in available and name not in producer_of:
                raise BadInputError(f"node {node.name or i} ({node.op_type}) reads {name!r}, which "
                                    "no node, input or initializer provides")
        d.discard(i)
        deps.append(d)
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise BadInputError("the ONNX graph has a cycle; expected a DAG")
    return order


def random_inputs(specs: Iterable[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random model inputs at ``batch`` (floats uniform in [0, 1), integers zero)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = tuple(batch if (i == 0 and d == -1) else d for i, d in enumerate(spec.shape))
        if any(d < 0 for d in shape):
            raise BadInputError(f"input {spec.name!r} has shape {spec.shape}; expected static "
                                "dimensions except the batch (export with a fixed image size)")
        if spec.dtype in _FLOAT_TYPES:
            out[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        else:
            out[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return out


def tensor_value_info(info: TensorInfo) -> onnx.ValueInfoProto:
    """The ONNX declaration of ``info``: dim 0 of a batched tensor is the symbolic ``batch``,
    a dimension that varies with the batch size is ``NONBATCH_DIM``, the rest static."""
    dims: list[int | str] = [BATCH_DIM if (i == 0 and d == -1) else NONBATCH_DIM if d < 0 else d
                             for i, d in enumerate(info.shape)]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    return helper.make_tensor_value_info(info.name, elem, dims)


__all__ = ["ModelGraph", "TensorInfo", "load_onnx", "normalize_model", "random_inputs",
           "tensor_value_info", "MIN_OPSET", "BATCH_DIM", "NONBATCH_DIM", "VARYING_DIM"]
