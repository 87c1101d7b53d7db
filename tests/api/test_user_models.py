"""The user's own models, end to end: a Triton-layout repository of CNN families exported from
PyTorch -> build -> serve split into pipeline stages -> tritonclient (JSON and binary) and
frames, outputs equal to the unsplit model (ONNX Runtime on the user's own file)."""

from __future__ import annotations

import argparse
import base64
import io

import numpy as np
import pytest

from tests.conftest import ZOO_MAX_BATCH
from tests.model_zoo import FAMILIES

TOLERANCE = 1e-5


def _unsplit(onnx_path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def _split_plan(zoo_builds, name: str):
    """Three stages (two when the model has fewer blocks) at the repository's max batch."""
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.local import pipeline_plan

    built = zoo_builds[name]
    n = built.num_blocks
    assert n >= 2, f"{name} was not split ({n} block)"
    cuts = sorted({c for c in (n // 3 - 1, 2 * n // 3 - 1) if 0 <= c < n - 1}) or [0]
    profiles = load_profiles(zoo_builds.store, [name])
    plan = pipeline_plan(profiles, name, cuts, "cpu", batch_size=ZOO_MAX_BATCH, slo_ms=600.0)
    return built, profiles, plan


@pytest.mark.parametrize("name", list(FAMILIES))
def test_split_model_over_http_equals_unsplit(name, zoo_builds, zoo_repository, app_for,
                                              http_server):
    import tritonclient.http as httpclient

    built, profiles, plan = _split_plan(zoo_builds, name)
    spec = FAMILIES[name]
    source = zoo_repository / name / "1" / "model.onnx"
    rng = np.random.default_rng(3)
    with http_server(app_for(plan, profiles, {name: built})) as srv:
        client = httpclient.InferenceServerClient(srv.url)
        meta = client.get_model_metadata(name)
        assert meta["parameters"]["timing_only"] is False
        assert meta["parameters"]["mode"].startswith("onnxruntime cpu")
        assert [o["name"] for o in meta["outputs"]] == list(spec.output_names)
        config = client.get_model_config(name)
        assert config["max_batch_size"] == ZOO_MAX_BATCH
        for batch in (1, ZOO_MAX_BATCH):
            x = rng.standard_normal((batch,) + spec.input_shape).astype(np.float32)
            want = _unsplit(source, {spec.input_name: x})
            for binary in (False, True):
                inp = httpclient.InferInput(spec.input_name, list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                outs = [httpclient.InferRequestedOutput(o, binary_data=binary)
                        for o in spec.output_names]
                result = client.infer(name, [inp], outputs=outs)
                for o in spec.output_names:
                    err = _rel_err(result.as_numpy(o), want[o])
                    assert err <= TOLERANCE, (name, batch, binary, o, err)


def _jpeg(seed: int = 0, size=(96, 80)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_frames_of_a_classifier_give_labelled_top_k(zoo_builds, zoo_repository, app_for,
                                                    http_server):
    import httpx

    from api.frames import decode_frame
    from ppipe_trt.repository import load_model_entry

    name = "mobilenet_se"
    built, profiles, plan = _split_plan(zoo_builds, name)
    entry = load_model_entry(zoo_repository / name)
    data = _jpeg()
    x = decode_frame(data, entry.image)
    assert x.shape == (1,) + FAMILIES[name].input_shape
    logits = _unsplit(entry.onnx_path, {"input": x})["logits"][0]
    with http_server(app_for(plan, profiles, {name: built})) as srv:
        r = httpx.post(f"http://{srv.url}/v2/models/{name}/frames?top=3", content=data,
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200, r.text
    top = r.json()["top_k"]
    assert [t["index"] for t in top] == list(np.argsort(-logits, kind="stable")[:3])
    assert [t["label"] for t in top] == [f"class_{t['index']}" for t in top]


def test_frames_of_a_segmenter_give_a_png_mask(zoo_builds, zoo_repository, app_for,
                                               http_server):
    import httpx
    from PIL import Image

    from api.frames import decode_frame
    from ppipe_trt.repository import load_model_entry

    name = "deeplab_aspp"
    built, profiles, plan = _split_plan(zoo_builds, name)
    entry = load_model_entry(zoo_repository / name)
    data = _jpeg(1)
    scores = _unsplit(entry.onnx_path, {"input": decode_frame(data, entry.image)})["mask"]
    want = np.argmax(scores[0], axis=0)
    with http_server(app_for(plan, profiles, {name: built})) as srv:
        url = f"http://{srv.url}/v2/models/{name}/frames"
        r = httpx.post(url, content=data, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert "outputs" not in doc  # a segmenter answers its mask, not 80 k raw floats
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["mask"]["data"]))))
        assert mask.shape == want.shape and np.array_equal(mask, want)
        arr = httpx.post(url + "?mask=array", content=data,
                         headers={"Content-Type": "image/jpeg"}, timeout=30).json()["mask"]
        assert np.array_equal(np.asarray(arr["data"]), want)


def test_serve_from_repository_runs_real_engines(zoo_repository, tmp_path, monkeypatch):
    """``ppipe serve --model-repository``'s preparation: engines built here, never timing-only.
    More CPU workers than cores (a worker is one core, as profiled): the latencies planned and
    reserved are what each takes when all share the cores (x slots / cores), and it is said."""
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.serving.assembly import served_models
    from ppipe_trt.server.cli import describe
    from ppipe_trt.server.prepare import prepare

    monkeypatch.setattr("ppipe_trt.serving.local.usable_cores", lambda: 1)

    args = argparse.Namespace(plan=None, models=["inception", "fpn_detector"], profiles=None,
                              emulate=None, engines=tmp_path / "engines", slots=None,
                              slo_ms=None, model_repository=zoo_repository)
    plan, profiles, built, what = prepare(args)
    assert sorted(built) == ["fpn_detector", "inception"]
    assert {m.model: m.slo_ms for m in plan.models} == {"inception": 400.0,
                                                        "fpn_detector": 400.0}
    served = served_models(plan, profiles, built)
    assert not any(m.timing_only for m in served.values())
    assert [s.name for s in served["fpn_detector"].outputs] == list(
        FAMILIES["fpn_detector"].output_names)
    assert served["inception"].postprocess.kind == "classification"
    text = describe(plan, what, "http://127.0.0.1:8000", built,
                    frames=[n for n, s in served.items() if s.image is not None])
    assert "TIMING-ONLY" not in text and "inception: real engines (onnxruntime cpu" in text
    # the JPEG example names the model that takes frames, whichever the plan lists first
    assert "/v2/models/inception/frames" in text and "fpn_detector/frames" not in text
    assert "2 workers on 1 CPU cores: block latencies planned x2.00" in text
    stored = load_profiles(tmp_path / "engines", ["inception"])["inception"]
    for key, table in profiles["inception"].tables.items():
        want = stored.tables[key].latency_us
        assert table.latency_us == tuple(tuple(2.0 * v for v in row) for row in want)
    # the store now holds them with their configs: --model NAME serves them without the repo
    args2 = argparse.Namespace(**{**vars(args), "model_repository": None,
                                  "models": ["inception"]})
    plan2, profiles2, built2, what2 = prepare(args2)
    assert built2["inception"].build_dir == built["inception"].build_dir
    assert "CPU cores" not in what2  # one worker, one core: latencies as profiled
    assert profiles2["inception"].tables == stored.tables
    assert served_models(plan2, profiles, built2)["inception"].image is not None
    # the plan saved from the first serve (--save-plan) and served again (--plan): reserved
    # with the same time-sliced latencies, and said so
    from ppipe_trt.plan import save_plan

    save_plan(plan, tmp_path / "plan.json")
    args3 = argparse.Namespace(**{**vars(args), "plan": str(tmp_path / "plan.json"),
                                  "models": None})
    plan3, profiles3, built3, what3 = prepare(args3)
    assert sorted(built3) == ["fpn_detector", "inception"]
    assert "2 workers on 1 CPU cores: block latencies reserved x2.00" in what3
    for m in ("inception", "fpn_detector"):
        assert profiles3[m].tables == profiles[m].tables


def test_serve_refuses_what_it_cannot_serve_for_real(zoo_repository, tmp_path):
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.server.prepare import prepare

    base = dict(plan=None, profiles=None, emulate=None, engines=tmp_path / "engines",
                slots=None, slo_ms=None)
    with pytest.raises(BadInputError, match=r"not in .*zoo_repository"):
        prepare(argparse.Namespace(**base, models=["nope"], model_repository=zoo_repository))
    with pytest.raises(BadInputError, match="have no engines for cpu"):
        prepare(argparse.Namespace(**base, models=["my_net"], model_repository=None))


def test_config_reports_the_configured_max_batch_size(zoo_builds, zoo_repository, app_for,
                                                      http_server):
    """The model configuration endpoint reports the repository's ``max_batch_size`` (as
    Triton does), not the batch the plan happens to run, which changes from plan to plan;
    a batch above the planned one is still served (one request per sample inside)."""
    import tritonclient.http as httpclient

    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.serving.local import pipeline_plan

    name = "inception"
    built = zoo_builds[name]
    configured = min(load_model_entry(zoo_repository / name).max_batch, built.max_batch)
    assert configured > 1
    profiles = load_profiles(zoo_builds.store, [name])
    plan = pipeline_plan(profiles, name, [0], "cpu", batch_size=1, slo_ms=600.0)
    spec = FAMILIES[name]
    with http_server(app_for(plan, profiles, {name: built})) as srv:
        client = httpclient.InferenceServerClient(srv.url)
        assert client.get_model_config(name)["max_batch_size"] == configured
        x = np.zeros((configured,) + spec.input_shape, np.float32)
        inp = httpclient.InferInput(spec.input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer(name, [inp]).as_numpy(spec.output_names[0])
        assert got.shape[0] == configured
