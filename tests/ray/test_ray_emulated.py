"""On a machine without GPUs, ``build_ray_runtime`` starts its own local Ray instance with the
plan's GPU classes as custom resources, serves an emulated heterogeneous cluster, and shuts
Ray down when the runtime stops."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import wait

import numpy as np
import pytest

from tests.ray.conftest import gcs_logs

pytestmark = pytest.mark.ray

MODEL = "colorization-v2"


def test_emulated_cluster_on_its_own_local_ray_instance(shared_profiles):
    ray = pytest.importorskip("ray")
    from ppipe_trt.cluster import ClusterSpec, GpuPool
    from ppipe_trt.serving.local import emulated_plan
    from ppipe_trt.serving.ray_backend import RayOptions, build_ray_runtime, emulated_resources

    assert not ray.is_initialized()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    profiles = shared_profiles.subset([MODEL])
    cluster = ClusterSpec((GpuPool("L4", 1, 1, 2, 10.0), GpuPool("T4", 2, 2, 2, 10.0)),
                          "1xL4-2xT4")
    plan = emulated_plan(profiles, cluster, [MODEL])
    classes = {s.gpu_class for p in plan.models[0].pipelines for s in p.stages}
    tmp = tempfile.mkdtemp(prefix="ppipe-raytest-", dir="/tmp")
    try:
        try:
            rt = build_ray_runtime(plan, profiles, None,
                                   ray_options=RayOptions(num_cpus=2, temp_dir=tmp))
        except Exception as exc:  # Ray's own start failed: say what its GCS and raylet did
            raise RuntimeError(f"{exc}\n{gcs_logs(tmp)}") from exc
        have = ray.cluster_resources()
        declared = emulated_resources(plan)
        assert set(declared) == {f"gpu_class:{c}" for c in classes}
        assert all(have[k] == v >= 1 for k, v in declared.items())
        with rt:
            assert all(w.mode.startswith("timing-only") for w in rt.workers)
            rate = 0.4 * plan.models[0].throughput_rps
            futures, start = [], time.monotonic()
            for at in np.cumsum(np.random.default_rng(0).exponential(1 / rate, int(2 * rate))):
                delay = start + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(rt.submit(MODEL, None))
            done, pending = wait(futures, timeout=15)
            assert not pending
        # every request answered; at 40 % load most within the deadline.  Not "nearly all":
        # on a 2-core host the ten Ray processes make call latencies jitter by several ms
        # (measured with one core busy elsewhere: 2 late by 6.6 and 16.5 ms, 4 dropped, of
        # 73); goodput at 99 % attainment is measured in scripts/bench_vs_rayserve.py.
        ok = [f.result() for f in futures if f.exception() is None]
        late_ms = sorted(round((r.finish_us - r.deadline_us) / 1000, 1)
                         for r in ok if not r.met_deadline)
        reasons = sorted(getattr(f.exception(), "reason", repr(f.exception()))
                         for f in futures if f.exception() is not None)
        assert sum(r.met_deadline for r in ok) >= 0.8 * len(futures), \
            f"{len(late_ms)} late by {late_ms} ms, {len(reasons)} dropped {reasons}, " \
            f"runtime {rt.status()['hop_overhead_us']:.0f} us hop, margin " \
            f"{rt.deadline_margin_us:.0f} us"
        assert not ray.is_initialized()  # the runtime started Ray, so it shut it down
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
