"""``ppipe serve``: build (or reuse) engines, plan, start the workers and the HTTP API.

With no arguments: the built-in ``demo_resnet`` is built for this machine's GPU class (``cpu``
on a machine without a GPU), planned on ``--slots`` local workers and served on
http://127.0.0.1:8000.  ``--emulate CLUSTER.yaml`` serves an emulated heterogeneous cluster
(e.g. 4 L4 + 12 T4) for models from ``--profiles``: models with no engines here run
timing-only.  ``--plan`` serves a saved plan as is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DEFAULT_MODEL = "demo_resnet"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve models over HTTP (KServe v2 / Triton REST, frames)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help=f"model to serve (repeatable; default {DEFAULT_MODEL}, or the plan's)")
    p.add_argument("--plan", type=Path, help="serve this plan.json instead of planning")
    p.add_argument("--profiles", type=Path,
                   help="profile folder (PPipe artifact or engines store) for --emulate/--plan")
    p.add_argument("--emulate", type=Path, metavar="CLUSTER.yaml",
                   help="plan for and emulate this cluster (GPU classes from the profiles)")
    p.add_argument("--engines", type=Path, default=Path("engines"),
                   help="engine store (default: engines/)")
    p.add_argument("--slots", type=int, default=1,
                   help="local worker slots when planning for this machine (default 1: the "
                        "CPU class is profiled as one worker owning the whole machine)")
    p.add_argument("--slo-ms", type=float, help="SLO of every served model (ms)")
    p.add_argument("--policy", default="reservation",
                   help="scheduling policy: reservation (default), reactive, triton")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body accepted (MiB; larger ones get 413)")
    p.add_argument("--deadline-margin", type=float, default=None, metavar="FRACTION",
                   help="schedule batches to finish this fraction of the SLO before the "
                        "deadline when real compute runs (default 0.3; lower it on a host "
                        "dedicated to serving, raise it where compute times jitter more)")
    p.add_argument("--save-plan", type=Path, help="also write the plan in force here")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--cluster", default="local", metavar="local|ray[://ADDRESS]",
                   help="where the stage workers run: local threads (default), 'ray' (actors "
                        "on a local Ray instance, emulated GPU classes as custom resources), "
                        "'ray://HOST:PORT' or 'ray:auto' (a running Ray cluster); see docs/ray.md")
    p.set_defaults(handler=serve_command)


def prepare(args) -> tuple:
    """(plan, profiles, built models, description) for the arguments; builds engines."""
    from ppipe_trt.cluster import load_cluster
    from ppipe_trt.engines.gpu import detect_gpu_class
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.models import BUILTIN_MODELS
    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.profiles.types import ProfileSet
    from ppipe_trt.serving.local import emulated_plan, local_plan

    plan = load_plan(args.plan) if args.plan else None
    models = list(args.models or (plan.model_names if plan else []))
    if not models:
        if args.emulate:
            raise BadInputError("--emulate needs --model NAME (a model of --profiles)")
        models = [DEFAULT_MODEL]
    shared = load_profiles(args.profiles) if args.profiles else ProfileSet({}, "")
    local_class = detect_gpu_class()
    built = {}
    for m in models:
        if m in BUILTIN_MODELS:
            from ppipe_trt.engines import build_model_engines

            print(f"engines: building or reusing {m} for {local_class} in {args.engines}",
                  file=sys.stderr)
            built[m] = build_model_engines(m, local_class, store_root=args.engines)
    missing = [m for m in models if m not in built and m not in shared]
    if missing:
        raise BadInputError(f"models {missing} are neither built-in ({', '.join(BUILTIN_MODELS)})"
                            " nor in --profiles" + ("" if args.profiles else " (none given)"))
    profiles = shared
    if built:
        own = load_profiles(args.engines, list(built))
        profiles = own if not len(shared) else shared.merged(own)
    slo = {m: args.slo_ms for m in models} if args.slo_ms else None
    if plan is not None:
        what = f"plan {args.plan}"
    elif args.emulate:
        cluster = load_cluster(args.emulate)
        plan = emulated_plan(profiles, cluster, models, slo)
        what = f"emulated cluster {cluster.label} ({args.emulate})"
    else:
        plan = local_plan(profiles, models, local_class, args.slots, slo)
        what = f"local {local_class} x{args.slots}"
    return plan, profiles, built, what


def serve_command(args) -> int:
    import uvicorn

    from api.app import ApiSettings, create_app
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.plan import save_plan
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime

    if args.deadline_margin is not None and not 0.0 <= args.deadline_margin < 1.0:
        raise BadInputError(f"--deadline-margin {args.deadline_margin}; expected a fraction "
                            "of the SLO in [0, 1)")
    sys.setswitchinterval(0.0005)  # worker threads wake on time; keep GIL hand-offs short
    plan, profiles, built, what = prepare(args)
    if args.save_plan:
        save_plan(plan, args.save_plan)
    options = RuntimeOptions(policy=args.policy)
    if args.deadline_margin is not None:
        options = dataclasses.replace(options, deadline_margin_fraction=args.deadline_margin)
    factory = lambda: build_runtime(plan, profiles, built, options, info={"source": what})  # noqa: E731
    if getattr(args, "cluster", "local") != "local":  # ray backend (lazy: Ray imported there)
        from ppipe_trt.serving.ray_backend.cli import ray_runtime_factory

        factory = ray_runtime_factory(args.cluster, plan, profiles, built, options,
                                      {"source": what})
    app = create_app(factory,
                     ApiSettings(max_body_bytes=int(args.max_body_mb * 1024 * 1024)))
    url = f"http://{args.host}:{args.port}"
    print(describe(plan, what, url), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def describe(plan, what: str, url: str) -> str:
    lines = [f"ppipe serve: {what}; plan {plan.scheduler}, normalized throughput "
             f"{plan.normalized_throughput:.1f} req/s"]
    for m in plan.models:
        for i, p in enumerate(m.pipelines):
            stages = " -> ".join(f"blocks {s.first_block}..{s.last_block} on {s.workers}x "
                                 f"{s.gpu_class}" + (f"/MPS{s.mps_share}" if s.mps_share > 1 else "")
                                 for s in p.stages)
            lines.append(f"  {m.model} (SLO {m.slo_ms:.1f} ms) pipeline {i}: batch "
                         f"{p.batch_size}: {stages}")
    m = plan.models[0].model
    lines += [
        f"serving on {url}   (status: {url}/v2/status, metrics: {url}/metrics)",
        "example requests:",
        f"  curl -s {url}/v2/models/{m}",
        f"  curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg "
        f"{url}/v2/models/{m}/frames",
        f"  python -c \"import tritonclient.http as h, numpy as np; c = h.InferenceServerClient("
        f"'{url.split('://')[1]}'); md = c.get_model_metadata('{m}'); i = md['inputs'][0]; "
        f"x = h.InferInput(i['name'], [1] + i['shape'][1:], i['datatype']); "
        f"x.set_data_from_numpy(np.zeros([1] + i['shape'][1:], np.float32)); "
        f"print(c.infer('{m}', [x]).get_response())\"",
    ]
    return "\n".join(lines)
