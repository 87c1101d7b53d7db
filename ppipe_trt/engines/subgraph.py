"""Sub-graph extraction: a node range of a :class:`ModelGraph` as a standalone ONNX model.

The stage's inputs are the tensors crossing the cut before its first node (the model inputs
for node 0); its outputs are the tensors crossing the cut after its last node (the model
outputs after the last node).  A tensor that only passes through (produced before the stage,
needed after it) is both an input and an output of the stage, so chaining stages by tensor
name always carries everything downstream stages need.  Constant sub-expressions and
initializers the range reads are copied in.  Every input and output keeps dim 0 as the
symbolic ``batch`` dimension: a tensor without one never crosses a cut (the pre-partition
only uses :meth:`ModelGraph.allowed_cuts`), and :func:`stage_io_names` refuses a range that
would need one to.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import helper

from ppipe_trt.engines.graph import ModelGraph, _node_inputs, tensor_value_info
from ppipe_trt.errors import BadInputError, EngineBuildError


def stage_io_names(graph: ModelGraph, first_node: int, last_node: int
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of the stage covering nodes ``first_node..last_node``.

    Raises :class:`EngineBuildError` if a tensor without a batch dimension would cross a
    cut between stages (model inputs and outputs may be non-batched)."""
    if not 0 <= first_node <= last_node < len(graph.nodes):
        raise BadInputError(f"node range {first_node}..{last_node}; expected within "
                            f"0..{len(graph.nodes) - 1}")
    inputs, outputs = graph.cut_tensors(first_node - 1), graph.cut_tensors(last_node)
    crossing = (inputs if first_node > 0 else ()) + (
        outputs if last_node < len(graph.nodes) - 1 else ())
    unbatched = [t for t in crossing if t in graph.nonbatched_tensors]
    if unbatched:
        raise EngineBuildError(
            f"stage of nodes {first_node}..{last_node}: tensors {unbatched[:5]} have no batch "
            "dimension but would cross a cut; expected cuts only where "
            "ModelGraph.allowed_cuts() is True")
    return inputs, outputs


def extract_stage(graph: ModelGraph, first_node: int, last_node: int, name: str = "stage",
                  check: bool = True) -> onnx.ModelProto:
    """The ONNX model of nodes ``first_node..last_node`` (inclusive, topological positions)."""
    inputs, outputs = stage_io_names(graph, first_node, last_node)
    body = list(graph.nodes[first_node:last_node + 1])

    # Constants the range needs, with the constant nodes they come from (transitively).
    const_producer = {o: n for n in graph.const_nodes for o in n.output if o}
    needed_consts: set[str] = set()
    stack = [t for n in body for t in _node_inputs(n) if t in graph.const_tensors]
    stack += [t for t in outputs if t in graph.const_tensors]
    const_nodes: set[str] = set()
    while stack:
        t = stack.pop()
        if t in needed_consts:
            continue
        needed_consts.add(t)
        node = const_producer.get(t)
        if node is not None and node.name not in const_nodes:
            const_nodes.add(node.name)
            stack.extend(x for x in _node_inputs(node) if x)
    const_body = [n for n in graph.const_nodes if n.name in const_nodes]
    initializers = [t for t in graph.model.graph.initializer if t.name in needed_consts]

    produced = {o for n in body + const_body for o in n.output if o}
    value_info = [vi for vi in graph.model.graph.value_info
                  if vi.name in produced and vi.name not in outputs]
    new_graph = helper.make_graph(
        nodes=const_body + body,
        name=f"{graph.model.graph.name or 'model'}_{name}",
        inputs=[tensor_value_info(graph.tensors[t]) for t in inputs],
        outputs=[tensor_value_info(graph.tensors[t]) for t in outputs],
        initializer=initializers,
        value_info=value_info,
    )
    model = helper.make_model(new_graph, opset_imports=list(graph.model.opset_import),
                              producer_name="ppipe-trt", ir_version=graph.model.ir_version)
    if graph.model.functions:
        model.functions.extend(graph.model.functions)
    if check:
        check_stage_model(model)
    return model


def check_stage_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` plus strict shape inference; raises :class:`EngineBuildError`."""
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise EngineBuildError(f"extracted sub-graph {model.graph.name} is not valid ONNX: "
                               f"{exc}") from None


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Save atomically (readers never see half a file); large models use external data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique per writer process
    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    if large:
        onnx.save_model(model, str(tmp), save_as_external_data=True,
                        location=path.name + ".data", all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return path
