"""Assemble a :class:`RayServingRuntime` from a plan: one Ray actor per placement slot.

The plan, the placement, the schedulers, the served models and the workers' specs
(:func:`~ppipe_trt.serving.specs.worker_specs`) are exactly those of
:func:`ppipe_trt.serving.assembly.build_runtime`; only where the workers run differs.  Each
worker is a :class:`~ppipe_trt.serving.ray_backend.actor.StageActor`, which builds its
worker from its spec as the local assembly does, placed by Ray (:func:`actor_options`) on a
node that has the worker's GPU class:

* a worker whose engines are TensorRT engines built for its own class asks for
  ``num_gpus = 1 / mps_share`` (the MPS share as a fractional GPU) and
  ``accelerator_type = <class>``;
* any other worker (ONNX Runtime on CPU, an emulated class, timing-only) asks for
  ``1 / mps_share`` of the custom resource ``gpu_class:<class>`` and no CPU reservation.
  :func:`connect_ray` declares these resources on a local Ray instance (one unit per GPU of
  the class in the placement); nodes of a real cluster declare them with
  ``ray start --resources='{"gpu_class:T4": 4}'``.

After the actors are up, the hop between two stage actors is measured (one-way actor call,
90th percentile) and given to the schedulers as their per-hop transfer overhead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ppipe_trt.errors import BackendUnavailableError, ConfigError
from ppipe_trt.plan import Plan
from ppipe_trt.profiles.types import ProfileSet
from ppipe_trt.scheduler.placement import WorkerSlot
from ppipe_trt.serving.assembly import (PlanWorkerBuilder, deadline_margin_us,
                                        plan_schedulers)
from ppipe_trt.serving.clock import monotonic_us
from ppipe_trt.serving.options import RuntimeOptions
from ppipe_trt.serving.ray_backend.actor import stage_actor_class
from ppipe_trt.serving.ray_backend.health import HealthOptions
from ppipe_trt.serving.ray_backend.runtime import RayServingRuntime, RayWorkerProxy
from ppipe_trt.serving.ray_backend.transport import RayTransport
from ppipe_trt.serving.served import served_models
from ppipe_trt.serving.specs import WorkerSpec, worker_specs

log = logging.getLogger("ppipe.serving.ray")

RESOURCE_PREFIX = "gpu_class:"


@dataclass(frozen=True, slots=True)
class RayOptions:
    """How to reach Ray and how to run the workers on it.

    ``address``: ``None`` starts (or reuses) a local instance; ``"auto"``, ``"ray://host:port"``
    or ``"host:port"`` join a running cluster.  ``num_cpus``/``temp_dir``: for a local
    instance (``temp_dir`` default: a fresh folder under the system's temporary folder).
    ``health``: ping period and timeout.  ``max_redispatch``: re-dispatches allowed per
    request after worker failures.  ``hop_samples``: actor calls timed to measure the hop.
    """

    address: str | None = None
    num_cpus: int | None = None
    temp_dir: str | None = None
    health: HealthOptions = field(default_factory=HealthOptions)
    max_redispatch: int = 1
    hop_samples: int = 60
    actor_max_concurrency: int = 32


#: A local instance declares this many times each class's GPUs as custom resources: during a
#: plan swap the added workers' actors start while the retiring ones still run (an emulated
#: GPU share is then held twice until the old plan drains; the schedulers never reserve a
#: share for both plans at once, see ppipe_trt.scheduler.carry_over).
SWAP_HEADROOM = 2.0
#: Actors a plan swap starts at once (see RayWorkerBuilder.build).
SWAP_PARALLEL_STARTS = 1


def emulated_resources(plan: Plan) -> dict[str, float]:
    """``{"gpu_class:<class>": units}`` for a local instance serving the plan's cluster:
    ``SWAP_HEADROOM`` units per GPU of the class."""
    from ppipe_trt.scheduler import place_workers

    return {RESOURCE_PREFIX + c: SWAP_HEADROOM * float(n)
            for c, n in place_workers(plan).gpus_per_class.items() if n > 0}


def connect_ray(options: RayOptions, resources: Mapping[str, float]) -> tuple[bool, str | None]:
    """Initialise Ray unless it already is.  Returns (whether this call started it -- then the
    runtime shuts it down when it stops --, the temporary folder this call created for a
    local instance, removed at that time too).  A local instance declares ``resources``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError("Ray is not installed; pip install 'ray[serve]' to use "
                                      "--cluster ray") from exc
    if ray.is_initialized():
        return False, None
    created = None
    if options.address is None:
        temp_dir = options.temp_dir or tempfile.mkdtemp(prefix="ppipe-ray-")
        created = None if options.temp_dir else temp_dir
        ray.init(num_cpus=options.num_cpus or os.cpu_count(), resources=dict(resources),
                 include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=options.address, log_to_driver=False, configure_logging=False)
    return True, created


def _shortfall(needed: Mapping[str, float], have: Mapping[str, float]) -> dict[str, float]:
    """The resources of ``needed`` that ``have`` does not cover."""
    return {k: v for k, v in needed.items() if have.get(k, 0.0) + 1e-6 < v}


def _check_resources(needed: Mapping[str, float]) -> None:
    import ray

    have = ray.cluster_resources()
    short = _shortfall(needed, have)
    if short:
        raise ConfigError(
            f"the Ray cluster lacks resources {short} (it has "
            f"{ {k: v for k, v in have.items() if k.startswith(RESOURCE_PREFIX)} }); declare "
            "them on the nodes of each GPU class, e.g. ray start --resources "
            "'{\"gpu_class:T4\": 4}'")


def actor_options(spec: WorkerSpec) -> dict[str, Any]:
    """Where Ray may place the actor of ``spec`` (see the module docstring): ``1 / mps_share``
    of a GPU of the worker's class for TensorRT on its own class, else that share of the
    custom resource ``gpu_class:<class>``; never a CPU reservation."""
    slot = spec.slot
    share = 1.0 / slot.mps_share
    if spec.executor is not None and spec.executor.backend == "tensorrt":
        return {"num_gpus": share, "accelerator_type": slot.gpu_class, "num_cpus": 0}
    return {"resources": {RESOURCE_PREFIX + slot.gpu_class: share}, "num_cpus": 0}


class ActorLauncher:
    """Starts the actor of a placement slot (at start-up, and again to re-add a worker).

    The workers' specs are :func:`~ppipe_trt.serving.specs.worker_specs`, exactly the local
    assembly's; an ONNX Runtime worker's spec travels with its sub-graph's bytes (the actor's
    node need not reach the engine store).
    """

    def __init__(self, plan: Plan, profiles: ProfileSet, built_models: Mapping[str, Any],
                 options: RuntimeOptions, ray_options: RayOptions):
        from ppipe_trt.scheduler import place_workers

        self.plan = plan
        self.placement = place_workers(plan)
        self.specs = {s.worker_id: s for s in worker_specs(plan, profiles, built_models,
                                                           options, self.placement)}
        self._built = dict(built_models)
        self._actor_cls = stage_actor_class(ray_options.actor_max_concurrency)
        self._onnx: dict[tuple[str, int, int], bytes] = {}

    def spec(self, worker_id: int) -> WorkerSpec:
        """The spec sent to ``worker_id``'s actor."""
        spec = self.specs[worker_id]
        e = spec.executor
        if e is None or e.backend != "onnxruntime":
            return spec
        key = (spec.slot.model, spec.slot.first_block, spec.slot.last_block)
        if key not in self._onnx:
            self._onnx[key] = self._built[key[0]].stage_onnx(*key[1:]).read_bytes()
        return replace(spec, executor=replace(e, stage_onnx=self._onnx[key]))

    def needed_resources(self) -> dict[str, float]:
        return needed_resources(self.specs.values())

    def add_specs(self, specs) -> None:
        """The specs of a plan swap's added workers (then :meth:`create` and relaunch know
        them)."""
        self.specs.update({s.worker_id: s for s in specs})

    def create(self, worker_id: int) -> tuple[Any, WorkerSlot]:
        """Ask Ray for ``worker_id``'s actor (returns at once: its handle and slot)."""
        spec = self.spec(worker_id)
        return self._actor_cls.options(
            name=None, max_restarts=0, **actor_options(spec)).remote(spec), spec.slot

    def finish(self, handle, info: WorkerSlot, timeout_s: float = 120.0) -> RayWorkerProxy:
        """Wait until a created actor is up; align its clock with this process's."""
        import ray

        desc = ray.get(handle.describe.remote(), timeout=timeout_s)
        here = ray.get_runtime_context().get_node_id()
        offset = 0.0
        if desc["node_id"] != here:  # another node: its monotonic clock has another origin
            best = None
            for _ in range(10):
                t0 = monotonic_us()
                theirs = ray.get(handle.local_clock_us.remote(), timeout=timeout_s)
                t1 = monotonic_us()
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, theirs - (t0 + t1) / 2.0)
            offset = best[1]
        ray.get(handle.set_clock_offset.remote(offset), timeout=timeout_s)
        return RayWorkerProxy(info, handle, desc["mode"], desc["node_id"], desc["pid"],
                              monotonic_us())

    def launch(self, worker_id: int) -> RayWorkerProxy:
        handle, info = self.create(worker_id)
        return self.finish(handle, info)


def needed_resources(specs) -> dict[str, float]:
    """The custom resources the actors of ``specs`` ask for."""
    need: dict[str, float] = {}
    for spec in specs:
        for k, v in actor_options(spec).get("resources", {}).items():
            need[k] = need.get(k, 0.0) + v
    return need


def set_peers(proxies: Mapping[int, RayWorkerProxy]) -> None:
    """Give every live actor the handles of all live workers (it forwards to the next stage's
    reserved worker by id)."""
    import ray

    handles = {wid: p.handle for wid, p in proxies.items()}
    ray.get([p.handle.set_peers.remote(handles) for p in proxies.values()], timeout=60)


def measure_ray_hop_us(proxies: Mapping[int, RayWorkerProxy], samples: int = 40,
                       quantile: float = 0.9, tail: float = 0.99) -> tuple[float, float]:
    """(actor-to-actor one-way call: its ``quantile``; API-process-to-actor one-way call: its
    ``tail`` quantile), over ``samples`` calls each, microseconds.  The first is the hop
    between stages (the scheduler's transfer estimate); the second is paid twice per request
    (dispatch, answer) outside the scheduler's view, so the deadline margin takes its tail."""
    import ray

    by_stage = sorted(proxies.values(), key=lambda p: (p.info.model, p.info.pipeline,
                                                       p.info.stage))
    first = by_stage[0]
    nxt = next((p for p in by_stage if p.info.model == first.info.model
                and p.info.pipeline == first.info.pipeline and p.info.stage == 1), None)
    target = nxt or first

    def q(values: list[float], quantile: float) -> float:
        values = sorted(values)
        return float(values[min(len(values) - 1, int(quantile * len(values)))])

    def measure() -> tuple[list[float], list[float]]:
        hops = ray.get(first.handle.probe_hop_us.remote(target.worker_id, samples), timeout=60)
        direct = [ray.get(first.handle.echo_delay_us.remote(monotonic_us()), timeout=60)
                  for _ in range(samples)]
        return hops, direct

    # The first calls after the actors start pay for Ray's lazy set-up (connections, worker
    # leases) and for the actors still loading: a round is made and thrown away first.
    measure()
    hops, direct = measure()
    return q(hops, quantile), q(direct, tail)


def build_ray_runtime(plan: Plan, profiles: ProfileSet,
                      built_models: Mapping[str, Any] | None = None,
                      options: RuntimeOptions | None = None,
                      ray_options: RayOptions | None = None,
                      info: Mapping[str, Any] | None = None,
                      connection: tuple[bool, str | None] | None = None) -> RayServingRuntime:
    """A runtime (not started) serving ``plan`` with one Ray actor per worker slot.

    Connects to (or starts) Ray, starts and warms every actor, measures the hop, then builds
    the schedulers with it.  ``options.hop_overhead_us``, when given, overrides the measured
    hop.  Blocks until every actor is up (seconds: each loads its sub-graph).
    ``connection``: what :func:`connect_ray` returned when the caller connected already (the
    runtime then owns that instance as if it had started it).
    """
    options = options or RuntimeOptions()
    ray_options = ray_options or RayOptions()
    built_models = dict(built_models or {})
    models = served_models(plan, profiles, built_models, mode_suffix=", ray actors")
    launcher = ActorLauncher(plan, profiles, built_models, options, ray_options)
    owns, own_temp = connection or connect_ray(ray_options, emulated_resources(plan))
    try:
        _check_resources(launcher.needed_resources())
        created = [launcher.create(w.worker_id) for w in launcher.placement.workers]
        proxies = {info.worker_id: launcher.finish(h, info) for h, info in created}
        set_peers(proxies)
        hop_us, direct_us = measure_ray_hop_us(proxies, ray_options.hop_samples)
    except BaseException:
        if owns:
            import ray

            ray.shutdown()
            if own_temp:
                shutil.rmtree(own_temp, ignore_errors=True)
        raise
    hop = options.hop_overhead_us if options.hop_overhead_us is not None else hop_us
    schedulers = plan_schedulers(plan, profiles, launcher.placement, options, hop)
    # The scheduler does not see the dispatch to stage 0 and the answer's way back.
    margin = deadline_margin_us(options, models, unseen_us=2.0 * direct_us)
    tight = min(models.values(), key=lambda m: m.slo_us)
    if margin >= 0.5 * tight.slo_us:
        log.warning("Ray calls are slow on this cluster (measured: %.1f ms a hop between "
                    "workers, %.1f ms a dispatch): the scheduler keeps %.1f ms of %s's "
                    "%.1f ms SLO for them, so it will drop much of that model's traffic; "
                    "is the host overloaded?", hop_us / 1000.0, direct_us / 1000.0,
                    margin / 1000.0, tight.name, tight.slo_us / 1000.0)
    transport = RayTransport(monotonic_us)
    for wid, p in proxies.items():
        transport.set_handle(wid, p.handle)
    runtime = RayServingRuntime(
        plan, models, schedulers, transport, hop_overhead_us=hop, deadline_margin_us=margin,
        options=options,
        info={"policy": options.policy, "transport": "ray actors",
              "cluster": "ray" + (f"://{ray_options.address}" if ray_options.address else
                                  " (local instance)"),
              "ray_hop_us": hop_us, "ray_dispatch_us": direct_us,
              "emulate_links": options.emulate_links, **(info or {})},
        relaunch=launcher.launch, set_peers=set_peers, health=ray_options.health,
        max_redispatch=ray_options.max_redispatch, owns_ray=owns, ray_temp_dir=own_temp,
        placement=launcher.placement)
    for wid in sorted(proxies):
        runtime.add_worker(proxies[wid])
    runtime.builder = RayWorkerBuilder(launcher, profiles, built_models, options, hop,
                                       transport, runtime)
    return runtime


class RayWorkerBuilder(PlanWorkerBuilder):
    """Builds a plan swap's added workers as Ray actors (see
    :mod:`ppipe_trt.serving.swap`): same specs as the local assembly, actors started and
    warmed up before the switch, every live actor told the new peers."""

    def __init__(self, launcher: ActorLauncher, profiles: ProfileSet,
                 built_models: Mapping[str, Any], options: RuntimeOptions, hop_us: float,
                 transport: RayTransport, runtime: RayServingRuntime):
        super().__init__(profiles, built_models, options, hop_us, transport, runtime)
        self._launcher = launcher

    def specs(self, plan: Plan, placement, worker_ids) -> tuple:
        specs = super().specs(plan, placement, worker_ids)
        self._launcher.add_specs(specs)
        return specs

    def build(self, specs) -> list:
        import ray

        need = needed_resources(specs)
        free = ray.available_resources()
        if _shortfall(need, free):
            from ppipe_trt.errors import PlanSwapError

            raise PlanSwapError(
                f"the new plan's added workers need {need} but the Ray cluster has only "
                f"{ {k: free.get(k, 0.0) for k in need} } free while the old plan runs; "
                "declare more of those resources, or swap in two smaller steps")
        # One actor process starting at a time: the old plan is serving meanwhile, and a
        # starting process (interpreter, imports, engine) takes a core while it loads.
        proxies = []
        for start in range(0, len(specs), SWAP_PARALLEL_STARTS):
            created = [self._launcher.create(s.worker_id)
                       for s in specs[start:start + SWAP_PARALLEL_STARTS]]
            proxies += [self._launcher.finish(h, info) for h, info in created]
        for p in proxies:
            self._transport.set_handle(p.worker_id, p.handle)
        live = {w.worker_id: w for w in self._runtime.workers if w.alive}
        live.update({p.worker_id: p for p in proxies})
        set_peers(live)
        return proxies
