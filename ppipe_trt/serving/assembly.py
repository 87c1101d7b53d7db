"""Assemble a :class:`ServingRuntime` from a plan: placement, schedulers, workers, engines.

The steps both assemblies share live here: the schedulers of a plan
(:func:`plan_schedulers`), the deadline margin (:func:`deadline_margin_us`), the served
models (:func:`~ppipe_trt.serving.served.served_models`) and the workers' make-up
(:func:`~ppipe_trt.serving.specs.worker_specs`: real compute, emulated classes, timing-only).
:func:`build_runtime` runs each worker as a thread of this process; the Ray assembly
(:mod:`ppipe_trt.serving.ray_backend.assembly`) runs the same specs in Ray actors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping

from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.repository.types import ModelEntry
from ppipe_trt.scheduler.interface import Scheduler
from ppipe_trt.scheduler.placement import Placement
from ppipe_trt.serving.clock import measure_hop_overhead_us
from ppipe_trt.serving.faults import FaultPolicy, StageWatchdog
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.runtime import ServingRuntime
from ppipe_trt.serving.served import (TIMING_ONLY_INPUTS, TIMING_ONLY_OUTPUTS, model_entry_for,
                                      served_models)
from ppipe_trt.serving.specs import build_worker, worker_specs
from ppipe_trt.serving.transport import InProcessTransport
from ppipe_trt.serving.types import ServedModel

__all__ = ["PlanWorkerBuilder", "RuntimeOptions", "TIMING_ONLY_INPUTS", "TIMING_ONLY_OUTPUTS",
           "build_runtime", "deadline_margin_us", "model_entry_for", "plan_schedulers",
           "served_models"]


def plan_schedulers(plan: Plan, profiles: ProfileSet, placement: Placement,
                    options: RuntimeOptions, hop_overhead_us: float,
                    state=None) -> dict[str, Scheduler]:
    """One scheduler per model of ``plan``, of ``options.policy``, told that a hand-off
    between stages costs ``hop_overhead_us``; sharing ``state`` (a
    :class:`~ppipe_trt.scheduler.tables.ClusterState`) when given (a plan swap)."""
    from ppipe_trt.scheduler import build_schedulers

    kwargs = dict(options.scheduler_kwargs or {})
    if options.policy == "reservation":
        kwargs.setdefault("wake_lead_us", options.wake_lead_us)
    return build_schedulers(plan, profiles, placement, policy=options.policy,
                            hop_overhead_us=hop_overhead_us, state=state, **kwargs)


def deadline_margin_us(options: RuntimeOptions, models: Mapping[str, ServedModel],
                       unseen_us: float = 0.0) -> float:
    """How much of each request's deadline the scheduler does not plan with (microseconds):
    ``options.deadline_margin_us``, plus ``unseen_us`` (costs outside the scheduler's view,
    e.g. the Ray dispatch and answer calls), plus ``options.deadline_margin_fraction`` of the
    tightest SLO among models that run real compute (their latency varies around the
    profile)."""
    margin = options.deadline_margin_us + unseen_us
    real = [m.slo_us for m in models.values() if not m.timing_only]
    if real:
        margin += options.deadline_margin_fraction * min(real)
    return margin


def build_runtime(plan: Plan, profiles: ProfileSet, built_models: Mapping[str, Any] | None = None,
                  options: RuntimeOptions | None = None,
                  info: Mapping[str, Any] | None = None,
                  entries: Mapping[str, ModelEntry] | None = None) -> ServingRuntime:
    """A runtime (not started) serving every model of ``plan``, its workers threads of this
    process.

    ``built_models`` maps model names to :class:`~ppipe_trt.engines.BuiltModel` for models
    with engines on this machine; the others must be in ``profiles`` and run timing-only.
    ``entries``: repository configurations by model (see
    :func:`~ppipe_trt.serving.served.served_models`).  Opens and warms up every engine.
    Workers with an engine judge its faults by ``options`` (see
    :mod:`ppipe_trt.serving.faults`); one watchdog thread times their batches.
    """
    from ppipe_trt.scheduler import place_workers

    options = options or RuntimeOptions()
    built_models = dict(built_models or {})
    hop = options.hop_overhead_us
    if hop is None:
        hop = measure_hop_overhead_us()
    placement = place_workers(plan)
    schedulers = plan_schedulers(plan, profiles, placement, options, hop)
    models = served_models(plan, profiles, built_models, entries=entries)
    specs = worker_specs(plan, profiles, built_models, options, placement)
    transport = InProcessTransport(emulate_links=options.emulate_links)
    runtime = ServingRuntime(plan, models, schedulers, transport, hop_overhead_us=hop,
                             deadline_margin_us=deadline_margin_us(options, models),
                             options=options,
                             info={"policy": options.policy, "transport": "in-process",
                                   "emulate_links": options.emulate_links, **(info or {})},
                             placement=placement)
    faults = FaultPolicy.from_options(options)
    watchdog = StageWatchdog(faults.watchdog_period_s)
    builder = LocalWorkerBuilder(profiles, built_models, options, hop, transport, runtime,
                                 faults, watchdog)
    runtime.builder = builder
    for w in builder.build(specs):
        runtime.add_worker(w)
    return runtime


class PlanWorkerBuilder(ABC):
    """What every assembly's :class:`~ppipe_trt.serving.swap.WorkerBuilder` shares: the
    workers' specs and the schedulers of a plan, from the same profiles, built models and
    options as the runtime it swaps plans on.  Subclasses say how workers are built."""

    def __init__(self, profiles: ProfileSet, built_models: Mapping[str, Any],
                 options: RuntimeOptions, hop_overhead_us: float, transport, runtime):
        self.profiles = profiles
        self.built_models = built_models
        self.options = options
        self.hop_overhead_us = hop_overhead_us
        self._transport = transport
        self._runtime = runtime

    def specs(self, plan: Plan, placement: Placement, worker_ids) -> tuple:
        return worker_specs(plan, self.profiles, self.built_models, self.options, placement,
                            only=worker_ids)

    @abstractmethod
    def build(self, specs) -> list:
        """Build the workers of ``specs`` (engines opened, not started)."""

    def schedulers(self, plan: Plan, placement: Placement, state) -> dict[str, Scheduler]:
        return plan_schedulers(plan, self.profiles, placement, self.options,
                               self.hop_overhead_us, state=state)


class LocalWorkerBuilder(PlanWorkerBuilder):
    """Builds a local runtime's workers (threads, or thread-less timing-only workers on the
    loop's timers), at start and for a plan swap (:mod:`ppipe_trt.serving.swap`)."""

    def __init__(self, profiles: ProfileSet, built_models: Mapping[str, Any],
                 options: RuntimeOptions, hop_overhead_us: float, transport, runtime,
                 faults: FaultPolicy, watchdog: StageWatchdog):
        super().__init__(profiles, built_models, options, hop_overhead_us, transport, runtime)
        self._faults = faults
        self._watchdog = watchdog

    def build(self, specs) -> list:
        return [build_worker(spec, self._transport, self._runtime,
                             built=self.built_models.get(spec.slot.model),
                             timers=self._runtime.timers, faults=self._faults,
                             watchdog=self._watchdog) for spec in specs]
