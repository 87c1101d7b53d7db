"""Small hand-built ONNX graphs for engine tests (no torch needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def skip_model(opset: int = 17, shuffle: bool = False, early_output: bool = True,
               channels: int = 4, size: int = 8) -> onnx.ModelProto:
    """x -> c0 -> r1 -> c2 -> r3 -> c4 -> add5(c4, c0) -> r6 -> out
    c0 is a long skip consumed at node 5; ``early`` (= r1 * const) is a model output
    produced at node 2 and carried to the end; ``scale`` comes from Constant nodes."""
    rng = np.random.default_rng(0)
    c = channels

    def w(name):
        return numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r1"], name="relu1"),
        helper.make_node("Constant", [], ["half"], name="const_half",
                         value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["half", "half"], ["scale"], name="const_mul"),
        helper.make_node("Mul", ["r1", "scale"], ["early"], name="early_mul"),
        helper.make_node("Conv", ["r1", "w1"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "w2"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c4", "c0"], ["a5"], name="add5"),
        helper.make_node("Relu", ["a5"], ["out"], name="relu6"),
    ]
    if shuffle:
        nodes = nodes[::-1]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", c, size, size])]
    if early_output:
        outputs.append(helper.make_tensor_value_info("early", TensorProto.FLOAT, ["N", c, size, size]))
    graph = helper.make_graph(
        nodes, "skip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
        outputs, initializer=[w("w0"), w("w1"), w("w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    return model
