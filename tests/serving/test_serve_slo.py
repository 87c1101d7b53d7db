"""``ppipe serve --model-repository``: a model whose SLO cannot be met on this machine does not
stop the others; it is served at the smallest feasible SLO and said so (start-up lines, model
metadata, /v2/status), or refused with ``--strict-slo``.  A real server on the demo models."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.serving.test_serve_cli import REPO, _free_port, start_serve

EXAMPLES = REPO / "examples" / "model_repository"


@pytest.fixture(scope="module")
def slo_repository(tmp_path_factory):
    """(repository, engine store): demo_detector as in the examples (its SLO derived: 50 ms)
    and demo_resnet asking for an SLO of 1 ms, which no CPU pipeline meets; engines built."""
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry

    root = tmp_path_factory.mktemp("slo_repository")
    repo, store = root / "models", root / "engines"
    for name in ("demo_detector", "demo_resnet"):
        shutil.copytree(EXAMPLES / name, repo / name)
    config = repo / "demo_resnet" / "config.pbtxt"
    text = config.read_text()
    assert 'value: { string_value: "50" }' in text
    config.write_text(text.replace('value: { string_value: "50" }',
                                   'value: { string_value: "1" }'))
    for name in ("demo_detector", "demo_resnet"):
        build_entry(load_model_entry(repo / name), "cpu", store, progress=False)
    return repo, store


def test_the_others_are_served_and_the_raised_slo_is_reported(slo_repository):
    import tritonclient.http as httpclient

    repo, store = slo_repository
    port = _free_port()
    proc, url = start_serve(["--model-repository", str(repo), "--engines", str(store),
                             "--port", str(port), "--grpc-port", "0"])
    try:
        client = httpclient.InferenceServerClient(url[len("http://"):])
        x = httpclient.InferInput("image", [1, 3, 256, 256], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 256, 256), np.float32))
        result = client.infer("demo_detector", [x]).get_response()
        assert result["model_name"] == "demo_detector" and len(result["outputs"]) == 6
        status = httpx.get(f"{url}/v2/status", timeout=10).json()
        resnet, detector = status["models"]["demo_resnet"], status["models"]["demo_detector"]
        slo = resnet["slo_ms"]
        assert resnet["configured_slo_ms"] == 1.0 and slo > 1.0
        assert resnet["slo_raised_reason"].startswith(
            "its configured SLO of 1 ms cannot be met on 2 cpu worker(s) of this machine")
        assert resnet["slo_raised_reason"].endswith(f"the smallest feasible SLO is {slo:g} ms")
        assert detector["slo_raised_reason"] is None
        assert detector["configured_slo_ms"] == detector["slo_ms"] == 50.0
        # the smallest the plan in force allows: its batch-1 pipeline fills 60 % of it, and
        # 0.01 ms less would not hold it
        planned = next(m for m in status["plan"]["models"] if m["model"] == "demo_resnet")
        assert planned["slo_ms"] == slo
        latency_us = min(p["latency_us"] for p in planned["pipelines"])
        assert (slo - 0.01) * 600.0 < latency_us <= slo * 600.0
        meta = client.get_model_metadata("demo_resnet")["parameters"]
        assert meta["slo_ms"] == slo and meta["configured_slo_ms"] == 1.0
        assert meta["slo_raised_reason"] == resnet["slo_raised_reason"]
        assert "configured_slo_ms" not in client.get_model_metadata("demo_detector")["parameters"]
        config = client.get_model_config("demo_resnet")["parameters"]
        assert config["configured_slo_ms"]["string_value"] == "1"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"planner: serving demo_resnet at SLO {slo:g} ms: its configured SLO of 1 ms" in out
    assert "SLO RAISED (the SLO asked cannot be met here" in out
    assert f"demo_resnet 1 -> {slo:g} ms" in out
    assert f"demo_resnet (SLO {slo:.1f} ms, RAISED from 1 ms) pipeline 0" in out
    assert "demo_detector (SLO 50.0 ms) pipeline 0" in out


def test_strict_slo_refuses_naming_the_model_and_the_smallest_feasible_slo(slo_repository):
    repo, store = slo_repository
    ran = subprocess.run([sys.executable, "-m", "ppipe_trt.cli", "serve", "--model-repository",
                          str(repo), "--engines", str(store), "--port", str(_free_port()),
                          "--grpc-port", "0", "--strict-slo"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 1, ran.stderr
    assert "ppipe serve: error: model demo_resnet: its configured SLO of 1 ms cannot be met " \
           "on 2 cpu worker(s) of this machine" in ran.stderr
    assert "the smallest feasible SLO is " in ran.stderr and "--strict-slo" in ran.stderr
    assert "demo_detector" not in ran.stderr.split("error:")[1]  # its SLO is met
    assert "serving on" not in ran.stderr


def test_models_past_the_slots_are_left_out_and_said(slo_repository):
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.server.prepare import prepare

    repo, store = slo_repository
    args = argparse.Namespace(plan=None, models=None, profiles=None, emulate=None,
                              engines=store, slots=1, slo_ms=None, model_repository=repo)
    plan, profiles, built, what = prepare(args)
    assert plan.model_names == ("demo_detector",) and sorted(built) == ["demo_detector"]
    assert "NOT SERVED (no worker slot left, --slots 1; give --slots >= 2): demo_resnet" in what
    with pytest.raises(BadInputError, match="--slots -1; expected 1 or more worker slots"):
        prepare(argparse.Namespace(**{**vars(args), "slots": -1}))
