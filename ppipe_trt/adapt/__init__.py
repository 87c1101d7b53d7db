"""Following workload shifts: arrival-rate estimates, when to re-plan, how to re-plan.

The same pieces drive the live server (``ppipe serve --adapt``, :mod:`ppipe_trt.serving.swap`)
and the simulator (``ppipe simulate --adapt``): both feed a :class:`RateEstimator` cumulative
arrival counts on their own clock, ask a :class:`ReplanPolicy` whether the observed mix has
drifted from the plan's weights (or a model outgrew its planned capacity), and re-plan with
:func:`replan` (the MILP, with the observed rates as weights) off the serving path.
"""

from ppipe_trt.adapt.policy import AdaptOptions, ReplanPolicy, ReplanRequest, mix_drift
from ppipe_trt.adapt.rates import RateEstimator
from ppipe_trt.adapt.replanner import replan, swap_gain

__all__ = ["AdaptOptions", "RateEstimator", "ReplanPolicy", "ReplanRequest", "mix_drift",
           "replan", "swap_gain"]
