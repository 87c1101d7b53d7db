"""Models that compute shapes at run time: batch classification, folding, recomputation and
cuts that no tensor without a batch dimension crosses.

The models are small torch modules exported with the TorchScript exporter (``dynamo=False``),
which writes ``x.shape`` / ``x.size(0)`` as ``Shape -> Gather`` chains in the ONNX graph.
"""

from __future__ import annotations

import onnx
import pytest

from ppipe_trt.engines.graph import ModelGraph
from ppipe_trt.engines.prepartition import prepartition
from ppipe_trt.engines.subgraph import stage_io_names
from ppipe_trt.errors import EngineBuildError

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

MAX_BATCH = 4


class ASPPSegmenter(nn.Module):
    """DeepLab-style: ASPP branches plus image pooling upsampled to the feature size, then
    the logits upsampled back to the input size (``size=x.shape[-2:]``)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.branches = nn.ModuleList(nn.Conv2d(32, 16, 3, padding=d, dilation=d)
                                      for d in (1, 2, 4))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 16, 1), nn.ReLU())
        self.proj = nn.Conv2d(64, 32, 1)
        self.head = nn.Conv2d(32, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        f = self.stem(x)
        p = F.interpolate(self.pool(f), size=f.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([b(f) for b in self.branches] + [p], 1)
        f = self.head(F.relu(self.proj(f)))
        return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


class FlattenClassifier(nn.Module):
    """``x.view(x.size(0), -1)`` with the batch size read before the features, so the
    Reshape's shape depends on the batch and is computed long before it is used."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8 * 16 * 16, 10)  # 64 x 64 input

    def forward(self, x):
        n = x.size(0)
        return self.fc(self.features(x).view(n, -1))


class ShapeProbe(nn.Module):
    """One tensor of each kind: ``[-1, 4, H, W]`` (batch-independent, folded),
    ``x.size(0)`` feeding ``arange`` (batch-dependent, nothing batched to rebuild it from),
    convolutions (batched)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.c2 = nn.Conv2d(8, 4, 3, 1, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        n = x.size(0)
        f = self.c2(F.relu(self.c1(x)))
        return f.reshape(-1, 4, h, w) + torch.arange(n).to(f.dtype).view(-1, 1, 1, 1)


def _export(module: nn.Module, path, size: int = 32):
    torch.manual_seed(0)
    torch.onnx.export(module.eval(), torch.randn(2, 3, size, size), str(path),
                      input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def _node(model: onnx.ModelProto, op_type: str, reads: str = "") -> onnx.NodeProto:
    """The first ``op_type`` node of ``model`` that reads a tensor whose name starts with
    ``reads``."""
    return next(n for n in model.graph.node
                if n.op_type == op_type and any(i.startswith(reads) for i in n.input))


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _check_cuts(graph: ModelGraph) -> None:
    """Allowed positions carry batched tensors only; forbidden ones carry a non-batched one."""
    allowed = graph.allowed_cuts()
    assert allowed.shape == (len(graph.nodes) - 1,)
    for p, ok in enumerate(allowed):
        crossing = graph.cut_tensors(p)
        assert ok == all(graph.tensors[t].has_batch_dim for t in crossing), (p, crossing)


@pytest.mark.parametrize("module, min_blocks", [(ASPPSegmenter, 2), (FlattenClassifier, 2)])
def test_runtime_shape_models_build_and_chain(module, min_blocks, tmp_path):
    from ppipe_trt.engines import build_model_engines
    from ppipe_trt.engines.verify import check_chain

    path = _export(module(), tmp_path / f"{module.__name__}.onnx", size=64)
    built = build_model_engines(path, "cpu", store_root=tmp_path / "store", num_blocks=6,
                                max_batch=MAX_BATCH, progress=False, repeats=1)
    assert built.num_blocks >= min_blocks
    check = check_chain(built)  # batches 1 and MAX_BATCH
    assert check.max_rel_error <= 1e-5, check.per_output
    # every cut of the build is allowed, and its stages declare the batch on all their I/O
    graph = built.graph
    assert all(graph.allowed_cuts()[last] for _, last in built.block_node_ranges[:-1])
    for b in range(built.num_blocks):
        ins, outs = built.stage_io(b, b)
        assert all(s.shape[0] == -1 for s in ins + outs), (b, ins, outs)


def test_reloaded_model_keeps_the_classification(tmp_path):
    """``model.onnx`` of a build is reloaded without normalize_model: same tensors, same
    non-batched set, same allowed cuts, nothing left unknown to measure."""
    graph = ModelGraph.from_onnx(_export(ASPPSegmenter(), tmp_path / "aspp.onnx"))
    onnx.save(graph.model, str(tmp_path / "normalized.onnx"))
    reloaded = ModelGraph(onnx.load(str(tmp_path / "normalized.onnx")))
    assert reloaded.tensors == graph.tensors
    assert reloaded.nonbatched_tensors == graph.nonbatched_tensors
    assert (reloaded.allowed_cuts() == graph.allowed_cuts()).all()
    declared = {vi.name for vi in list(reloaded.model.graph.value_info)
                + list(reloaded.model.graph.input) + list(reloaded.model.graph.output)}
    assert set(reloaded.live_tensors) <= declared


def test_aspp_shape_tensors_are_folded_or_recomputed(tmp_path):
    raw = onnx.load(str(_export(ASPPSegmenter(), tmp_path / "aspp.onnx")))
    graph = ModelGraph.from_onnx(raw)
    # [N, C, H, W] of both Resize calls is affine in N: rebuilt next to each Resize from its
    # own input, so the original Shape chains are gone and only a few positions are lost
    original_shapes = {n.output[0] for n in raw.graph.node if n.op_type == "Shape"}
    assert not original_shapes & set(graph.live_tensors)
    allowed = graph.allowed_cuts()
    assert allowed.sum() >= len(allowed) - 8
    for node in graph.nodes:
        if node.op_type == "Resize":
            sizes = node.input[3]
            assert sizes in graph.nonbatched_tensors
            assert graph.producer[sizes] > graph.producer[node.input[0]]  # after its input
    _check_cuts(graph)


def test_classification_of_named_tensors(tmp_path):
    raw = onnx.load(str(_export(ShapeProbe(), tmp_path / "probe.onnx")))
    graph = ModelGraph.from_onnx(raw)
    arange = _node(raw, "Range")
    batch_size = arange.input[1]                                   # Cast(Gather(Shape(x), 0))
    gather = _producer(raw, _producer(raw, batch_size).input[0])
    shape_of_x = gather.input[0]                                   # Shape(x) = [N, 3, H, W]
    folded_shape = _node(raw, "Reshape", reads="/c2").input[1]     # [-1, 4, H, W]
    for name in (batch_size, shape_of_x):
        assert name in graph.nonbatched_tensors and name not in graph.const_tensors, name
        assert not graph.tensors[name].has_batch_dim
    assert graph.tensors[shape_of_x].shape == (4,)
    assert folded_shape in graph.const_tensors
    assert folded_shape in {t.name for t in graph.model.graph.initializer}
    assert onnx.numpy_helper.to_array(next(t for t in graph.model.graph.initializer
                                           if t.name == folded_shape)).tolist() == [-1, 4, 32, 32]
    convs = [n.output[0] for n in graph.nodes if n.op_type == "Conv"]
    for name in convs + [arange.output[0], "out"]:
        assert graph.tensors[name].has_batch_dim, name
    assert graph.tensors[arange.output[0]].shape == (-1,)
    _check_cuts(graph)

    # n crosses every position from the input's Shape to the Range: those are forbidden
    allowed = graph.allowed_cuts()
    range_pos = next(i for i, n in enumerate(graph.nodes) if n.op_type == "Range")
    assert not allowed[:range_pos].any() and allowed[range_pos:].all()
    with pytest.raises(EngineBuildError, match="no batch dimension but would cross a cut"):
        stage_io_names(graph, 0, range_pos - 1)

    # fewer allowed positions than cuts requested: fewer blocks, every cut allowed
    latency = {"cpu": [1.0] * len(graph.nodes)}
    part = prepartition(latency, graph.cut_bytes_per_sample(), num_blocks=len(graph.nodes),
                        allowed_cuts=allowed)
    assert part.num_blocks == int(allowed.sum()) + 1
    assert all(allowed[p] for p in part.cut_positions)


def test_prepartition_never_takes_a_forbidden_cut():
    latency = {"a": [1.0] * 12, "b": [2.0, 1.0] * 6}
    cuts = [1.0] * 11
    cuts[5] = 0.0  # the cheapest position, forbidden below
    allowed = [True] * 11
    allowed[5] = allowed[6] = False
    free = prepartition(latency, cuts, num_blocks=2)
    assert free.cut_positions == (5,)
    part = prepartition(latency, cuts, num_blocks=2, allowed_cuts=allowed)
    assert part.num_blocks == 2 and part.cut_positions[0] not in (5, 6)
    only_one = [p == 3 for p in range(11)]
    assert prepartition(latency, cuts, num_blocks=4, allowed_cuts=only_one).cut_positions == (3,)


def test_forbidden_cuts_give_fewer_blocks_than_requested(tmp_path):
    """ShapeProbe allows only the few cut positions after its Range: asked for 6 blocks, the
    build makes one more than there are allowed positions and records the request."""
    from ppipe_trt.engines import build_model_engines
    from ppipe_trt.engines.verify import check_chain

    path = _export(ShapeProbe(), tmp_path / "probe.onnx")
    built = build_model_engines(path, "cpu", store_root=tmp_path / "store", num_blocks=6,
                                max_batch=MAX_BATCH, progress=False, repeats=1)
    assert built.num_blocks == int(built.graph.allowed_cuts().sum()) + 1 < 6
    assert built.manifest["requested_blocks"] == 6
    assert check_chain(built).max_rel_error <= 1e-5


class DataGate(nn.Module):
    """A non-batched value computed from the input's *values*: equal in every probe run
    (random inputs are >= 0), yet not a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)

    def forward(self, x):
        return self.conv(x) * (x.amin() >= 0).to(x.dtype)


def test_data_dependent_values_are_not_folded(tmp_path):
    raw = onnx.load(str(_export(DataGate(), tmp_path / "gate.onnx")))
    graph = ModelGraph.from_onnx(raw)
    gate = _node(raw, "GreaterOrEqual").output[0]
    assert gate in graph.nonbatched_tensors and gate not in graph.const_tensors
    _check_cuts(graph)
