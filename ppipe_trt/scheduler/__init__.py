"""The data-plane scheduler: reservation-based adaptive batching (PPipe) and baselines.

``place_workers(plan)`` assigns workers to GPUs and servers; ``build_schedulers(plan,
profiles, placement, policy)`` makes one passive scheduler per model (see ``interface``).
"""

from ppipe_trt.scheduler.baselines import ReactiveScheduler, TritonScheduler
from ppipe_trt.scheduler.factory import POLICIES, build_schedulers
from ppipe_trt.scheduler.interface import (Decisions, Dispatch, Drop, DropReason, Request,
                                           Scheduler, StageReservation)
from ppipe_trt.scheduler.placement import Placement, ServerSlot, WorkerSlot, place_workers
from ppipe_trt.scheduler.reservation import ReservationScheduler
from ppipe_trt.scheduler.tables import (ClusterState, PipelineTable, StageTable,
                                        build_pipeline_tables, transfer_us)

__all__ = [
    "Decisions", "Dispatch", "Drop", "DropReason", "Request", "Scheduler", "StageReservation",
    "Placement", "ServerSlot", "WorkerSlot", "place_workers", "build_schedulers", "POLICIES",
    "ReservationScheduler", "ReactiveScheduler", "TritonScheduler", "ClusterState",
    "PipelineTable", "StageTable", "build_pipeline_tables", "transfer_us",
]
