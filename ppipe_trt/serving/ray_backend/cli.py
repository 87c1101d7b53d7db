"""``ppipe serve --cluster ray[://ADDRESS]``: how the serve command picks the Ray runtime."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ppipe_trt.errors import BadInputError


def parse_cluster(value: str):
    """``"local"`` -> ``None``; ``"ray"`` -> a local Ray instance; ``"ray://HOST:PORT"`` (Ray
    client), ``"ray:auto"`` or ``"ray:HOST:PORT"`` (join a running cluster as a driver) ->
    :class:`~ppipe_trt.serving.ray_backend.assembly.RayOptions` with that address."""
    from ppipe_trt.serving.ray_backend.assembly import RayOptions

    if value == "local":
        return None
    if value == "ray":
        return RayOptions()
    if value.startswith("ray://"):
        return RayOptions(address=value)
    if value.startswith("ray:") and len(value) > 4:
        return RayOptions(address=value[4:])
    raise BadInputError(f"--cluster {value!r}: expected 'local', 'ray', 'ray://HOST:PORT' "
                        "(Ray client) or 'ray:auto' / 'ray:HOST:PORT' (running cluster)")


def ray_runtime_factory(cluster: str, plan, profiles, built: Mapping[str, Any], options,
                        info: Mapping[str, Any]) -> Callable[[], Any]:
    """A factory for ``create_app``: builds the Ray runtime when the app starts.

    Ray itself is initialised here, in the calling (main) thread, not in the app's start-up
    worker thread: a driver initialised from a worker thread showed answer stalls of ~100 ms
    under HTTP load."""
    from ppipe_trt.serving.ray_backend.assembly import (build_ray_runtime, connect_ray,
                                                        emulated_resources)

    ray_options = parse_cluster(cluster)
    connection = connect_ray(ray_options, emulated_resources(plan))

    def factory():
        return build_ray_runtime(plan, profiles, built, options, ray_options, info, connection)

    return factory
