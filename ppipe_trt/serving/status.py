"""The runtime's status report: the plan in force, the models, the workers and how they run
(JSON-ready; what ``/v2/status`` returns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ppipe_trt.plan import plan_to_dict
from ppipe_trt.scheduler.native import (scheduler_implementation,
                                        timed_worker_implementation)

if TYPE_CHECKING:
    from ppipe_trt.serving.handle import WorkerHandle
    from ppipe_trt.serving.runtime import ServingRuntime
    from ppipe_trt.serving.types import ServedModel


def model_status(m: "ServedModel") -> dict[str, Any]:
    return {"slo_ms": m.slo_us / 1000.0, "max_batch": m.max_batch, "mode": m.mode,
            "emulated": m.emulated, "frames": m.image is not None,
            "postprocess": m.postprocess.kind, "timing_only": m.timing_only,
            # the SLO asked, and why slo_ms is larger (None: served as asked)
            "configured_slo_ms": (m.configured_slo_us or m.slo_us) / 1000.0,
            "slo_raised_reason": m.slo_raised_reason}


def worker_status(w: "WorkerHandle") -> dict[str, Any]:
    s = w.info
    return {"worker_id": w.worker_id, "model": s.model, "pipeline": s.pipeline,
            "stage": s.stage, "blocks": [s.first_block, s.last_block],
            "gpu_class": s.gpu_class, "mps_share": s.mps_share, "server_id": s.server_id,
            "mode": w.mode, "alive": w.alive,
            "down_reason": getattr(w, "down_reason", None) or None}


def runtime_status(rt: "ServingRuntime") -> dict[str, Any]:
    """``rt``'s status; times: ``uptime_s`` and ``quarantined``'s ``*_s`` (since start) in
    seconds, the rest in microseconds.  Each worker says whether it is in its pool
    (``alive``) and, if not, why (``down_reason``)."""
    now = rt.now_us()
    return {
        "ready": rt.ready,
        "uptime_s": (now - rt.started_us) / 1e6 if rt.started_us else 0.0,
        "hop_overhead_us": rt.hop_overhead_us,
        "deadline_margin_us": rt.deadline_margin_us,
        "emulated": any(m.emulated for m in rt.models.values()),
        # the reservation scheduler compiled, or the Python reference (and why)
        "scheduler": {"policy": rt.options.policy,
                      **scheduler_implementation(rt.scheduler(m) for m in rt.models),
                      # the thread-less timing-only workers: compiled / python / None (none)
                      "timing_only_workers": timed_worker_implementation(rt.workers)},
        **rt.info,
        "models": {m.name: model_status(m) for m in rt.models.values()},
        "workers": [worker_status(w) for w in rt.workers],
        # local workers taken out of their pool after a fault (a hang, bad outputs, errors)
        "quarantined": [{"worker_id": q.worker_id, "model": q.model, "stage": q.stage,
                         "reason": q.reason,
                         "detected_s": (q.detected_us - rt.started_us) / 1e6,
                         "removed_s": (q.removed_us - rt.started_us) / 1e6}
                        for q in list(rt.quarantined)],
        # plan swaps: the generation in force (0: the plan it started with), when and why it
        # came, the workers it kept / added / retired; the earlier ones (newest last)
        "plan_generation": (rt.generation.to_dict(rt.started_us)
                            if rt.generation is not None else None),
        "plan_history": [g.to_dict(rt.started_us) for g in rt.history[-20:]],
        # profile vs measured latencies and the capacity the plan really has
        "calibration": rt.calibration_status(),
        # re-plans from the measured latencies (--replan-on-calibration; null when off)
        "calibration_replans": rt.replan_status(),
        # overload control at the door: the admission limit and the front end's lag
        "admission": rt.admission_status(),
        "adapt": rt.adaptive.status() if rt.adaptive is not None else {"enabled": False},
        "plan": plan_to_dict(rt.plan),
    }
