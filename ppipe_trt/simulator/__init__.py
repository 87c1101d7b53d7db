"""The cluster simulator: the real schedulers on a virtual clock (see ``engine``).

Plan swaps and workload shifts (issue #11): :mod:`.swap` (what changes hands at a switch),
:mod:`.scenarios` (rate curves), :mod:`.adaptive` (the ``--adapt`` loop, per-window series),
:mod:`.replan_compare` (goodput of static, adaptive and oracle plans)."""

from ppipe_trt.simulator.arrivals import ArrivalSpec, arrival_times_us
from ppipe_trt.simulator.engine import SimConfig, simulate
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan, synthetic_profile
from ppipe_trt.simulator.metrics import ModelMetrics, SimResult, format_table
from ppipe_trt.simulator.search import SearchResult, search_load_factor
from ppipe_trt.simulator.swap import PlanSwap, SwapCosts, SwapRecord
from ppipe_trt.simulator.scenarios import Scenario, build_scenario
from ppipe_trt.simulator.adaptive import ScenarioResult, simulate_scenario
from ppipe_trt.simulator.replan_compare import compare_on_paper_cluster, compare_policies

__all__ = ["ArrivalSpec", "arrival_times_us", "SimConfig", "simulate", "ModelSpec", "hand_plan", "synthetic_profile",
           "ModelMetrics", "SimResult", "format_table", "SearchResult", "search_load_factor",
           "PlanSwap", "SwapCosts", "SwapRecord", "Scenario", "build_scenario", "ScenarioResult",
           "simulate_scenario", "compare_on_paper_cluster", "compare_policies"]
