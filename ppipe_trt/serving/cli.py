"""``ppipe serve``: build (or reuse) engines, plan, start the workers and the HTTP API.

Every model is served with real engines built on this machine: from ``--model-repository
DIR`` (Triton's layout; all its models, or those named with ``--model``), or a model already
in the engine store (``--model NAME``).  With no arguments: ``demo_resnet`` of the example
repository (examples/model_repository), built for this machine's GPU class (``cpu`` on a
machine without a GPU), planned on local workers and served on http://127.0.0.1:8000.

``--emulate CLUSTER.yaml`` plans for and emulates a heterogeneous cluster (e.g. 4 L4 + 12
T4): workers run the real sub-graphs and hold each batch for the profiled latency of their
class.  Only there (or ``--plan plan.json --emulate``) may a model that has profiles
(``--profiles``) but no engines run *timing-only*; it is labelled so in the startup lines,
the model metadata and /v2/status.
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
                   help="model to serve (repeatable; default: every model of "
                        f"--model-repository, the plan's, or {DEFAULT_MODEL})")
    p.add_argument("--model-repository", type=Path, default=None, metavar="DIR",
                   help="Triton-layout model repository (DIR/<name>/config.pbtxt, "
                        "DIR/<name>/<version>/model.onnx); engines are built or reused")
    p.add_argument("--plan", type=Path, help="serve this plan.json instead of planning")
    p.add_argument("--profiles", type=Path,
                   help="profile folder (PPipe artifact or engines store) for --emulate/--plan")
    p.add_argument("--emulate", type=Path, metavar="CLUSTER.yaml", nargs="?", const=True,
                   help="plan for and emulate this cluster (GPU classes from the profiles); "
                        "with --plan and no file: emulate the plan's cluster.  Models with "
                        "profiles and no engines then run timing-only (labelled)")
    p.add_argument("--engines", type=Path, default=Path("engines"),
                   help="engine store (default: engines/)")
    p.add_argument("--slots", type=int, default=None,
                   help="local worker slots when planning for this machine (default: one per "
                        "model; the CPU class is profiled as one worker owning the machine)")
    p.add_argument("--slo-ms", type=float, help="SLO of every served model (ms)")
    p.add_argument("--policy", default="reservation",
                   help="scheduling policy: reservation (default), reactive, triton")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="KServe v2 / Triton gRPC port (default 8001, as Triton; 0: no gRPC)")
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


def _repository_entries(args) -> dict:
    from ppipe_trt.repository import EXAMPLE_REPOSITORY, load_repository

    if args.model_repository is not None:
        return load_repository(args.model_repository)
    if not (args.models or args.plan or args.emulate) and EXAMPLE_REPOSITORY.is_dir():
        from ppipe_trt.repository import load_model_entry

        return {DEFAULT_MODEL: load_model_entry(EXAMPLE_REPOSITORY / DEFAULT_MODEL)}
    return {}


def prepare(args) -> tuple:
    """(plan, profiles, built models, description) for the arguments; builds engines.

    Where each model comes from, in order: the repository (built or reused for this
    machine's class), the engine store (a build for this class), a built-in demo model (the
    example repository's entry), and only with ``--emulate``: timing-only from the profiles.
    Anything else is an error naming what to do.
    """
    from ppipe_trt.cluster import load_cluster
    from ppipe_trt.engines.gpu import detect_gpu_class
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.models import BUILTIN_MODELS
    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.profiles.types import ProfileSet
    from ppipe_trt.serving.local import emulated_plan, local_plan

    model_repository = getattr(args, "model_repository", None)
    args.model_repository = model_repository
    plan = load_plan(args.plan) if args.plan else None
    if args.emulate is True and plan is None:
        raise BadInputError("--emulate without a cluster file needs --plan plan.json (its "
                            "cluster is emulated); otherwise give --emulate CLUSTER.yaml")
    entries = _repository_entries(args)
    models = list(args.models or (plan.model_names if plan else []) or entries)
    if not models:
        if args.emulate:
            raise BadInputError("--emulate needs --model NAME (a model of --profiles or of "
                                "--model-repository)")
        models = [DEFAULT_MODEL]
    if model_repository is not None:
        unknown = [m for m in models if m not in entries]
        if unknown and not args.emulate:
            raise BadInputError(f"models {unknown} are not in {model_repository} (it holds "
                                f"{sorted(entries)})")
    shared = load_profiles(args.profiles) if args.profiles else ProfileSet({}, "")
    local_class = detect_gpu_class()
    built, used_entries = {}, {}
    for m in models:
        entry = entries.get(m)
        if entry is None and m in BUILTIN_MODELS and model_repository is None:
            entry = _example_entry(m)
        if entry is not None:
            from ppipe_trt.repository.engines import build_entry

            print(f"engines: building or reusing {m} ({entry.onnx_path}) for {local_class} in "
                  f"{args.engines}", file=sys.stderr)
            built[m] = build_entry(entry, local_class, args.engines)
            used_entries[m] = entry
            continue
        stored = _stored_build(m, local_class, args.engines)
        if stored is not None:
            built[m] = stored
    missing = [m for m in models if m not in built]
    timing_only = [m for m in missing if args.emulate and m in shared]
    unserved = [m for m in missing if m not in timing_only]
    if unserved:
        hint = ("" if args.emulate else
                "; a model known only from --profiles runs timing-only with --emulate")
        raise BadInputError(
            f"models {unserved} have no engines for {local_class} in {args.engines} and are "
            f"not in a model repository; build them (ppipe engines build --model-repository "
            f"DIR, or ppipe engines build MODEL.onnx) or serve --model-repository DIR{hint}")
    profiles = shared
    if built:
        own = load_profiles(args.engines, list(built))
        profiles = own if not len(shared) else shared.merged(own)
    slo = {m: e.slo_ms for m, e in used_entries.items() if e.slo_ms}
    slo.update({m: args.slo_ms for m in models} if args.slo_ms else {})
    weights = {m: e.weight for m, e in used_entries.items()}
    if plan is not None:
        what = f"plan {args.plan}" + (" (emulated)" if args.emulate else "")
    elif args.emulate:
        cluster = load_cluster(args.emulate)
        plan = emulated_plan(profiles, cluster, models, slo, weights=weights)
        what = f"emulated cluster {cluster.label} ({args.emulate})"
    else:
        slots = args.slots or len(models)
        plan = local_plan(profiles, models, local_class, slots, slo, weights=weights)
        what = f"local {local_class} x{slots}"
    if timing_only:
        what += f"; TIMING-ONLY (no engines, profiles only): {', '.join(timing_only)}"
    return plan, profiles, built, what


def _example_entry(model: str):
    from ppipe_trt.repository import EXAMPLE_REPOSITORY, load_model_entry

    if not (EXAMPLE_REPOSITORY / model).is_dir():
        return None
    return load_model_entry(EXAMPLE_REPOSITORY / model)


def _stored_build(model: str, gpu_class: str, store):
    """The store's build of ``model`` for ``gpu_class``, or None when there is none (a stale
    or corrupt one is an error naming the rebuild command)."""
    from ppipe_trt.engines.store import model_dir, open_built_model

    if not (model_dir(store, gpu_class, model) / "CURRENT").exists():
        return None
    return open_built_model(model, gpu_class, store)


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
    if not 0 <= args.grpc_port <= 65535:
        raise BadInputError(f"--grpc-port {args.grpc_port}; expected 0 (off) or a port number")
    app = create_app(factory,
                     ApiSettings(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                                 grpc_host=args.host, grpc_port=args.grpc_port or None))
    url = f"http://{args.host}:{args.port}"
    grpc_url = f"{args.host}:{args.grpc_port}" if args.grpc_port else None
    print(describe(plan, what, url, built, grpc_url), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def describe(plan, what: str, url: str, built=None, grpc_url: str | None = None) -> str:
    """The startup lines: the plan, how each model runs (real engines or TIMING-ONLY), and
    example requests.  ``built``: models with engines here (None: not said)."""
    lines = [f"ppipe serve: {what}; plan {plan.scheduler}, normalized throughput "
             f"{plan.normalized_throughput:.1f} req/s"]
    for m in plan.models:
        if built is not None:
            b = built.get(m.model)
            lines.append(f"  {m.model}: " + (
                f"real engines ({b.backend} {b.gpu_class}, {b.num_blocks} blocks, {b.build_dir})"
                if b is not None else "TIMING-ONLY, emulated: no engines, profiled latencies "
                                      "only; answers carry no real outputs"))
        for i, p in enumerate(m.pipelines):
            stages = " -> ".join(f"blocks {s.first_block}..{s.last_block} on {s.workers}x "
                                 f"{s.gpu_class}" + (f"/MPS{s.mps_share}" if s.mps_share > 1 else "")
                                 for s in p.stages)
            lines.append(f"  {m.model} (SLO {m.slo_ms:.1f} ms) pipeline {i}: batch "
                         f"{p.batch_size}: {stages}")
    m = plan.models[0].model
    lines += [
        f"serving on {url}   (status: {url}/v2/status, metrics: {url}/metrics)"
        + (f"; gRPC (KServe v2 / Triton) on {grpc_url}" if grpc_url else ""),
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
