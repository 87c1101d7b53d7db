"""Batch-dimension resolution: which tensors of a model carry the batch dimension, and a
rewrite so that the ones that do not never have to cross a pipeline cut.

Stages are batched: their inputs and outputs are split and joined along dim 0, so a tensor
without a batch dimension (a shape value such as ``Shape(x)`` or ``x.size(0)``) cannot cross
a cut between two stages.  :func:`resolve_batch_dims` runs the model with ONNX Runtime at
several batch sizes to classify every live tensor whose batch dimension shape inference does
not prove (integer shape arithmetic, static or unknown dim 0) as

* **batched**: dim 0 is the batch; declared with the symbolic ``batch`` dim 0;
* **batch-independent non-batched** (``Shape(x)[2:]`` of a fixed-size image): folded into an
  initializer when small, so every sub-graph that needs it gets its own copy;
* **batch-dependent non-batched** (``Shape(x)``, ``Gather(Shape(x), 0)``): recomputed from
  ``Shape(<batched input>)[0]`` right before each consumer that has a batched input when it
  is affine in the batch size; otherwise it stays, and no cut may separate it from its
  consumers (:meth:`ModelGraph.allowed_cuts`).

Every live tensor of the rewritten model is then declared in ``value_info``, so a saved
normalized model reloads (``ModelGraph(onnx.load(path))``) with the same classification and
no measurement: the non-batched live tensors are exactly those without a batch dim.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ppipe_trt.engines.graph import (
    _FLOAT_TYPES, BATCH_DIM, VARYING_DIM, ModelGraph, TensorInfo, _has_subgraph, _node_inputs,
    _tensor_info, _value_infos, random_inputs, tensor_value_info)
from ppipe_trt.errors import BadInputError, EngineBuildError

_RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli")
#: Batch sizes of the classification runs: not 1, where many dimensions coincide; three, so
#: a value affine in the batch size is checked, not just fitted.
_PROBE_BATCHES = (2, 3, 4)
#: Largest batch-independent tensor folded into an initializer (bytes); a larger one is
#: copied into every sub-graph that needs it, so it is treated as batch-dependent instead.
FOLD_MAX_BYTES = 64 * 1024


def _probe(model: onnx.ModelProto, inputs: tuple[str, ...], names: list[str],
           batches: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    """Values of the tensors ``names`` from one ONNX Runtime run (CPU) per batch size, on
    random inputs with a different seed per batch, so a value that depends on the input
    data differs between runs.  Returns one ``{name: array}`` per batch."""
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    vis = _value_infos(model)
    in_specs = []
    for name in inputs:
        info = _tensor_info(vis[name]) if name in vis else None
        if info is None:
            raise BadInputError(f"model input {name!r} has unknown shape or dtype; expected a "
                                "static shape except the batch dimension")
        in_specs.append(info.spec())
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        runs = [dict(zip(names, sess.run(names, random_inputs(in_specs, b, seed=b))))
                for b in batches]
    except Exception as exc:
        raise BadInputError(f"could not run the model at batch sizes {batches} with ONNX "
                            f"Runtime to measure tensor shapes ({exc}); expected a model that "
                            "accepts any batch size (export with a dynamic batch axis)") from None
    for name in names:
        if not isinstance(runs[0][name], np.ndarray):
            raise BadInputError(f"{name!r} is a {type(runs[0][name]).__name__}, not a tensor; "
                                "expected tensors only between nodes (no sequences or maps)")
    return runs


def _info_from_runs(name: str, values: list[np.ndarray], batches: tuple[int, ...]) -> TensorInfo:
    """Batched if dim 0 equals the batch size in every run and the other dims never change;
    otherwise non-batched, with ``VARYING_DIM`` where a dimension changes between runs."""
    first = values[0]
    if first.ndim and all(v.shape[0] == b and v.shape[1:] == first.shape[1:]
                          for v, b in zip(values, batches)):
        return TensorInfo(name, first.dtype.name, (-1,) + first.shape[1:])
    if any(v.ndim != first.ndim for v in values):
        raise BadInputError(f"tensor {name!r} has rank {[v.ndim for v in values]} at batch "
                            f"sizes {batches}; expected a rank that does not depend on the batch")
    dims = tuple(d if all(v.shape[i] == d for v in values) else VARYING_DIM
                 for i, d in enumerate(first.shape))
    return TensorInfo(name, first.dtype.name, dims)


def measure_shapes(model: onnx.ModelProto, inputs: tuple[str, ...],
                   names: list[str]) -> dict[str, TensorInfo]:
    """Shapes shape inference could not give (of a model that was not normalized), measured
    with ONNX Runtime at batch 2 and 3: a dimension that follows the batch is the batch."""
    batches = _PROBE_BATCHES[:2]
    runs = _probe(model, inputs, names, batches)
    return {n: _info_from_runs(n, [r[n] for r in runs], batches) for n in names}


def _affine_in_batch(values: list[np.ndarray], batches: tuple[int, ...]
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(slope, intercept)`` with ``value == slope * batch + intercept`` in every run, for an
    integer tensor of one shape; ``None`` if there is none (the last run checks the fit)."""
    first = values[0]
    if first.dtype not in (np.int32, np.int64) or any(v.shape != first.shape for v in values):
        return None
    step = batches[1] - batches[0]
    slope, rest = np.divmod(values[1] - first, step)
    if np.any(rest):
        return None
    intercept = first - slope * batches[0]
    if all(np.array_equal(slope * b + intercept, v) for v, b in zip(values, batches)):
        return slope.astype(first.dtype), intercept.astype(first.dtype)
    return None


def _data_free_tensors(graph: ModelGraph) -> set[str]:
    """Non-constant tensors computed from input *shapes* only (``Shape``/``Size`` and
    constants), never from input values: only these may be folded or recomputed, since equal
    values in two runs on random data would not prove a data-dependent tensor constant."""
    free = set(graph.const_tensors)
    for node in graph.nodes:
        if node.op_type in ("Shape", "Size") or (
                not _has_subgraph(node) and node.op_type not in _RANDOM_OPS
                and all(n in free for n in _node_inputs(node))):
            free.update(o for o in node.output if o)
    return free - graph.const_tensors


def resolve_batch_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Classify the live tensors of a shape-inferred model (see the module docstring), fold
    and recompute the non-batched ones that allow it, drop the nodes this leaves unused, and
    declare every live tensor in ``value_info``.  Modifies and returns ``model``."""
    graph = ModelGraph(model)  # order and liveness only: .tensors is not computed here
    declared = _value_infos(model)
    infos: dict[str, TensorInfo] = {}
    unproven: list[str] = []
    for name in graph.live_tensors:
        vi = declared.get(name)
        info = _tensor_info(vi) if vi is not None else None
        # Inputs are batched by contract.  A float tensor whose dim 0 inference derived from
        # the inputs' ``batch`` is batched; integer tensors are measured, since shape
        # arithmetic (where inference can be wrong or give up) is done in integers.
        if info is not None and (name in graph.inputs or (
                info.dtype in _FLOAT_TYPES and info.has_batch_dim
                and vi.type.tensor_type.shape.dim[0].dim_param == BATCH_DIM)):
            infos[name] = info
        else:
            unproven.append(name)
    folded: dict[str, np.ndarray] = {}
    affine: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if unproven:
        runs = _probe(model, graph.inputs, unproven, _PROBE_BATCHES)
        data_free = _data_free_tensors(graph)
        for name in unproven:
            values = [r[name] for r in runs]
            infos[name] = info = _info_from_runs(name, values, _PROBE_BATCHES)
            if info.has_batch_dim or name not in data_free:
                continue
            same = all(v.shape == values[0].shape and np.array_equal(v, values[0])
                       for v in values[1:])
            if same and values[0].nbytes <= FOLD_MAX_BYTES and name not in graph.outputs:
                folded[name] = values[0]
            elif not same and (fit := _affine_in_batch(values, _PROBE_BATCHES)) is not None:
                affine[name] = fit
    g = model.graph
    for node in g.node:
        for i, out in enumerate(node.output):
            if out in folded:  # the node now writes a dead name and is dropped if nothing else
                node.output[i] = f"{out}__folded"
    g.initializer.extend(numpy_helper.from_array(v, name) for name, v in folded.items())
    for name in folded:
        del infos[name]
    _recompute_affine(g, affine, infos)
    _drop_unused(g, set(folded))
    _declare_live(model, infos)
    return model


def _recompute_affine(g: onnx.GraphProto, affine: dict[str, tuple[np.ndarray, np.ndarray]],
                      infos: dict[str, TensorInfo]) -> None:
    """Give every node that reads an affine batch-dependent tensor and has a batched input
    its own copy, ``slope * Shape(batched input)[0] + intercept``, computed right before it:
    the copy is in the node's block whatever the cut, so the original need not cross one.
    New tensors are added to ``infos``."""
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        targets = [t for t in dict.fromkeys(node.input) if t in affine]
        source = next((t for t in node.input if t in infos and infos[t].has_batch_dim), None)
        if targets and source is not None and not _has_subgraph(node):
            for k, target in enumerate(targets):
                slope, intercept = affine[target]
                info = infos[target]
                pre = f"{node.name}/batch_size_{k}"
                index = np.array(0 if slope.ndim == 0 else [0], dtype=np.int64)
                g.initializer.extend([numpy_helper.from_array(index, f"{pre}/index"),
                                      numpy_helper.from_array(slope, f"{pre}/slope"),
                                      numpy_helper.from_array(intercept, f"{pre}/intercept")])
                batch_size = f"{pre}/n_{info.dtype}"
                nodes += [helper.make_node("Shape", [source], [f"{pre}/shape"],
                                           name=f"{pre}/shape"),
                          helper.make_node("Gather", [f"{pre}/shape", f"{pre}/index"],
                                           [f"{pre}/n"], name=f"{pre}/gather", axis=0)]
                infos[f"{pre}/shape"] = TensorInfo(f"{pre}/shape", "int64",
                                                   (len(infos[source].shape),))
                infos[f"{pre}/n"] = TensorInfo(f"{pre}/n", "int64", index.shape)
                if info.dtype == "int64":
                    batch_size = f"{pre}/n"
                else:
                    nodes.append(helper.make_node("Cast", [f"{pre}/n"], [batch_size],
                                                  name=f"{pre}/cast",
                                                  to=helper.np_dtype_to_tensor_dtype(slope.dtype)))
                    infos[batch_size] = TensorInfo(batch_size, info.dtype, index.shape)
                nodes += [helper.make_node("Mul", [batch_size, f"{pre}/slope"], [f"{pre}/scaled"],
                                           name=f"{pre}/mul"),
                          helper.make_node("Add", [f"{pre}/scaled", f"{pre}/intercept"],
                                           [f"{pre}/value"], name=f"{pre}/add")]
                infos[f"{pre}/scaled"] = TensorInfo(f"{pre}/scaled", info.dtype, info.shape)
                infos[f"{pre}/value"] = TensorInfo(f"{pre}/value", info.dtype, info.shape)
                for i, name in enumerate(node.input):
                    if name == target:
                        node.input[i] = f"{pre}/value"
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def _drop_unused(g: onnx.GraphProto, droppable_initializers: set[str]) -> None:
    """Remove the nodes none of whose outputs is read (directly or transitively) or returned,
    and the ``droppable_initializers`` nothing reads any more."""
    uses = Counter(o.name for o in g.output)
    for node in g.node:
        uses.update(_node_inputs(node))
    producer = {o: i for i, node in enumerate(g.node) for o in node.output if o}

    def unused(i: int) -> bool:
        return all(uses[o] == 0 for o in g.node[i].output if o)

    dead: set[int] = set()
    stack = [i for i in range(len(g.node)) if unused(i)]
    while stack:
        i = stack.pop()
        if i in dead:
            continue
        dead.add(i)
        for name in _node_inputs(g.node[i]):
            uses[name] -= 1
            if uses[name] == 0 and name in producer and unused(producer[name]):
                stack.append(producer[name])
    kept = [node for i, node in enumerate(g.node) if i not in dead]
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name not in droppable_initializers or uses[t.name] > 0]
    del g.initializer[:]
    g.initializer.extend(inits)


def _declare_live(model: onnx.ModelProto, infos: dict[str, TensorInfo]) -> None:
    """Declare every live tensor of the rewritten model (value_info, and the graph outputs'
    types) from its classification, so a reload classifies it the same without measuring."""
    g = model.graph
    live = ModelGraph(model).live_tensors
    missing = [n for n in live if n not in infos]
    if missing:
        raise EngineBuildError(f"tensors {missing[:5]} have no batch classification after "
                               "folding and recomputing; expected every live tensor classified")
    produced = {o for node in g.node for o in node.output if o}
    declared = {vi.name for vi in list(g.input) + list(g.output)}
    kept = [vi for vi in g.value_info if vi.name in produced and vi.name not in infos]
    kept += [tensor_value_info(infos[n]) for n in live if n not in declared]
    del g.value_info[:]
    g.value_info.extend(kept)
    for vi in g.output:
        if vi.name in infos:
            vi.type.CopyFrom(tensor_value_info(infos[vi.name]).type)

__all__ = ["resolve_batch_dims", "measure_shapes", "FOLD_MAX_BYTES"]
