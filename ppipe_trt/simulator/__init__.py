"""The cluster simulator: the real schedulers on a virtual clock (see ``engine``)."""

from ppipe_trt.simulator.arrivals import ArrivalSpec, arrival_times_us
from ppipe_trt.simulator.engine import SimConfig, simulate
from ppipe_trt.simulator.handplan import ModelSpec, hand_plan, synthetic_profile
from ppipe_trt.simulator.metrics import ModelMetrics, SimResult, format_table
from ppipe_trt.simulator.search import SearchResult, search_load_factor

__all__ = ["ArrivalSpec", "arrival_times_us", "SimConfig", "simulate", "ModelSpec", "hand_plan", "synthetic_profile",
           "ModelMetrics", "SimResult", "format_table", "SearchResult", "search_load_factor"]
