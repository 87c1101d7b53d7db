"""Fixtures for HTTP tests: a real app on real small models (ONNX Runtime on CPU)."""

from __future__ import annotations

import socket
import threading
import time

import pytest


class _LazyBuilds(dict):
    """Built models by name, each built (idempotently) on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, model):
        from ppipe_trt.engines import build_model_engines

        self[model] = build_model_engines(model, "cpu", store_root=self.root, progress=False)
        return self[model]


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory):
    """(store root, {model: BuiltModel}) for the CPU class; engines are built on first use."""
    root = tmp_path_factory.getbasetemp() / "engines"
    return root, _LazyBuilds(root)


@pytest.fixture(scope="session")
def cpu_profiles(engine_store):
    """A function: ``cpu_profiles(model)`` -> ProfileSet of that built model."""
    from ppipe_trt.profiles import load_profiles

    def load(model: str):
        engine_store[1][model]
        return load_profiles(engine_store[0], [model])

    return load


def make_app(plan, profiles, built, **settings):
    from api.app import ApiSettings, create_app
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime

    return create_app(lambda: build_runtime(plan, profiles, built,
                                            RuntimeOptions(hop_overhead_us=50.0)),
                      ApiSettings(**settings))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """A real uvicorn server on 127.0.0.1:<free port>, in a thread (for external clients),
    with the HTTP protocol ``ppipe serve`` runs (:func:`api.http_protocol.http_protocol_for`:
    the infer routes answered in the protocol; ``asgi=True``: uvicorn's own, every route
    through ASGI)."""

    def __init__(self, app, asgi: bool = False):
        import uvicorn

        from api.http_protocol import http_protocol_for

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning",
            http="auto" if asgi else http_protocol_for(app)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def app_for():
    """``app_for(plan, profiles, built, **settings)`` -> a FastAPI app (lifespan not run)."""
    return make_app


@pytest.fixture(scope="session")
def http_server():
    """``with http_server(app) as srv:`` a real uvicorn server; ``srv.url`` is host:port."""
    return UvicornThread


@pytest.fixture(scope="module")
def detector_runtime(engine_store, cpu_profiles):
    """A started runtime serving ``demo_detector`` (one image input, six outputs) in two
    stages with a planned batch of 4: a 4-sample request runs as one batch; a 1-sample request
    waits for company until its latest start, so the SLO is kept short (500 ms)."""
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
    from ppipe_trt.serving.local import pipeline_plan

    profiles = cpu_profiles("demo_detector")
    plan = pipeline_plan(profiles, "demo_detector", cuts=[2], gpu_class="cpu", batch_size=4,
                         slo_ms=500.0)
    rt = build_runtime(plan, profiles, {"demo_detector": engine_store[1]["demo_detector"]},
                       RuntimeOptions(hop_overhead_us=50.0)).start()
    yield rt
    rt.stop()


@pytest.fixture(scope="module")
def detector_reference(engine_store):
    """``(x, {output: array})``: 4 random images through the unsplit ``demo_detector``."""
    import numpy as np
    import onnxruntime as ort

    built = engine_store[1]["demo_detector"]
    sess = ort.InferenceSession(str(built.full_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    x = np.random.default_rng(11).standard_normal((4, 3, 256, 256)).astype(np.float32)
    return x, dict(zip(names, sess.run(names, {"image": x})))

