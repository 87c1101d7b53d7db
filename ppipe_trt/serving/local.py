"""Plans for serving on this machine and on emulated clusters (what ``ppipe serve`` plans).

* :func:`local_plan`: the built models' own GPU class (``cpu`` here), one pool of ``slots``
  workers, SLO ``max(min_slo_ms, slo_factor x batch-1 latency)``.  A model whose SLO cannot
  be met there is planned at the smallest SLO that can (:class:`SloRaise`), unless strict.
* :func:`emulated_plan`: a cluster spec (e.g. 4 L4 + 12 T4) and models from the profiles;
  SLO ``slo_factor x`` the model's L4 batch-1 latency when L4 is profiled (the paper's rule),
  else of the fastest class it has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ppipe_trt.cluster import ClusterSpec, GpuPool, Workload
from ppipe_trt.engines.gpu import usable_cores  # noqa: F401  (re-exported: callers import it here)
from ppipe_trt.errors import ConfigError, InfeasiblePlanError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet


def default_slo_ms(profiles: ProfileSet, model: str, gpu_class: str | None = None,
                   slo_factor: float = 5.0, min_slo_ms: float = 0.0) -> float:
    profile = profiles[model]
    classes = profile.gpu_classes
    if gpu_class is None:
        gpu_class = "L4" if "L4" in classes else min(
            classes, key=lambda c: profile.batch1_latency_us(c))
    return max(min_slo_ms, slo_factor * profile.batch1_latency_us(gpu_class) / 1000.0)


#: Where a plan records the models it serves above the SLO they asked for (``Plan.params``).
SLO_RAISED_PARAM = "slo_raised"


@dataclass(frozen=True, slots=True)
class SloRaise:
    """A model planned at a larger SLO than it asked for, because no pipeline meets the asked
    one on the cluster it is planned for.

    ``asked_slo_ms``: its configuration's ``slo_ms`` (or ``--slo-ms``), or when it names none
    (``derived``) the SLO derived from its profile; ``slo_ms``: the smallest SLO the planner
    can meet there (:func:`planner.smallest_feasible_slo_ms`), the one in force;
    ``fastest_pipeline_ms``: what that follows from, the model's fastest batch-1 pipeline
    there, planned against ``slo_budget_fraction`` of the SLO; ``where``: the cluster, in
    words.
    """

    model: str
    asked_slo_ms: float
    slo_ms: float
    derived: bool
    fastest_pipeline_ms: float
    slo_budget_fraction: float
    where: str

    @property
    def reason(self) -> str:
        """One line for the start-up lines, the model metadata and /v2/status."""
        asked = (f"SLO of {self.asked_slo_ms:g} ms (derived from the profile)" if self.derived
                 else f"configured SLO of {self.asked_slo_ms:g} ms")
        return (f"its {asked} cannot be met on {self.where}: "
                f"its fastest pipeline takes {self.fastest_pipeline_ms:.2f} ms at batch 1, "
                f"planned at {self.slo_budget_fraction:.0%} of the SLO; the smallest feasible "
                f"SLO is {self.slo_ms:g} ms")

    def to_dict(self) -> dict[str, Any]:
        return {"asked_slo_ms": self.asked_slo_ms, "slo_ms": self.slo_ms,
                "derived": self.derived, "fastest_pipeline_ms": self.fastest_pipeline_ms,
                "reason": self.reason}


def local_cluster(gpu_class: str, slots: int) -> ClusterSpec:
    """This machine as the planner sees it: one server of ``slots`` workers of ``gpu_class``."""
    return ClusterSpec((GpuPool(gpu_class, slots, gpus_per_server=slots, max_mps=1,
                                link_bandwidth_gbps=100.0),), f"local-{gpu_class}")


def local_plan(profiles: ProfileSet, models: Sequence[str], gpu_class: str, slots: int = 1,
               slo_ms: Mapping[str, float] | None = None, min_slo_ms: float = 50.0,
               max_batch: int = 8, time_limit_s: float = 30.0,
               weights: Mapping[str, float] | None = None, strict_slo: bool = True) -> Plan:
    """Plan ``models`` on ``slots`` workers of this machine's class ``gpu_class``;
    ``slo_ms``/``weights`` by model (missing: the default SLO, weight 1).

    A model whose SLO no pipeline meets here is planned at the smallest SLO that one does,
    recorded in ``plan.params[SLO_RAISED_PARAM]`` (model -> :meth:`SloRaise.to_dict`); with
    ``strict_slo`` that is an :class:`~ppipe_trt.errors.InfeasiblePlanError` naming each such
    model, its SLO and the smallest feasible one."""
    from planner import PlannerOptions, plan_cluster

    if slots < len(models):
        raise ConfigError(f"{slots} worker slots cannot serve {len(models)} models; give "
                          f"--slots >= {len(models)}")
    cluster = local_cluster(gpu_class, slots)
    slo_ms = dict(slo_ms or {})
    weights = dict(weights or {})
    options = PlannerOptions(max_batch=max_batch, time_limit_s=time_limit_s)
    workloads = [Workload(m, slo_ms.get(m) or default_slo_ms(profiles, m, gpu_class,
                                                             min_slo_ms=min_slo_ms),
                          weights.get(m, 1.0))
                 for m in models]
    raised = slo_raises(profiles, cluster, workloads, options,
                        derived=[m for m in models if not slo_ms.get(m)],
                        where=f"{slots} {gpu_class} worker(s) of this machine")
    if raised and strict_slo:
        raise InfeasiblePlanError("; ".join(
            f"model {r.model}: {r.reason} (give it slo_ms >= {r.slo_ms:g}, or serve without "
            f"--strict-slo to serve it at that SLO)" for r in raised.values()))
    workloads = [replace(w, slo_ms=raised[w.model].slo_ms) if w.model in raised else w
                 for w in workloads]
    plan = plan_cluster(profiles, cluster, workloads, "ppipe", options)
    if raised:
        plan = replace(plan, params={**plan.params, SLO_RAISED_PARAM: {
            m: r.to_dict() for m, r in raised.items()}})
    return plan


def slo_raises(profiles: ProfileSet, cluster: ClusterSpec, workloads: Sequence[Workload],
               options, derived: Sequence[str] = (), where: str | None = None
               ) -> dict[str, SloRaise]:
    """The workloads whose SLO no pipeline meets on ``cluster`` (planner ``options``), by
    model, each with the smallest SLO one does; ``derived``: the models whose SLO was derived
    from the profile rather than configured; ``where``: the cluster in the reasons (default
    its label)."""
    from planner import fastest_pipeline_us, slo_for_latency_ms

    out = {}
    for w in workloads:
        fastest_us = fastest_pipeline_us(profiles[w.model], cluster, options)
        if w.slo_us * options.slo_budget_fraction < fastest_us:  # the planner's own test
            out[w.model] = SloRaise(
                w.model, w.slo_ms, slo_for_latency_ms(fastest_us, options.slo_budget_fraction),
                w.model in derived, fastest_us / 1000.0, options.slo_budget_fraction,
                where or cluster.label)
    return out


def time_sliced(profiles: ProfileSet, models: Sequence[str], gpu_class: str,
                factor: float) -> ProfileSet:
    """``profiles`` with the block latencies of ``models`` on ``gpu_class`` multiplied by
    ``factor``: what each of ``slots`` CPU workers takes when all run at once on ``cores``
    cores and the OS shares them fairly (``factor = slots / cores``).  The plan and the
    reservations then hold when every model is loaded at once; a model loaded alone finishes
    its batches early (the scheduler takes a measured finish when nothing is reserved after
    it) and is served below what its worker could do alone.  The whole model's latency (the
    derived SLO) is left as profiled."""
    if factor <= 1.0:
        return profiles
    scaled = dict(profiles.models)
    for m in models:
        prof = profiles[m]
        tables = {key: (replace(t, latency_us=tuple(tuple(v * factor for v in row)
                                                    for row in t.latency_us))
                        if key[0] == gpu_class else t)
                  for key, t in prof.tables.items()}
        scaled[m] = replace(prof, tables=tables)
    return ProfileSet(scaled, f"{profiles.source} (cpu latencies x{factor:.2f}: time-sliced)")


def emulated_plan(profiles: ProfileSet, cluster: ClusterSpec, models: Sequence[str],
                  slo_ms: Mapping[str, float] | None = None, policy: str = "ppipe",
                  time_limit_s: float = 60.0, weights: Mapping[str, float] | None = None,
                  options=None) -> Plan:
    """Plan ``models`` on an emulated ``cluster`` from ``profiles`` (weights by model,
    default 1); ``options``: :class:`planner.PlannerOptions` (default: the defaults with
    ``time_limit_s``)."""
    from planner import PlannerOptions, plan_cluster

    slo_ms, weights = dict(slo_ms or {}), dict(weights or {})
    workloads = [Workload(m, slo_ms.get(m) or default_slo_ms(profiles, m), weights.get(m, 1.0))
                 for m in models]
    return plan_cluster(profiles, cluster, workloads, policy,
                        options or PlannerOptions(time_limit_s=time_limit_s))


def pipeline_plan(profiles: ProfileSet, model: str, cuts: Sequence[int], gpu_class: str,
                  workers_per_stage: int = 1, batch_size: int = 1, slo_ms: float | None = None,
                  mps_share: int = 1) -> Plan:
    """A hand-made plan: one pipeline of ``model`` cut after each block in ``cuts``, every
    stage on ``workers_per_stage`` workers of ``gpu_class`` (one server).  For tests and for
    serving a fixed split without the planner."""
    from ppipe_trt.plan import ModelPlan, PipelinePlan, StagePlan

    profile = profiles[model]
    bounds = sorted(set(cuts))
    if any(not 0 <= c < profile.num_blocks - 1 for c in bounds):
        raise ConfigError(f"cuts {list(cuts)} must lie in 0..{profile.num_blocks - 2}")
    firsts = [0] + [c + 1 for c in bounds]
    lasts = bounds + [profile.num_blocks - 1]
    stages = tuple(StagePlan(f, l, gpu_class, mps_share, workers_per_stage,
                             profile.range_latency_us(gpu_class, mps_share, f, l, batch_size))
                   for f, l in zip(firsts, lasts))
    latency = sum(s.latency_us for s in stages)
    rate = min(workers_per_stage * batch_size / s.latency_us * 1e6 for s in stages)
    n = len(stages) * workers_per_stage
    cluster = ClusterSpec((GpuPool(gpu_class, n, gpus_per_server=n, max_mps=mps_share,
                                   link_bandwidth_gbps=100.0),), f"manual-{gpu_class}")
    slo = slo_ms or default_slo_ms(profiles, model, gpu_class, min_slo_ms=50.0)
    pipe = PipelinePlan(batch_size, stages, rate, latency)
    mplan = ModelPlan(model, slo, 1.0, (pipe,), rate, {gpu_class: n})
    return Plan("manual", cluster, (mplan,), rate, {gpu_class: n},
                params={"cuts": list(bounds)}, profiles_source=profiles.source)
