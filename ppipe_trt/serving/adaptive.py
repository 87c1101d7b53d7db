"""Plan changes while serving: an operator's push, and the adaptive control loop.

* :func:`parse_plan_push` / :func:`push_plan`: what ``POST /v2/plan`` (and ``ppipe replan``)
  does -- swap in a given plan, or re-plan the cluster for given weights and swap that in.
* :class:`AdaptiveController` (``ppipe serve --adapt``): a thread of its own that samples
  the runtime's arrival counters every window, estimates each model's rate
  (:class:`~ppipe_trt.adapt.RateEstimator`), asks the :class:`~ppipe_trt.adapt.ReplanPolicy`
  whether the mix drifted from the plan's weights (or a model outgrew its capacity), solves
  the MILP for the observed rates *on this thread* (never the serving one), and swaps the
  new plan in when it serves the observed rates better (:func:`~ppipe_trt.adapt.swap_gain`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from ppipe_trt.adapt import AdaptOptions, RateEstimator, ReplanPolicy, replan, swap_gain
from ppipe_trt.errors import BadInputError, PlanSwapError
from ppipe_trt.plan import Plan, plan_from_dict

if TYPE_CHECKING:
    from ppipe_trt.serving.runtime import ServingRuntime
    from ppipe_trt.serving.swap import SwapReport

log = logging.getLogger("ppipe.serving")


@dataclass(frozen=True, slots=True)
class PlanPush:
    """A plan change asked for: a whole ``plan``, or ``weights`` to re-plan for."""

    plan: Plan | None
    weights: dict[str, float] | None
    reason: str


def parse_plan_push(body: Any) -> PlanPush:
    """``body`` (parsed JSON): a plan document (as ``ppipe plan`` writes it), ``{"plan":
    {...}, "reason": "..."}``, or ``{"weights": {"model": w, ...}, "reason": "..."}``.
    Raises :class:`BadInputError` naming what is wrong."""
    if not isinstance(body, dict):
        raise BadInputError(f"a plan push is a JSON object, got {type(body).__name__}")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise BadInputError("'reason' must be a string")
    if "weights" in body:
        weights = body["weights"]
        if not isinstance(weights, dict) or not weights:
            raise BadInputError("'weights' must be a non-empty object {model: weight}")
        out = {}
        for m, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                    or w <= 0:
                raise BadInputError(f"weight of {m!r} must be a number > 0, got {w!r}")
            out[str(m)] = float(w)
        return PlanPush(None, out, reason or "operator: re-plan for weights " +
                        ", ".join(f"{m}={w:g}" for m, w in out.items()))
    doc = body.get("plan", body)
    return PlanPush(plan_from_dict(doc, where="pushed plan"), None,
                    reason or "operator: plan pushed")


def push_plan(rt: "ServingRuntime", push: PlanPush, timeout_s: float = 120.0) -> "SwapReport":
    """Carry out ``push`` on ``rt`` (blocking: the MILP for weights, the new workers' engines,
    the switch).  Call it off the serving thread."""
    plan = push.plan
    if plan is None:
        builder = rt.builder
        if builder is None:
            raise PlanSwapError("this runtime cannot re-plan (assembled without profiles)")
        unknown = set(push.weights) - set(rt.models)
        if unknown:
            raise BadInputError(f"weights name models {sorted(unknown)} that are not served; "
                                f"served: {sorted(rt.models)}")
        weights = {m: push.weights.get(m, rt.plan.model(m).weight) for m in rt.models}
        plan = replan(rt.plan, builder.profiles, weights)
    return rt.swap_plan(plan, push.reason, timeout_s)


class AdaptiveController:
    """The control loop of ``ppipe serve --adapt`` (see the module docstring).  Start it
    after the runtime; :meth:`stop` before stopping the runtime.  :meth:`status` is what
    ``/v2/status`` shows under ``adapt``."""

    def __init__(self, rt: "ServingRuntime", options: AdaptOptions | None = None):
        self.rt = rt
        self.options = options or AdaptOptions()
        self.estimator = RateEstimator(rt.models, self.options.half_life_s,
                                       self.options.confirm_windows)
        self.policy = ReplanPolicy(rt.plan, self.options, rt.now_us())
        self._generation = rt.generation.number if rt.generation else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.decisions: list[dict[str, Any]] = []   # newest last (bounded)
        self.last_error: str | None = None

    def start(self) -> "AdaptiveController":
        if self.rt.builder is None:
            raise PlanSwapError("--adapt needs a runtime that can re-plan (profiles of its "
                                "models); this one was assembled without")
        self._thread = threading.Thread(target=self._run, name="ppipe-adapt", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def _run(self) -> None:
        window = self.options.window_s
        while not self._stop.wait(window):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the loop keeps going; status says why
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("adaptive re-planning failed")

    def step(self) -> "SwapReport | None":
        """One window: sample, estimate, maybe re-plan and swap.  Returns the swap's report
        when one happened."""
        rt = self.rt
        now = rt.now_us()
        if rt.generation is not None and rt.generation.number != self._generation:
            # an operator (or an earlier step) swapped: judge drift against the new plan
            self._generation = rt.generation.number
            self.policy.plan_changed(rt.plan, now)
        counts = {m: c.requests for m, c in rt.stats.snapshot().items()}
        rates = self.estimator.update(counts, now)
        if not self.estimator.ready:
            return None
        ask = self.policy.observe(rates, now, self.estimator.recent_rps)
        if ask is None:
            return None
        t0 = time.perf_counter()
        plan = replan(rt.plan, rt.builder.profiles, ask.weights,
                      arrival_rates_rps=ask.weights)   # the weights are observed req/s
        solve_s = time.perf_counter() - t0
        gain = swap_gain(rt.plan, plan, ask.weights)
        record = {"at_s": round((now - rt.started_us) / 1e6, 3), "reason": ask.reason,
                  "observed_rps": {m: round(r, 1) for m, r in ask.observed_rps.items()},
                  "solve_s": round(solve_s, 3), "gain": round(gain, 3), "swapped": False}
        self._remember(record)
        if gain < self.options.min_gain:
            log.info("adapt: %s; the new plan gains %.1f %% (< %.1f %%): kept the plan",
                     ask.reason, 100 * gain, 100 * self.options.min_gain)
            self.policy.plan_changed(rt.plan, now)   # wait min_interval before asking again
            return None
        report = rt.swap_plan(plan, f"adapt: {ask.reason}")
        record["swapped"] = True
        record["generation"] = report.generation
        self._generation = report.generation
        self.policy.plan_changed(plan, rt.now_us())
        return report

    def _remember(self, record: dict[str, Any]) -> None:
        self.decisions.append(record)
        del self.decisions[:-20]

    def status(self) -> dict[str, Any]:
        o = self.options
        return {"enabled": True, "window_s": o.window_s, "half_life_s": o.half_life_s,
                "drift_threshold": o.drift_threshold,
                "capacity_threshold": o.capacity_threshold,
                "confirm_windows": o.confirm_windows, "min_interval_s": o.min_interval_s,
                "observed_rps": {m: round(r, 1) for m, r in self.estimator.rates_rps.items()},
                "decisions": list(self.decisions), "last_error": self.last_error}


def adapt_options_from(values: Mapping[str, Any] | None) -> AdaptOptions:
    """:class:`AdaptOptions` from ``KEY=VALUE`` pairs (``--adapt-option``)."""
    fields = AdaptOptions.__dataclass_fields__
    kw = {}
    for k, v in (values or {}).items():
        if k not in fields:
            raise BadInputError(f"unknown adapt option {k!r}; expected one of {sorted(fields)}")
        try:
            kw[k] = int(v) if k == "confirm_windows" else float(v)
        except (TypeError, ValueError):
            raise BadInputError(f"adapt option {k}={v!r} is not a number") from None
    return AdaptOptions(**kw)
