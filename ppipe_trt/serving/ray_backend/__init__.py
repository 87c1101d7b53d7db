"""Multi-node serving on Ray: the same plan, schedulers and front end; stage workers as Ray
actors placed by GPU class (see ``docs/ray.md``).

Ray is imported lazily: importing this package does not need it; building a runtime does.

* :func:`build_ray_runtime` (``assembly``): plan -> started actors -> :class:`RayServingRuntime`.
* :class:`RayOptions`: address, local instance settings, health checks, re-dispatch.
* :class:`RayServingRuntime` (``runtime``): health, removal, re-dispatch, :meth:`readd_worker`.
"""

from __future__ import annotations

__all__ = ["RayOptions", "HealthOptions", "build_ray_runtime", "RayServingRuntime",
           "connect_ray", "emulated_resources", "RESOURCE_PREFIX"]


def __getattr__(name: str):
    if name in ("RayOptions", "build_ray_runtime", "connect_ray", "emulated_resources",
                "RESOURCE_PREFIX"):
        from ppipe_trt.serving.ray_backend import assembly
        return getattr(assembly, name)
    if name == "HealthOptions":
        from ppipe_trt.serving.ray_backend.health import HealthOptions
        return HealthOptions
    if name == "RayServingRuntime":
        from ppipe_trt.serving.ray_backend.runtime import RayServingRuntime
        return RayServingRuntime
    raise AttributeError(name)
