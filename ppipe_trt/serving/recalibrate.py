"""Re-plan with what the workers take, when a model's measured capacity falls short.

Calibration (:mod:`ppipe_trt.scheduler.calibration`) corrects every reservation at once, but
the plan itself -- the batch sizes, the cuts, the pool sizes -- was chosen from the offline
profile.  When a model's capacity with the measured latencies falls short of the planned one
by more than ``shortfall``, :class:`CalibrationReplanner` makes the plan again from profiles
scaled to the measurement (:func:`measured_profiles`) through the same re-plan
(:func:`~ppipe_trt.adapt.replan`) and swap path (:meth:`~ppipe_trt.serving.runtime.
ServingRuntime.swap_plan`) as an operator's push: no request is lost.  The new plan's
capacity is then what the machine carries, and its workers are calibrated anew from the
scaled tables.  A thread of its own (the MILP never runs on the serving thread); started and
stopped with the runtime when ``RuntimeOptions.replan_on_calibration`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Mapping, Sequence

from ppipe_trt.engines.profiling import monotone_in_batch
from ppipe_trt.errors import ConfigError, PPipeError
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.tables import PipelineTable

if TYPE_CHECKING:
    from ppipe_trt.serving.runtime import ServingRuntime

log = logging.getLogger("ppipe.serving")


@dataclass(frozen=True, slots=True)
class ReplanOptions:
    """When calibration re-plans: a model's measured capacity below ``1 - shortfall`` of the
    planned one, after every stage of it ran ``min_executions`` batches under the plan in
    force, at most once per ``min_interval_s``; looked at every ``check_every_s``."""

    shortfall: float = 0.2
    min_executions: int = 200
    min_interval_s: float = 30.0
    check_every_s: float = 5.0

    def __post_init__(self):
        if not 0.0 < self.shortfall < 1.0:
            raise ConfigError(f"replan shortfall must be in (0, 1), got {self.shortfall!r}")
        if self.min_executions < 1 or self.min_interval_s < 0 or not self.check_every_s > 0:
            raise ConfigError("replan needs min_executions >= 1, min_interval_s >= 0 and "
                              "check_every_s > 0")


def measured_profiles(profiles: ProfileSet,
                      tables: Mapping[str, Sequence[tuple[PipelineTable, PipelineTable]]]
                      ) -> ProfileSet:
    """``profiles`` with each model's block latencies scaled to what was measured.

    ``tables``: per model, ``(planned, measured)`` latency tables of its pipelines (the
    calibrator's).  Per GPU class and MPS share, and per batch size, every block's latency is
    multiplied by the largest measured / planned ratio of the stages of that class and share
    (a batch size beyond the tables takes the ratio of the largest one they have); classes no
    stage uses keep their profile."""
    out = dict(profiles.models)
    for model, pairs in tables.items():
        if model not in out:
            continue
        ratios: dict[tuple[str, int], dict[int, float]] = {}
        for planned, measured in pairs:
            for st_p, st_m in zip(planned.stages, measured.stages):
                by_b = ratios.setdefault((st_p.gpu_class, st_p.mps_share), {})
                for b in range(1, len(st_p.latency_us)):
                    if st_p.latency_us[b] > 0:
                        r = st_m.latency_us[b] / st_p.latency_us[b]
                        by_b[b] = max(by_b.get(b, 0.0), r)
        prof = out[model]
        new_tables = dict(prof.tables)
        for key, by_b in ratios.items():
            table = prof.tables.get(key)
            if table is None or not by_b:
                continue
            top = max(by_b)
            rows = tuple(monotone_in_batch([v * by_b.get(b, by_b[top])
                                            for b, v in enumerate(row, 1)])
                         for row in table.latency_us)
            new_tables[key] = replace(table, latency_us=rows)
        out[model] = replace(prof, tables=new_tables)
    return ProfileSet(out, f"{profiles.source} (scaled to measured latencies)")


class CalibrationReplanner:
    """Watches a runtime's calibrators and re-plans when a model falls short (module doc)."""

    def __init__(self, runtime: "ServingRuntime", options: ReplanOptions | None = None):
        self.runtime = runtime
        self.options = options or ReplanOptions()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_s = -float("inf")
        #: (time, reason, outcome) of each re-plan tried, newest last (``/v2/status``)
        self.history: list[tuple[float, str, str]] = []

    def status(self) -> list[dict]:
        """The re-plans tried (the last 20), oldest first (JSON-ready)."""
        return [{"reason": reason, "outcome": outcome} for _, reason, outcome in
                self.history[-20:]]

    def start(self) -> "CalibrationReplanner":
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="ppipe-calibration-replan")
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.options.check_every_s):
            try:
                self.check()
            except Exception:  # the server goes on with the plan it has
                log.exception("calibration re-plan failed")

    def shortfall(self) -> tuple[str, float, float] | None:
        """The model whose measured capacity falls furthest below its planned one, past
        ``shortfall`` and measured enough, as ``(model, planned_rps, measured_rps)``."""
        opt = self.options
        worst = None
        for model, cal in self.runtime.calibrators().items():
            if cal.min_executions() < opt.min_executions:
                continue
            planned, measured = cal.capacity_rps()
            if planned > 0 and measured < (1.0 - opt.shortfall) * planned:
                if worst is None or measured / planned < worst[2] / worst[1]:
                    worst = (model, planned, measured)
        return worst

    def check(self) -> bool:
        """Re-plan now if a model falls short (and the last re-plan is old enough); returns
        whether a new plan was swapped in."""
        from ppipe_trt.adapt import replan

        now = time.monotonic()
        if now - self._last_s < self.options.min_interval_s:
            return False
        short = self.shortfall()
        if short is None:
            return False
        model, planned, measured = short
        rt = self.runtime
        self._last_s = now
        reason = (f"calibration: {model} measured {measured:.0f} req/s, planned "
                  f"{planned:.0f} req/s")
        builder = rt.builder
        profiles = measured_profiles(builder.profiles, {
            m: list(zip(c.planned, c.current_tables())) for m, c in rt.calibrators().items()})
        plan = rt.plan
        try:
            new = replan(plan, profiles, {m.model: m.weight for m in plan.models})
        except PPipeError as exc:
            self.history.append((now, reason, f"no plan: {exc}"))
            log.warning("%s; no new plan: %s", reason, exc)
            return False
        old_profiles = builder.profiles
        builder.profiles = profiles   # the new plan's schedulers reserve the measured rows
        try:
            rt.swap_plan(new, reason=reason)
        except PPipeError as exc:
            builder.profiles = old_profiles
            self.history.append((now, reason, f"swap refused: {exc}"))
            log.warning("%s; swap refused: %s", reason, exc)
            return False
        self.history.append((now, reason, f"swapped: {new.normalized_throughput:.0f} req/s "
                                          "planned"))
        log.warning("%s: re-planned, now %.0f req/s", reason, new.normalized_throughput)
        return True
