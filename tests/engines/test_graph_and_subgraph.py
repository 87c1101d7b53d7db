"""Graph analysis (topological order, cut sets, sizes) and sub-graph extraction."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_fixtures import skip_model

from ppipe_trt.engines.graph import ModelGraph, TensorInfo, random_inputs
from ppipe_trt.engines.subgraph import extract_stage, stage_io_names
from ppipe_trt.errors import BadInputError

C, S = 4, 8
ACT = C * S * S * 4  # bytes per sample of one activation


def _names(graph):
    return [n.name for n in graph.nodes]


def test_topological_order_and_constants():
    g = ModelGraph.from_onnx(skip_model(shuffle=True))
    names = _names(g)
    assert "const_half" not in names and "const_mul" not in names  # constant nodes left out
    pos = {n: i for i, n in enumerate(names)}
    assert pos["conv0"] < pos["relu1"] < pos["early_mul"] and pos["conv4"] < pos["add5"] < pos["relu6"]
    assert len(names) == 8


def test_long_skip_and_early_output_cross_every_cut():
    g = ModelGraph.from_onnx(skip_model())
    pos = {n: i for i, n in enumerate(_names(g))}
    for p in range(pos["conv0"], pos["add5"]):
        assert "c0" in g.cut_tensors(p), p           # skip from node 0 to add5
    for p in range(pos["early_mul"], len(g.nodes) - 1):
        assert "early" in g.cut_tensors(p), p        # early model output carried to the end
    assert g.cut_tensors(-1) == ("x",)
    assert set(g.cut_tensors(len(g.nodes) - 1)) == {"out", "early"}
    cuts = g.cut_bytes_per_sample()
    assert len(cuts) == len(g.nodes) - 1
    for p in range(len(g.nodes) - 1):
        assert cuts[p] == sum(g.tensors[t].bytes_per_sample() for t in g.cut_tensors(p))
    assert cuts[pos["conv0"]] == ACT  # only c0
    assert cuts[pos["relu1"]] == 2 * ACT  # c0 and r1
    np.testing.assert_array_equal(g.cut_bytes_per_sample(fp16_floats=True), cuts // 2)


def test_bytes_are_dtype_aware_and_exclude_batch():
    assert TensorInfo("t", "float32", (-1, 3, 4)).bytes_per_sample() == 48
    assert TensorInfo("t", "int64", (-1, 3, 4)).bytes_per_sample() == 96
    assert TensorInfo("t", "int64", (-1, 3, 4)).bytes_per_sample(fp16_floats=True) == 96
    assert TensorInfo("t", "float16", (-1, 3, 4)).bytes_per_sample() == 24
    assert TensorInfo("t", "float32", (-1, 3, 4)).bytes_per_sample(fp16_floats=True) == 24
    assert TensorInfo("t", "int64", (4,)).bytes_per_sample() == 32  # no batch dim: whole tensor


def test_batch_dim_made_dynamic():
    g = ModelGraph.from_onnx(skip_model())  # input declared with batch 1
    assert g.input_specs[0].shape == (-1, C, S, S)
    assert all(spec.shape[0] == -1 for spec in g.output_specs)


def test_old_opset_rejected():
    with pytest.raises(BadInputError, match="opset 11; expected >= 13"):
        ModelGraph.from_onnx(skip_model(opset=11))


def test_missing_file_rejected(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        ModelGraph.from_onnx(tmp_path / "nope.onnx")


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})))


@pytest.mark.parametrize("ranges", [[(0, 7)], [(0, 1), (2, 5), (6, 7)], [(i, i) for i in range(8)],
                                    [(0, 0), (1, 6), (7, 7)]])
@pytest.mark.parametrize("batch", [1, 5])
def test_chained_stages_reproduce_full_model(ranges, batch):
    g = ModelGraph.from_onnx(skip_model())
    feeds = random_inputs(g.input_specs, batch, seed=3)
    reference = _run(g.model, feeds)
    env = dict(feeds)
    for first, last in ranges:
        stage = extract_stage(g, first, last)  # checker + strict shape inference inside
        ins, outs = stage_io_names(g, first, last)
        assert [i.name for i in stage.graph.input] == list(ins)
        assert [o.name for o in stage.graph.output] == list(outs)
        for vi in list(stage.graph.input) + list(stage.graph.output):
            assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"
        env.update(_run(stage, env))
    for name in ("out", "early"):
        np.testing.assert_allclose(env[name], reference[name], rtol=1e-6, atol=1e-6)


def test_stage_copies_needed_constants():
    g = ModelGraph.from_onnx(skip_model())
    pos = {n: i for i, n in enumerate(_names(g))}
    stage = extract_stage(g, pos["early_mul"], pos["early_mul"])
    assert {n.name for n in stage.graph.node} == {"early_mul", "const_half", "const_mul"}
    assert {t.name for t in stage.graph.initializer} == set()


def test_bad_range_rejected():
    g = ModelGraph.from_onnx(skip_model())
    with pytest.raises(BadInputError, match="node range 3..99"):
        extract_stage(g, 3, 99)


def test_unknown_shapes_measured_with_onnxruntime():
    from onnx import TensorProto, helper

    # Reshape to a shape computed at run time from the input: static inference gives up on it
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("ReduceProd", ["s"], ["n"], name="prod", keepdims=1),
             helper.make_node("Div", ["n", "bsz"], ["m"], name="div"),
             helper.make_node("Concat", ["bsz", "m"], ["shp"], name="cat", axis=0),
             helper.make_node("Shape", ["x"], ["s0"], name="shape0", start=0, end=1),
             helper.make_node("Identity", ["s0"], ["bsz"], name="id"),
             helper.make_node("Reshape", ["x", "shp"], ["y"], name="reshape"),
             helper.make_node("Relu", ["y"], ["z"], name="relu")]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    g = ModelGraph.from_onnx(model)
    assert g.tensors["z"].shape == (-1, 6)
    assert g.tensors["z"].bytes_per_sample() == 24


def test_runtime_failure_is_a_project_error(tmp_path):
    from ppipe_trt.engines.backends.onnxruntime_backend import InferenceFailedError, OnnxRuntimeBackend

    path = tmp_path / "m.onnx"
    onnx.save(skip_model(), str(path))
    with OnnxRuntimeBackend(path) as backend:
        with pytest.raises(InferenceFailedError, match=r"failed on inputs \{'x': \(1, 3, 8, 8\)\}"):
            backend.infer({"x": np.zeros((1, 3, 8, 8), np.float32)})  # 3 channels, model wants 4


def test_preallocated_outputs_include_pass_through(tmp_path):
    from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ppipe_trt.engines.subgraph import save_model

    g = ModelGraph.from_onnx(skip_model())
    path = save_model(extract_stage(g, 3, 5), tmp_path / "stage.onnx")  # c0, early pass through
    with OnnxRuntimeBackend(path, preallocate_outputs=True, max_batch=4) as bound, \
            OnnxRuntimeBackend(path) as plain:
        assert {"c0", "early"} <= {s.name for s in bound.inputs} & {s.name for s in bound.outputs}
        feeds = random_inputs(bound.inputs, 3)
        want, got = plain.infer(feeds), bound.infer(feeds)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
