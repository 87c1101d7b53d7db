"""End to end on CPU: build the demo models, chain their blocks, profiles the planner reads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx_fixtures import skip_model

from ppipe_trt.engines import BUILTIN_MODELS, build_model_engines, open_built_model
from ppipe_trt.engines.graph import random_inputs
from ppipe_trt.engines.verify import check_chain, relative_error
from ppipe_trt.errors import BackendUnavailableError, BadInputError
from ppipe_trt.profiles import load_profiles

FAST = dict(progress=False, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    built = {m: build_model_engines(m, "cpu", store_root=root, max_batch=4, **FAST)
             for m in BUILTIN_MODELS}
    return root, built


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_chained_blocks_match_full_model(store, model):
    _, built = store
    b = built[model]
    assert b.num_blocks >= 6
    check = check_chain(b, batches=(1, b.max_batch))
    assert check.max_rel_error <= 1e-5, check.per_output
    n = b.num_blocks
    coarse = check_chain(b, [(0, 1), (2, n - 5), (n - 4, n - 1)], batches=(3,))
    assert coarse.max_rel_error <= 1e-5
    fp16 = check_chain(b, fp16_cuts=True, batches=(2,))
    assert 0 < fp16.max_rel_error < 1e-2  # rounding at cuts is visible but small


def test_detector_carries_early_outputs(store):
    _, built = store
    b = built["demo_detector"]
    names = {s.name for s in b.outputs}
    assert len(names) == 6
    # the coarse level's outputs exist before the last block and must reach the end
    _, last_outs = b.stage_io(b.num_blocks - 1, b.num_blocks - 1)
    assert names == {s.name for s in last_outs}
    carried = [b.stage_io(k, k)[1] for k in range(b.num_blocks - 1)]
    assert any("cls_p5" in {s.name for s in outs} for outs in carried)


def test_unet_skips_cross_cuts(store):
    _, built = store
    b = built["demo_unet"]
    widths = [len(b.stage_io(k, k)[1]) for k in range(b.num_blocks - 1)]
    assert max(widths) >= 3  # several encoder features alive at one cut


def test_stage_io_matches_extracted_model(store):
    _, built = store
    b = built["demo_unet"]
    ins, outs = b.stage_io(2, 5)
    model = onnx.load(str(b.stage_onnx(2, 5)))
    assert [i.name for i in model.graph.input] == [s.name for s in ins]
    assert [o.name for o in model.graph.output] == [s.name for s in outs]
    assert all(s.shape[0] == -1 for s in ins + outs)


def test_profiles_load_for_planner(store):
    root, built = store
    profiles = load_profiles(root)
    assert sorted(profiles) == sorted(BUILTIN_MODELS)
    for name, b in built.items():
        prof = profiles[name]
        assert prof.num_blocks == b.num_blocks
        assert prof.cut_bytes_per_sample == b.cut_bytes_per_sample()
        assert prof.max_batch("cpu") == 4 and prof.mps_shares("cpu") == (1,)
        assert prof.input_bytes_per_sample == b.inputs[0].bytes_per_sample
        assert prof.batch1_latency_us("cpu") > 0


def test_build_is_idempotent(store):
    root, built = store
    b = built["demo_resnet"]
    manifest = b.build_dir / "manifest.json"
    before = (manifest.stat().st_mtime_ns, b.profile_path.stat().st_mtime_ns)
    again = build_model_engines("demo_resnet", "cpu", store_root=root, max_batch=4, **FAST)
    assert again.content_hash == b.content_hash
    assert (manifest.stat().st_mtime_ns, b.profile_path.stat().st_mtime_ns) == before


def test_open_built_model_and_errors(store):
    root, built = store
    b = open_built_model("demo_resnet", "cpu", root)
    assert b.content_hash == built["demo_resnet"].content_hash
    with pytest.raises(BadInputError, match="no build of 'demo_resnet' for GPU class 'T4'"):
        open_built_model("demo_resnet", "T4", root)
    with pytest.raises(BadInputError, match="block range 3..99"):
        b.stage_onnx(3, 99)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
            b.open_backend(0, 0, "tensorrt")


def test_preallocated_outputs_match(store):
    _, built = store
    b = built["demo_detector"]
    ins, _ = b.stage_io(2, 4)
    feeds = random_inputs(ins, 3)
    with b.open_backend(2, 4) as plain, b.open_backend(2, 4, preallocate_outputs=True) as bound:
        want = plain.infer(feeds)
        got = {k: v.copy() for k, v in bound.infer(feeds).items()}  # views: copy before reuse
        small = bound.infer(random_inputs(ins, 1))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        assert small[name].shape[0] == 1


def test_torch_backend_matches_onnx(store):
    _, built = store
    b = built["demo_detector"]
    feeds = random_inputs(b.inputs, 2)
    with b.open_backend(0, b.num_blocks - 1) as ref, b.open_backend(0, b.num_blocks - 1, "torch") as tb:
        want, got = ref.infer(feeds), tb.infer(feeds)
    assert max(relative_error(got[n], want[n]) for n in want) < 1e-4
    with pytest.raises(BadInputError, match="whole built-in models only"):
        b.open_backend(0, 1, "torch")


def test_unseen_onnx_model_via_cli(tmp_path, capsys):
    from ppipe_trt.cli import main

    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    out_json = tmp_path / "summary.json"
    rc = main(["engines", "build", str(path), "--gpu-class", "cpu", "--store", str(tmp_path / "st"),
               "--blocks", "4", "--verify", "--json", str(out_json), "--quiet", "--repeats", "2",
               "--max-batch", "3"])
    assert rc == 0
    summary = json.loads(out_json.read_text())
    assert summary["model"] == "skipnet" and summary["gpu_class"] == "cpu"
    assert summary["blocks"] == 4 and len(summary["engines"]) == 4
    assert summary["max_rel_error"] <= 1e-5
    assert "max relative error" in capsys.readouterr().out
    profiles = load_profiles(tmp_path / "st")
    assert profiles["skipnet"].num_blocks == 4

    # a changed model gets a new content hash (rebuild); the old build stays addressable
    first = open_built_model("skipnet", "cpu", tmp_path / "st")
    onnx.save(skip_model(channels=6), str(path))
    second = build_model_engines(path, "cpu", store_root=tmp_path / "st", num_blocks=4,
                                 max_batch=3, **FAST)
    assert second.content_hash != first.content_hash
    assert second.inputs[0].shape == (-1, 6, 8, 8)


def test_partition_reused_across_gpu_classes(tmp_path):
    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    cpu = build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=3, max_batch=2, **FAST)
    # no TensorRT here: "auto" falls back to ONNX Runtime; the partition must be the same
    other = build_model_engines(path, "T4", store_root=tmp_path, num_blocks=3, max_batch=2, **FAST)
    assert other.block_node_ranges == cpu.block_node_ranges
    assert other.manifest["partition"]["reused_from"] == "cpu"
    merged = load_profiles(tmp_path)["skipnet"]
    assert merged.gpu_classes == ("T4", "cpu")


def test_cli_rejects_unknown_model(tmp_path, capsys):
    from ppipe_trt.cli import main

    rc = main(["engines", "build", "no_such_model", "--store", str(tmp_path), "--quiet"])
    assert rc == 1
    assert "expected a built-in name" in capsys.readouterr().err


def test_concurrent_share_profiling(tmp_path):
    from ppipe_trt.engines.profiling import BackendRecipe, profile_concurrent_latency_us

    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    built = build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=2, max_batch=2,
                                mps_shares=(1, 2), **FAST)
    prof = load_profiles(tmp_path)["skipnet"]
    assert prof.mps_shares("cpu") == (1, 2)
    assert prof.max_batch("cpu", 2) == 2
    row = profile_concurrent_latency_us(
        BackendRecipe("onnxruntime", str(built.stage_onnx(0, 0))), 2, 2, warmup=1, repeats=2)
    assert len(row) == 2 and 0 < row[0] <= row[1]
    with pytest.raises(BadInputError, match="expected 1 first"):
        build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=2, max_batch=2,
                            mps_shares=(2, 4), **FAST)


def test_cli_verify_exits_nonzero_above_tolerance(tmp_path, capsys):
    from ppipe_trt.cli import main

    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    rc = main(["engines", "build", str(path), "--gpu-class", "cpu", "--store", str(tmp_path),
               "--blocks", "3", "--verify", "--tolerance", "-1", "--quiet", "--no-profile"])
    assert rc == 1
    assert "verification above tolerance -1 for ['skipnet']" in capsys.readouterr().err


def test_gpu_class_profiled_on_cpu_is_flagged(tmp_path):
    from ppipe_trt.profiles import read_profile

    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    built = build_model_engines(path, "L4", store_root=tmp_path, num_blocks=2, max_batch=1, **FAST)
    _, meta = read_profile(built.profile_path)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert meta["profiled_on"] == "cpu"
        assert "profiled on the CPU" in meta["warning"]


def test_cpu_blocks_profiled_as_one_serving_worker_runs_them(tmp_path, monkeypatch):
    """The plan for the ``cpu`` class counts one worker per slot, and a serving worker runs
    ONNX Runtime on ``CPU_WORKER_THREADS`` threads: blocks are profiled with exactly that
    (ONNX Runtime's default would use every core, and the plan would count a worker that
    fast).  A profile made otherwise (or before this was recorded) is made again."""
    from ppipe_trt.engines.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ppipe_trt.engines.gpu import CPU_WORKER_THREADS
    from ppipe_trt.profiles import read_profile
    from ppipe_trt.serving.options import RuntimeOptions

    assert RuntimeOptions().intra_op_threads == CPU_WORKER_THREADS == 1
    seen = []
    real_load = OnnxRuntimeBackend._load_impl

    def load(self):
        seen.append(self.intra_op_threads)
        return real_load(self)

    monkeypatch.setattr(OnnxRuntimeBackend, "_load_impl", load)
    path = tmp_path / "skipnet.onnx"
    onnx.save(skip_model(), str(path))
    built = build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=2, max_batch=2,
                                **FAST)
    # the profile's loads, the last: each block, then the whole model (the build before them
    # loads a stage only to read its outputs)
    assert seen[-3:] == [CPU_WORKER_THREADS] * 3, seen
    _, meta = read_profile(built.profile_path)
    assert meta["intra_op_threads"] == CPU_WORKER_THREADS
    assert "1 ONNX Runtime thread" in meta["mps_note"]

    # reused as it is ...
    seen.clear()
    build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=2, max_batch=2, **FAST)
    assert seen == []
    # ... unless it was profiled another way (an older build, ONNX Runtime's default threads)
    doc = json.loads(built.profile_path.read_text())
    del doc["meta"]["intra_op_threads"]
    built.profile_path.write_text(json.dumps(doc))
    build_model_engines(path, "cpu", store_root=tmp_path, num_blocks=2, max_batch=2, **FAST)
    assert seen[-3:] == [CPU_WORKER_THREADS] * 3, seen
    _, meta = read_profile(built.profile_path)
    assert meta["intra_op_threads"] == CPU_WORKER_THREADS
