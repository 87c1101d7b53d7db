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
import os
import sys
from pathlib import Path
from typing import Collection

from ppipe_trt.server.prepare import DEFAULT_MODEL, prepare

#: Real engines: a partial batch is held for a fuller one only when the planned batch serves
#: more than this fraction more (by the measured latencies).
WORK_CONSERVING_MIN_GAIN = 0.1

#: The environment variable holding the bearer token (``--auth-token`` wins).
AUTH_TOKEN_ENV = "PPIPE_AUTH_TOKEN"


def auth_token(args) -> str | None:
    """The bearer token: ``--auth-token``, else ``$PPIPE_AUTH_TOKEN`` (unset or empty: none);
    ``BadInputError`` for one that cannot be a bearer token."""
    from api.auth import check_token

    token = getattr(args, "auth_token", None)
    if token is None:
        token = os.environ.get(AUTH_TOKEN_ENV) or None
    return None if token is None else check_token(token)


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
    p.add_argument("--strict-slo", action="store_true",
                   help="refuse to start when a model's SLO cannot be met here (default: "
                        "serve it at the smallest SLO that can, and say so)")
    p.add_argument("--policy", default="reservation",
                   help="scheduling policy: reservation (default), reactive, triton")
    p.add_argument("--no-work-conserving", dest="work_conserving", action="store_false",
                   help="reservation policy: keep PPipe's wait for a fuller batch even when "
                        "the pipeline is idle and traffic is light (default: a lone request "
                        "on an idle pipeline at low load is dispatched at once)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="plan every batch with the offline profiles (PPipe's static tables) "
                        "instead of what the workers are measured to take (default: "
                        "measured, see docs/serving.md)")
    p.add_argument("--replan-on-calibration", action="store_true",
                   help="when a model's capacity with the measured latencies falls 20 %% "
                        "short of the planned one, re-plan from them and swap the plan in "
                        "(off by default, see docs/serving.md)")
    p.add_argument("--no-admission-control", dest="admission_control", action="store_false",
                   help="admit every request the schedulers accept, even while the front end "
                        "falls behind (default: refuse at the door then, see docs/serving.md)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="KServe v2 / Triton gRPC port (default 8001, as Triton; 0: no gRPC)")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="require 'Authorization: Bearer TOKEN' (gRPC: metadata "
                        "'authorization') on every route but the health probes "
                        "(/v2/health/live, /v2/health/ready, ServerLive, ServerReady); "
                        f"default: ${AUTH_TOKEN_ENV} if set, else no access control. Prefer "
                        "the environment variable: a command line is visible to other users")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body accepted (MiB; larger ones get 413)")
    p.add_argument("--frontends", type=int, default=1, metavar="N",
                   help="processes answering HTTP and gRPC on the same ports (default 1; the "
                        "server's process owns the runtime, N-1 more hand it inferences over "
                        "a Unix socket; add one when the server's process nears a full core, "
                        "see docs/serving.md)")
    p.add_argument("--deadline-margin", type=float, default=None, metavar="FRACTION",
                   help="schedule batches to finish this fraction of the SLO before the "
                        "deadline when real compute runs (default 0.3; lower it on a host "
                        "dedicated to serving, raise it where compute times jitter more)")
    p.add_argument("--deadline-margin-ms", type=float, default=None, metavar="MS",
                   help="schedule every batch to finish this long before the deadline, on "
                        "top of the fraction above (default 1 ms: the hand-offs the scheduler "
                        "does not see); raise it when clients measure their latency through a "
                        "loaded network or host")
    p.add_argument("--save-plan", type=Path, help="also write the plan in force here")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--cluster", default="local", metavar="local|ray[://ADDRESS]",
                   help="where the stage workers run: local threads (default), 'ray' (actors "
                        "on a local Ray instance, emulated GPU classes as custom resources), "
                        "'ray://HOST:PORT' or 'ray:auto' (a running Ray cluster); see docs/ray.md")
    p.add_argument("--adapt", action="store_true",
                   help="follow workload shifts: estimate each model's arrival rate, re-plan "
                        "(MILP, off the serving thread) when the mix drifts from the plan's "
                        "weights or a model outgrows its capacity, and swap the plan in with "
                        "no request lost (off by default; see docs/serving.md)")
    p.add_argument("--adapt-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a knob of --adapt (window_s, half_life_s, drift_threshold, "
                        "capacity_threshold, confirm_windows, min_interval_s, min_gain, "
                        "min_rate_rps); repeatable")
    p.set_defaults(handler=serve_command)


def serve_command(args) -> int:
    import uvicorn

    from api.app import ApiSettings, create_app
    from ppipe_trt.errors import BadInputError
    from ppipe_trt.plan import save_plan
    from ppipe_trt.scheduler.native import implementation
    from ppipe_trt.serving.assembly import RuntimeOptions, build_runtime
    from ppipe_trt.serving.served import served_models

    if args.deadline_margin is not None and not 0.0 <= args.deadline_margin < 1.0:
        raise BadInputError(f"--deadline-margin {args.deadline_margin}; expected a fraction "
                            "of the SLO in [0, 1)")
    token = auth_token(args)  # before the engines are built: a bad token fails at once
    adapt = None
    if getattr(args, "adapt", False) or getattr(args, "adapt_option", None):
        from ppipe_trt.serving.adaptive import adapt_options_from

        pairs = {}
        for item in args.adapt_option or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise BadInputError(f"--adapt-option {item!r}; expected KEY=VALUE")
            pairs[key.strip()] = value.strip()
        adapt = adapt_options_from(pairs)
    sys.setswitchinterval(0.0005)  # worker threads wake on time; keep GIL hand-offs short
    plan, profiles, built, what = prepare(args)
    if args.save_plan:
        save_plan(plan, args.save_plan)
    options = RuntimeOptions(policy=args.policy, calibrate=getattr(args, "calibrate", True))
    if not getattr(args, "admission_control", True):
        options = dataclasses.replace(options, admission=None)
    if getattr(args, "replan_on_calibration", False):
        from ppipe_trt.serving.recalibrate import ReplanOptions

        options = dataclasses.replace(options, replan_on_calibration=ReplanOptions())
    if args.policy == "reservation":
        kwargs = {"work_conserving": getattr(args, "work_conserving", True)}
        if kwargs["work_conserving"] and options.calibrate and not args.emulate:
            # real engines: hold a request for a fuller batch only where batching serves
            # more (see WorkConservingRule); an emulated cluster keeps PPipe's rule, as the
            # simulator does
            kwargs["work_conserving_min_gain"] = WORK_CONSERVING_MIN_GAIN
        options = dataclasses.replace(options, scheduler_kwargs=kwargs)
    if args.deadline_margin is not None:
        options = dataclasses.replace(options, deadline_margin_fraction=args.deadline_margin)
    margin_ms = getattr(args, "deadline_margin_ms", None)
    if margin_ms is not None:
        if not 0.0 <= margin_ms < 1e6:
            raise BadInputError(f"--deadline-margin-ms {margin_ms}; expected >= 0")
        options = dataclasses.replace(options, deadline_margin_us=1e3 * margin_ms)
    factory = lambda: build_runtime(plan, profiles, built, options, info={"source": what})  # noqa: E731
    if getattr(args, "cluster", "local") != "local":  # ray backend (lazy: Ray imported there)
        from ppipe_trt.serving.ray_backend.cli import ray_runtime_factory

        factory = ray_runtime_factory(args.cluster, plan, profiles, built, options,
                                      {"source": what})
    if not 0 <= args.grpc_port <= 65535:
        raise BadInputError(f"--grpc-port {args.grpc_port}; expected 0 (off) or a port number")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ppipe serve: listening on {args.host} with no access control; anyone who "
              f"reaches it can infer and read the status (set {AUTH_TOKEN_ENV})",
              file=sys.stderr)
    frontends = getattr(args, "frontends", 1)
    if frontends < 1:
        raise BadInputError(f"--frontends {frontends}; expected 1 or more processes")
    link = None
    if frontends > 1:
        from ppipe_trt.server.frontends import link_path

        link = link_path()
    app = create_app(factory,
                     ApiSettings(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                                 grpc_host=args.host, grpc_port=args.grpc_port or None,
                                 link_socket=link, reuse_port=link is not None,
                                 auth_token=token, adapt=adapt))
    url = f"http://{args.host}:{args.port}"
    grpc_url = f"{args.host}:{args.grpc_port}" if args.grpc_port else None
    served = served_models(plan, profiles, built)
    frames = [n for n, s in served.items() if s.image is not None]
    timing_only = any(s.timing_only for s in served.values())
    print(describe(plan, what, url, built, grpc_url, frames,
                   scheduler=implementation(options.policy, timing_only)), file=sys.stderr)
    from api.http_protocol import http_protocol_for

    http = http_protocol_for(app)  # the infer routes answered in uvicorn's protocol
    if link is None:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, http=http)
        return 0
    from ppipe_trt.server.frontends import shared_socket, start_frontends

    sock = shared_socket(args.host, args.port)
    start_frontends(frontends - 1, link, args.host, args.port, args.grpc_port,
                    args.max_body_mb, args.log_level, token)
    print(f"front ends: this process and {frontends - 1} more on the same ports "
          f"(runtime link {link})", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level,
                                  http=http)).run(sockets=[sock])
    return 0


def describe(plan, what: str, url: str, built=None, grpc_url: str | None = None,
             frames: Collection[str] = (), scheduler: str | None = None) -> str:
    """The startup lines: the plan, how each model runs (real engines or TIMING-ONLY), and
    example requests.  ``built``: models with engines here (None: not said); ``frames``: the
    models with frames preprocessing (an image input in their configuration): the JPEG
    example names one of them, and is left out when there is none (it would only get 400)."""
    lines = [f"ppipe serve: {what}; plan {plan.scheduler}, normalized throughput "
             f"{plan.normalized_throughput:.1f} req/s"]
    if scheduler:
        lines.append(f"  scheduler: {scheduler}")
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
            raised = (plan.params or {}).get("slo_raised", {}).get(m.model)
            lines.append(f"  {m.model} (SLO {m.slo_ms:.1f} ms" + (
                f", RAISED from {raised['asked_slo_ms']:g} ms" if raised else "")
                + f") pipeline {i}: batch {p.batch_size}: {stages}")
    m = plan.models[0].model
    lines += [
        f"serving on {url}   (status: {url}/v2/status, metrics: {url}/metrics)"
        + (f"; gRPC (KServe v2 / Triton) on {grpc_url}" if grpc_url else ""),
        "example requests:",
        f"  curl -s {url}/v2/models/{m}",
    ]
    framed = [x.model for x in plan.models if x.model in frames]
    if framed:
        lines.append(f"  curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @photo.jpg "
                     f"{url}/v2/models/{framed[0]}/frames")
    # zeros of batch 1 for every input, of its datatype (a dynamic dim other than the batch
    # becomes 1)
    lines.append(
        f"  python -c \"import tritonclient.http as h, numpy as np; from tritonclient.utils "
        f"import triton_to_np_dtype as dt; c = h.InferenceServerClient("
        f"'{url.split('://')[1]}'); md = c.get_model_metadata('{m}'); "
        f"xs = [h.InferInput(i['name'], [1] + [max(1, d) for d in i['shape'][1:]], "
        f"i['datatype']) for i in md['inputs']]; "
        f"[x.set_data_from_numpy(np.zeros(x.shape(), dt(x.datatype()))) for x in xs]; "
        f"print(c.infer('{m}', xs).get_response())\"")
    return "\n".join(lines)
