#!/usr/bin/env python3
"""Latency of a lone frame on `ppipe serve` at idle: work-conserving vs PPipe's wait (issue 13).

Starts ``ppipe serve`` (what ``make serve`` runs: the built-in ``demo_resnet`` planned for this
machine) once per policy, sends ``--frames`` JPEG frames one at a time with ``--gap-ms``
between them (idle traffic), and reports per policy: the client's round trip (HTTP, JPEG
decode, preprocessing, queueing, inference) and the server's own per-request latency (from
the Triton statistics endpoint: accepted -> answered), each over the model's execution time
(ONNX Runtime on the same file, batch 1, one intra-op thread as the stage workers use, median
of ``--exec-runs``).

With the default (work-conserving) policy it also breaks the client's round trip down, each
the median over the same number of idle requests: ``GET /v2/health/ready`` (the HTTP round
trip of this host at idle, nothing else), the frame with ``?raw=false`` (``top_k`` only, no
1000 raw floats in JSON), the preprocessed tensor sent to ``/infer`` in binary (no JPEG
decode), and the frame's decode + preprocessing in this process (``api.frames.decode_frame``).

    scripts/bench_idle_latency.py [--engines DIR] [--frames 40] [--gap-ms 100] [--port 18123]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo_resnet"


def _jpeg() -> bytes:
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    pixels = (np.random.default_rng(0).random((224, 224, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def execution_ms(runs: int) -> float:
    """Median batch-1 time (ms) of the demo model in ONNX Runtime, one intra-op thread."""
    import numpy as np
    import onnxruntime as ort
    path = ROOT / "examples" / "model_repository" / MODEL / "1" / "model.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 224 for d in inp.shape[1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(5):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _ready_connection(port: int, deadline: float) -> http.client.HTTPConnection:
    """A connection once the server answers its readiness probe."""
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/v2/health/ready")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return conn
        except OSError:
            pass
        conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError("ppipe serve did not become ready in time")
        time.sleep(0.2)


def _idle_rtt(conn, args, method: str, path: str, body=None, headers=None) -> float:
    """Median round trip (ms) of ``--frames`` idle requests (``--gap-ms`` apart)."""
    rtt = []
    for i in range(args.frames + args.warmup_frames):
        t = time.perf_counter()
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path} answered {resp.status}: {data[:200]!r}")
        if i >= args.warmup_frames:
            rtt.append((time.perf_counter() - t) * 1e3)
        time.sleep(args.gap_ms / 1e3)
    return statistics.median(rtt)


def _binary_infer(body: bytes) -> tuple[bytes, dict]:
    """The frame's preprocessed tensor as a binary KServe v2 request, and its headers."""
    from api.frames import decode_frame
    from ppipe_trt.repository import load_model_entry

    entry = load_model_entry(ROOT / "examples" / "model_repository" / MODEL)
    x = decode_frame(body, entry.image)
    header = json.dumps({"inputs": [{"name": entry.image.input_name, "shape": list(x.shape),
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": o.name, "parameters": {"binary_data": True}}
                                     for o in entry.outputs]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def decode_ms(body: bytes, runs: int) -> float:
    """Median time (ms) of the frame's decode + preprocessing in this process."""
    from api.frames import decode_frame
    from ppipe_trt.repository import load_model_entry

    spec = load_model_entry(ROOT / "examples" / "model_repository" / MODEL).image
    for _ in range(5):
        decode_frame(body, spec)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        decode_frame(body, spec)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def serve_and_measure(extra: list[str], args, breakdown: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "ppipe_trt.cli", "serve", "--engines", str(args.engines),
           "--port", str(args.port), "--grpc-port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + args.start_timeout_s
        for line in proc.stdout:
            if line.startswith("serving on"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("ppipe serve did not start in time")
        else:
            raise RuntimeError(f"ppipe serve exited with {proc.wait()}")
        body = _jpeg()
        conn = _ready_connection(args.port, deadline)
        rtt = []
        for i in range(args.frames + args.warmup_frames):
            t = time.perf_counter()
            conn.request("POST", f"/v2/models/{MODEL}/frames", body,
                         {"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"frame answered {resp.status}")
            if i >= args.warmup_frames:
                rtt.append((time.perf_counter() - t) * 1e3)
            time.sleep(args.gap_ms / 1e3)
        conn.request("GET", f"/v2/models/{MODEL}/stats")
        stats = json.loads(conn.getresponse().read())["model_stats"][0]["inference_stats"]
        ok = stats["success"]
        out = {"client_p50_ms": statistics.median(rtt), "client_p90_ms":
               sorted(rtt)[int(0.9 * len(rtt))],
               "server_mean_ms": ok["ns"] / ok["count"] / 1e6, "frames": len(rtt)}
        if breakdown:
            out["http_ready_p50_ms"] = _idle_rtt(conn, args, "GET", "/v2/health/ready")
            out["frame_top_k_only_p50_ms"] = _idle_rtt(
                conn, args, "POST", f"/v2/models/{MODEL}/frames?raw=false", body,
                {"Content-Type": "image/jpeg"})
            tensor, headers = _binary_infer(body)
            out["binary_tensor_p50_ms"] = _idle_rtt(conn, args, "POST",
                                                    f"/v2/models/{MODEL}/infer", tensor, headers)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, default=ROOT / "engines")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--warmup-frames", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=100.0)
    ap.add_argument("--port", type=int, default=18123)
    ap.add_argument("--exec-runs", type=int, default=50)
    ap.add_argument("--start-timeout-s", type=float, default=300.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    exec_ms = execution_ms(args.exec_runs)
    out = {"execution_ms": exec_ms}
    out["decode_ms"] = decode_ms(_jpeg(), args.exec_runs)
    for name, extra in (("ppipe_wait", ["--no-work-conserving"]), ("work_conserving", [])):
        out[name] = serve_and_measure(extra, args, breakdown=name == "work_conserving")
    print(f"execution (ONNX Runtime, batch 1, 1 thread): {exec_ms:.2f} ms")
    print(f"{'policy':<16} {'client p50 ms':>14} {'x exec':>7} {'server mean ms':>15} {'x exec':>7}")
    for name in ("ppipe_wait", "work_conserving"):
        r = out[name]
        print(f"{name:<16} {r['client_p50_ms']:>14.2f} {r['client_p50_ms'] / exec_ms:>7.2f} "
              f"{r['server_mean_ms']:>15.2f} {r['server_mean_ms'] / exec_ms:>7.2f}")
    wc = out["work_conserving"]
    print(f"\nwhere the work-conserving frame's round trip goes (medians, ms; idle requests "
          f"{args.gap_ms:.0f} ms apart):")
    rows = [("HTTP round trip at idle (GET /v2/health/ready)", wc["http_ready_p50_ms"]),
            ("frame decode + preprocessing (in process)", out["decode_ms"]),
            ("model execution (ONNX Runtime, batch 1)", exec_ms),
            ("server: accepted -> answered (mean)", wc["server_mean_ms"]),
            ("frame, default answer (outputs + top_k)", wc["client_p50_ms"]),
            ("frame, ?raw=false (top_k only)", wc["frame_top_k_only_p50_ms"]),
            ("preprocessed tensor, binary /infer (no decode)", wc["binary_tensor_p50_ms"])]
    for label, ms in rows:
        print(f"  {label:<50} {ms:>7.2f} {ms / exec_ms:>6.2f}x exec")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
