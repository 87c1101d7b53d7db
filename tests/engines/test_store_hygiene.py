"""Engine store hygiene: stale and corrupt builds are found at load, with the rebuild command."""

from __future__ import annotations

import shutil

import pytest

from ppipe_trt.errors import EngineMismatchError
from tests.model_zoo import export_family


@pytest.fixture()
def repo_build(tmp_path):
    """(repository dir, store, BuiltModel) of one small model built from a repository."""
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry

    model_dir = tmp_path / "repo" / "net"
    export_family("mobilenet_se", model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text('max_batch_size: 2\nplatform: "onnxruntime_onnx"\n')
    store = tmp_path / "engines"
    built = build_entry(load_model_entry(model_dir), "cpu", store, num_blocks=3, progress=False,
                        repeats=1, warmup=0)
    return model_dir.parent, store, built


def test_a_sound_build_opens_and_is_listed_ok(repo_build, capsys):
    from ppipe_trt.cli import main
    from ppipe_trt.engines.store import open_built_model

    _, store, built = repo_build
    assert open_built_model("net", "cpu", store).build_dir == built.build_dir
    assert main(["engines", "list", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "net" in out and out.splitlines()[1].split()[-1] == "ok"
    assert "max_batch" in out.splitlines()[0]


def test_a_corrupt_model_file_is_an_error_naming_the_rebuild_command(repo_build, capsys):
    from ppipe_trt.cli import main
    from ppipe_trt.engines.store import open_built_model
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry

    repo, store, built = repo_build
    with open(built.full_onnx, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(EngineMismatchError,
                       match=r"corrupt .*rebuild it: ppipe engines build --model-repository "
                             rf"{repo} --model net --gpu-class cpu --store {store}"):
        open_built_model("net", "cpu", store)
    assert main(["engines", "list", "--store", str(store)]) == 0
    assert "is corrupt" in capsys.readouterr().out
    # building again with the same inputs repairs it in place
    again = build_entry(load_model_entry(repo / "net"), "cpu", store, num_blocks=3,
                        progress=False, repeats=1, warmup=0)
    assert again.build_dir == built.build_dir
    assert open_built_model("net", "cpu", store) is not None


def test_a_changed_source_model_makes_the_build_stale(repo_build, tmp_path):
    from ppipe_trt.engines.store import open_built_model

    repo, store, _ = repo_build
    export_family("inception", tmp_path / "other.onnx")
    shutil.copy(tmp_path / "other.onnx", repo / "net" / "1" / "model.onnx")
    with pytest.raises(EngineMismatchError, match=r"stale: its source .*model.onnx changed"):
        open_built_model("net", "cpu", store)


def test_a_corrupt_stage_file_is_extracted_again(repo_build):
    import onnx

    from ppipe_trt.engines.store import sha256_file

    _, _, built = repo_build
    stage = built.stage_onnx(0, 0)
    stage.write_bytes(b"not onnx")
    again = built.stage_onnx(0, 0)
    onnx.checker.check_model(onnx.load(str(again)))
    assert (again.parent / (again.name + ".sha256")).read_text().strip() == sha256_file(again)


def test_serving_a_corrupt_build_by_name_names_the_rebuild_command(repo_build):
    import argparse

    from ppipe_trt.server.prepare import prepare

    _, store, built = repo_build
    (built.build_dir / "model.onnx").unlink()
    args = argparse.Namespace(plan=None, models=["net"], profiles=None, emulate=None,
                              engines=store, slots=None, slo_ms=None, model_repository=None)
    with pytest.raises(EngineMismatchError, match=r"model.onnx is missing; rebuild it: ppipe"):
        prepare(args)


def test_new_weights_in_an_external_data_file_make_a_new_build(tmp_path):
    """PyTorch's dynamo exporter writes weights beside the graph (model.onnx.data): they are
    part of the model's identity."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ppipe_trt.engines.store import model_sha256, open_built_model
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry

    model_dir = tmp_path / "repo" / "net"
    src = export_family("mobilenet_se", tmp_path / "plain.onnx")
    (model_dir / "1").mkdir(parents=True)
    model = onnx.load(str(src))
    onnx.save_model(model, str(model_dir / "1" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    (model_dir / "config.pbtxt").write_text("max_batch_size: 2\n")
    store = tmp_path / "engines"
    built = build_entry(load_model_entry(model_dir), "cpu", store, num_blocks=3, progress=False,
                        repeats=1, warmup=0)
    before = model_sha256(model_dir / "1" / "model.onnx")
    model = onnx.load(str(src))  # saving with external data rewrote the first copy in place
    biggest = max(model.graph.initializer, key=lambda t: t.dims and int(np.prod(t.dims)))
    new = numpy_helper.to_array(biggest) * 2.0
    biggest.CopyFrom(numpy_helper.from_array(new.astype(np.float32), biggest.name))
    onnx.save_model(model, str(model_dir / "1" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert model_sha256(model_dir / "1" / "model.onnx") != before
    with pytest.raises(EngineMismatchError, match="stale: its source"):
        open_built_model("net", "cpu", store)
    rebuilt = build_entry(load_model_entry(model_dir), "cpu", store, num_blocks=3,
                          progress=False, repeats=1, warmup=0)
    assert rebuilt.build_dir != built.build_dir


def test_serving_leaves_out_a_corrupt_build_and_serves_the_others(repo_build, capsys):
    """A truncated model file in the store: ``ppipe serve``'s preparation names the model,
    the file and the rebuild command, and plans and serves the other models; with nothing
    left it refuses, naming each one."""
    import argparse

    import numpy as np

    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry
    from ppipe_trt.serving.assembly import build_runtime
    from ppipe_trt.server.prepare import prepare

    repo, store, built = repo_build
    other_dir = repo / "other"
    export_family("mobilenet_se", other_dir / "1" / "model.onnx")
    (other_dir / "config.pbtxt").write_text('max_batch_size: 2\nplatform: "onnxruntime_onnx"\n')
    other = build_entry(load_model_entry(other_dir), "cpu", store, num_blocks=3, progress=False,
                        repeats=1, warmup=0)
    size = built.full_onnx.stat().st_size
    with open(built.full_onnx, "r+b") as f:
        f.truncate(size // 2)
    args = argparse.Namespace(plan=None, models=["net", "other"], profiles=None, emulate=None,
                              engines=store, slots=None, slo_ms=None, model_repository=None)
    plan, profiles, served, what = prepare(args)
    assert list(served) == ["other"] and list(plan.model_names) == ["other"]
    assert f"NOT SERVED (unusable engines): net: net for cpu in {store}: {built.full_onnx} " \
           "is corrupt" in what
    assert f"rebuild it: ppipe engines build --model-repository {repo} --model net" in what
    assert "engines: NOT serving net:" in capsys.readouterr().err
    with build_runtime(plan, profiles, served) as rt:
        x = {other.inputs[0].name: np.zeros((1,) + tuple(other.inputs[0].shape[1:]),
                                            np.float32)}
        assert rt.submit("other", x).result(timeout=10).outputs
    with open(other.full_onnx, "r+b") as f:
        f.truncate(10)
    with pytest.raises(EngineMismatchError, match=r"no model can be served: net: .* is corrupt"
                                                  r".*rebuild it: .*; other: .* is corrupt"):
        prepare(args)
