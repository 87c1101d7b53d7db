"""One worker-building path (WorkerSpec), the WorkerHandle protocol and the runtime's hooks."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from ppipe_trt.cluster import ClusterSpec, GpuPool
from ppipe_trt.errors import RequestRejectedError
from ppipe_trt.scheduler import place_workers
from ppipe_trt.serving.assembly import (RuntimeOptions, build_runtime, deadline_margin_us,
                                        plan_schedulers, served_models)
from ppipe_trt.serving.events import LoopEvent
from ppipe_trt.serving.handle import WorkerHandle
from ppipe_trt.serving.local import emulated_plan, pipeline_plan
from ppipe_trt.serving.runtime import ServingRuntime
from ppipe_trt.serving.specs import build_worker, worker_specs
from ppipe_trt.serving.transport import InProcessTransport

MODEL = "colorization-v2"
CLUSTER = ClusterSpec((GpuPool("L4", 2, 2, 2, 10.0), GpuPool("T4", 4, 2, 2, 10.0)), "2xL4-4xT4")


@pytest.fixture(scope="module")
def timing_only(shared_profiles):
    profiles = shared_profiles.subset([MODEL])
    return emulated_plan(profiles, CLUSTER, [MODEL]), profiles


def test_timing_only_specs_hold_each_slot_for_its_profiled_range(timing_only):
    plan, profiles = timing_only
    placement = place_workers(plan)
    specs = worker_specs(plan, profiles, {}, RuntimeOptions(cut_dtype="float16"), placement)
    assert [s.slot for s in specs] == list(placement.workers)
    max_batch = max(p.batch_size for p in plan.models[0].pipelines)
    for spec in specs:
        slot, timing = spec.slot, spec.emulation
        assert spec.executor is None and spec.cut_dtype == "float16"
        assert spec.warm_up_batch == max_batch
        assert (timing.gpu_class, timing.mps_share, timing.first_block, timing.last_block) == \
            (slot.gpu_class, slot.mps_share, slot.first_block, slot.last_block)
        assert timing.hold_us(1) == pytest.approx(profiles[MODEL].range_latency_us(
            slot.gpu_class, slot.mps_share, slot.first_block, slot.last_block, 1))


def test_real_specs_run_onnxruntime_and_emulate_only_other_classes(cpu_builds, emulated_class):
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.profiles.types import ProfileSet

    built = cpu_builds["demo_resnet"]
    profile = emulated_class(load_profiles(built.profile_path)["demo_resnet"], "SLOW", 5_000.0)
    profiles = ProfileSet({"demo_resnet": profile}, "test")
    for gpu_class, emulated in (("cpu", False), ("SLOW", True)):
        plan = pipeline_plan(profiles, "demo_resnet", cuts=[4], gpu_class=gpu_class,
                             batch_size=2, slo_ms=5_000.0)
        specs = worker_specs(plan, profiles, {"demo_resnet": built},
                             RuntimeOptions(intra_op_threads=2), place_workers(plan))
        assert [(s.slot.first_block, s.slot.last_block) for s in specs] == \
            [(0, 4), (5, built.num_blocks - 1)]
        for s in specs:
            e = s.executor
            assert (e.backend, e.device, e.intra_op_threads) == ("onnxruntime", "cpu", 2)
            assert e.build_dir == str(built.build_dir) and e.stage_onnx is None
            assert (s.emulation is not None) == emulated
            assert s.warm_up_batch == 2


def test_build_worker_gives_the_worker_its_slot_and_mode(cpu_builds, emulated_class):
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.profiles.types import ProfileSet

    built = cpu_builds["demo_resnet"]
    profile = emulated_class(load_profiles(built.profile_path)["demo_resnet"], "SLOW", 5_000.0)
    profiles = ProfileSet({"demo_resnet": profile}, "test")
    plan = pipeline_plan(profiles, "demo_resnet", cuts=[4], gpu_class="SLOW", slo_ms=5_000.0)
    spec = worker_specs(plan, profiles, {"demo_resnet": built}, RuntimeOptions(),
                        place_workers(plan))[1]
    worker = build_worker(spec, InProcessTransport(), sink=None)  # never started
    try:
        assert isinstance(worker, WorkerHandle)
        assert worker.info is spec.slot and worker.alive
        assert worker.mode == f"onnxruntime cpu blocks 5..{built.num_blocks - 1}, emulated SLOW"
    finally:
        worker.stop()
    assert not worker.alive


def test_ray_worker_proxy_is_a_worker_handle(timing_only):
    from ppipe_trt.serving.ray_backend.runtime import RayWorkerProxy

    slot = place_workers(timing_only[0]).workers[0]
    proxy = RayWorkerProxy(slot, None, "timing-only, emulated L4 [ray actor]", "node", 1, 0.0)
    assert isinstance(proxy, WorkerHandle)
    proxy.alive = False
    assert proxy.stats().mode.endswith("[down]")


@dataclass(slots=True)
class _Ping(LoopEvent):
    seen: threading.Event


class _HookedRuntime(ServingRuntime):
    """Implements the hooks a runtime with failing workers would: records where they run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_threads: set[str] = set()
        self.drops_seen = 0

    def on_cluster_event(self, event, now_us):
        self.hook_threads.add(threading.current_thread().name)
        event.seen.set()

    def on_drops(self, model, drops, now_us):
        self.hook_threads.add(threading.current_thread().name)
        self.drops_seen += len(drops)
        return drops

    def before_answer_drop(self, model, request, reason, detail):
        return reason, (detail + "; " if detail else "") + "told by the hook"


def _hooked_runtime(plan, profiles) -> _HookedRuntime:
    """The local assembly's steps, by hand, for a runtime subclass."""
    # a lone request on the idle pipeline goes at once (not at PPipe's last moment, which a
    # loaded host's late wake-up can miss): the hooks are under test, not the timing
    options = RuntimeOptions(hop_overhead_us=50.0, scheduler_kwargs={"work_conserving": True})
    placement = place_workers(plan)
    models = served_models(plan, profiles, {})
    transport = InProcessTransport(options.emulate_links)
    rt = _HookedRuntime(plan, models, plan_schedulers(plan, profiles, placement, options, 50.0),
                        transport, hop_overhead_us=50.0,
                        deadline_margin_us=deadline_margin_us(options, models), options=options)
    for spec in worker_specs(plan, profiles, {}, options, placement):
        rt.add_worker(build_worker(spec, transport, rt))
    return rt


def test_hooks_run_on_the_loop_and_shape_drop_answers(timing_only):
    plan, profiles = timing_only
    with _hooked_runtime(plan, profiles) as rt:
        seen = threading.Event()
        rt.post_event(_Ping(seen))
        assert seen.wait(5)
        # a deadline no route can meet: dropped at once by the scheduler
        fut = rt.submit(MODEL, None, timeout_us=1.0)
        with pytest.raises(RequestRejectedError, match="told by the hook") as err:
            fut.result(timeout=5)
        assert err.value.reason == "deadline_unreachable"
        assert rt.submit(MODEL, None).result(timeout=5).model == MODEL  # served after both
    assert rt.hook_threads == {"ppipe-runtime"}
    assert rt.drops_seen == 1
    assert rt.stats.snapshot()[MODEL].drops == {"deadline_unreachable": 1}


def test_an_event_without_a_handler_does_not_stop_the_loop(timing_only):
    plan, profiles = timing_only
    options = RuntimeOptions(hop_overhead_us=50.0, scheduler_kwargs={"work_conserving": True})
    with build_runtime(plan, profiles, None, options) as rt:
        rt.post_event(_Ping(threading.Event()))
        assert rt.submit(MODEL, None).result(timeout=5).model == MODEL  # served after both
        assert rt.ready
