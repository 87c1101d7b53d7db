#!/usr/bin/env python
"""The user's own models, measured end to end (issue 9, acceptance 3).

For every CNN family of ``tests/model_zoo.py`` (PyTorch modules exported to ONNX with a
dynamic batch axis, written into a Triton-layout repository as a user would):

1. build: ``build_entry`` (graph analysis, pre-partition into ``--blocks`` blocks,
   sub-graph extraction, ONNX Runtime engines, profile at batch 1..max) -- wall seconds;
2. verify: the chained blocks against the unsplit model at batch 1 and max (relative error);
3. serve: the model split into three pipeline stages on three workers, behind the real HTTP
   front end (uvicorn), queried with tritonclient (binary tensors) at batch 1 and at max
   batch, one request at a time: client latency median / p99 over ``--requests`` requests,
   and the largest relative error of the answers against ONNX Runtime on the user's file.

Served latency is measured under ``--policy`` (default ``triton``: answer as soon as a
worker is free; the reservation policy holds a lone request until its latest start by
design, so its idle latency approaches the SLO).  Real compute on this CPU, nothing emulated.
Prints a markdown table; ``--out`` also writes it, ``--json`` the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _serve(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"127.0.0.1:{port}"


def measure_family(name: str, repo: Path, store: Path, blocks: int, requests: int,
                   policy: str) -> dict:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    from api.app import create_app
    from ppipe_trt.engines.verify import check_chain
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.repository import load_model_entry
    from ppipe_trt.repository.engines import build_entry
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
    from ppipe_trt.serving.local import pipeline_plan
    from tests.model_zoo import FAMILIES

    spec = FAMILIES[name]
    entry = load_model_entry(repo / name)
    start = time.perf_counter()
    built = build_entry(entry, "cpu", store, num_blocks=blocks, progress=False)
    build_s = time.perf_counter() - start
    check = check_chain(built)
    n = built.num_blocks
    cuts = sorted({c for c in (n // 3 - 1, 2 * n // 3 - 1) if 0 <= c < n - 1}) or [0]
    profiles = load_profiles(store, [name])
    plan = pipeline_plan(profiles, name, cuts, "cpu", batch_size=entry.max_batch,
                         slo_ms=1000.0)
    app = create_app(lambda: build_runtime(plan, profiles, {name: built},
                                           RuntimeOptions(policy=policy)))
    server, thread, url = _serve(app)
    sess = ort.InferenceSession(str(entry.onnx_path), providers=["CPUExecutionProvider"])
    row = {"family": name, "task": spec.task, "blocks": n, "stages": len(cuts) + 1,
           "build_s": build_s, "verify_max_rel_error": check.max_rel_error,
           "verified_batches": list(check.batches), "policy": policy}
    try:
        client = httpclient.InferenceServerClient(url)
        rng = np.random.default_rng(0)
        worst = 0.0
        for batch in (1, entry.max_batch):
            x = rng.standard_normal((batch,) + spec.input_shape).astype(np.float32)
            want = dict(zip([o.name for o in sess.get_outputs()],
                            sess.run(None, {spec.input_name: x})))
            inp = httpclient.InferInput(spec.input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            outs = [httpclient.InferRequestedOutput(o, binary_data=True)
                    for o in spec.output_names]
            times = []
            for i in range(requests + 2):
                t = time.perf_counter()
                result = client.infer(name, [inp], outputs=outs)
                if i >= 2:  # two warm-up requests
                    times.append((time.perf_counter() - t) * 1000.0)
            for o in spec.output_names:
                got, ref = result.as_numpy(o), want[o]
                worst = max(worst, float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)),
                                                                          1e-12)))
            key = "batch1" if batch == 1 else "max_batch"
            row[f"{key}_p50_ms"] = statistics.median(times)
            row[f"{key}_p99_ms"] = float(np.percentile(times, 99))
        row["max_batch"] = entry.max_batch
        row["served_max_rel_error"] = worst
        row["exec_batch1_ms"] = profiles[name].range_latency_us("cpu", 1, 0, n - 1, 1) / 1e3
    finally:
        server.should_exit = True
        thread.join(30)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--requests", type=int, default=40, help="timed requests per batch size")
    ap.add_argument("--policy", default="triton")
    ap.add_argument("--family", action="append", help="only these families (repeatable)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)

    from tests.conftest import _zoo_config
    from tests.model_zoo import FAMILIES, export_family

    names = args.family or list(FAMILIES)
    work = Path(tempfile.mkdtemp(prefix="ppipe_user_models_"))
    repo, store = work / "repo", work / "engines"
    for name in names:
        export_family(name, repo / name / "1" / "model.onnx")
        filename, text = _zoo_config(name)
        (repo / name / filename).write_text(text)
        if FAMILIES[name].task == "classification":
            (repo / name / "labels.txt").write_text(
                "".join(f"class_{i}\n" for i in range(FAMILIES[name].num_classes)))
    rows = []
    for name in names:
        rows.append(measure_family(name, repo, store, args.blocks, args.requests, args.policy))
        print(f"{name}: done", file=sys.stderr)
    lines = [
        "# The user's own models: build -> verify -> serve (CPU, ONNX Runtime, real compute)",
        "",
        f"{time.strftime('%Y-%m-%d')}, 2-core CPU machine; `scripts/bench_user_models.py "
        f"--blocks {args.blocks} --requests {args.requests} --policy {args.policy}`.  Each "
        "model is exported from PyTorch into a Triton-layout repository, built, verified "
        "(chained blocks vs the unsplit model at batch 1 and max), then served split into "
        "pipeline stages on separate workers behind the HTTP front end and queried with "
        "tritonclient (binary tensors), one request at a time.  Latency is the client's round "
        "trip (median / p99); `exec` is the profiled batch-1 compute of the whole model.",
        "",
        "| family | task | blocks | stages | build s | verify rel. err | served rel. err | "
        "exec b=1 ms | b=1 p50 / p99 ms | b=max | b=max p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['task']} | {r['blocks']} | {r['stages']} | "
            f"{r['build_s']:.2f} | {r['verify_max_rel_error']:.1e} | "
            f"{r['served_max_rel_error']:.1e} | {r['exec_batch1_ms']:.2f} | "
            f"{r['batch1_p50_ms']:.2f} / {r['batch1_p99_ms']:.2f} | {r['max_batch']} | "
            f"{r['max_batch_p50_ms']:.2f} / {r['max_batch_p99_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
