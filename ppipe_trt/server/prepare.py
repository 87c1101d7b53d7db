"""What ``ppipe serve`` serves: the models resolved, their engines built or reused, the plan.

:func:`prepare` takes the command's arguments and returns the plan, the profiles and the
built models the serving runtime is assembled from.  It knows no front end (HTTP, gRPC);
heavy modules are imported inside it, so that ``ppipe --help`` stays fast.
"""

from __future__ import annotations

import sys

from ppipe_trt.engines.gpu import CPU_CLASS

DEFAULT_MODEL = "demo_resnet"


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

    A model whose build is corrupt or stale (or fails) is left out, with its reason and
    rebuild command on stderr and in the description, and the others are served; when no
    model is left, or ``--plan`` names it, that is an error naming each one's rebuild command.

    Planning for this machine, a model whose SLO no pipeline meets here is served at the
    smallest SLO that one does, said on stderr, in the description and in the plan
    (``params["slo_raised"]``, which the model metadata and /v2/status report); with
    ``--strict-slo`` that is an error naming the model, its SLO and the smallest feasible
    one.  Models beyond ``--slots`` (one worker each at least) are left out, said likewise.
    """
    from ppipe_trt.cluster import load_cluster
    from ppipe_trt.engines.gpu import detect_gpu_class
    from ppipe_trt.errors import (BadInputError, EngineBuildError, EngineMismatchError,
                                  ProfileFormatError)
    from ppipe_trt.models import BUILTIN_MODELS
    from ppipe_trt.plan import load_plan
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.profiles.types import ProfileSet
    from ppipe_trt.serving.local import (SLO_RAISED_PARAM, emulated_plan, local_plan,
                                         time_sliced, usable_cores)

    model_repository = getattr(args, "model_repository", None)
    args.model_repository = model_repository
    no_slot: list[str] = []  # models left out for want of a worker slot
    plan = load_plan(args.plan) if args.plan else None
    if args.emulate is True and plan is None:
        raise BadInputError("--emulate without a cluster file needs --plan plan.json (its "
                            "cluster is emulated); otherwise give --emulate CLUSTER.yaml")
    entries = _repository_entries(args)
    models = list(args.models or (plan.model_names if plan else []) or entries)
    from ppipe_trt.engines.store import safe_path_name

    for m in models:  # each becomes a folder name in the store and the example repository
        safe_path_name(m)
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
    built, used_entries, broken = {}, {}, {}
    for m in models:
        entry = entries.get(m)
        if entry is None and m in BUILTIN_MODELS and model_repository is None:
            entry = _example_entry(m)
        try:
            if entry is not None:
                from ppipe_trt.repository.engines import build_entry

                print(f"engines: building or reusing {m} ({entry.onnx_path}) for {local_class} "
                      f"in {args.engines}", file=sys.stderr)
                built[m] = build_entry(entry, local_class, args.engines)
                used_entries[m] = entry
                continue
            stored = _stored_build(m, local_class, args.engines)
        except (EngineMismatchError, EngineBuildError, ProfileFormatError) as exc:
            broken[m] = exc  # the message names the file and the rebuild command
            print(f"engines: NOT serving {m}: {exc}", file=sys.stderr)
            continue
        if stored is not None:
            built[m] = stored
    if broken:
        models = [m for m in models if m not in broken]
        if not models or plan is not None:
            if len(broken) == 1 and not models:
                raise next(iter(broken.values()))
            why = "; ".join(f"{m}: {exc}" for m, exc in broken.items())
            raise EngineMismatchError(
                (f"plan {args.plan} serves models whose engines cannot be used: "
                 if plan is not None else "no model can be served: ") + why)
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
        slots = sum(st.workers for mp in plan.models for pipe in mp.pipelines
                    for st in pipe.stages if st.gpu_class == CPU_CLASS) \
            if local_class == CPU_CLASS else 0
        cores = usable_cores()
        real = [m for m in plan.model_names if m in built]
        if not args.emulate and real and slots > cores:
            # as when the plan was made here (below): the runtime reserves what each CPU
            # worker takes when all share the cores, whether the plan came from this serve
            # (--save-plan) or from ppipe plan
            profiles = time_sliced(profiles, real, local_class, slots / cores)
            what += (f"; {slots} workers on {cores} CPU cores: block latencies reserved "
                     f"x{slots / cores:.2f}, what each worker takes when all are busy")
    elif args.emulate:
        cluster = load_cluster(args.emulate)
        plan = emulated_plan(profiles, cluster, models, slo, weights=weights)
        what = f"emulated cluster {cluster.label} ({args.emulate})"
    else:
        slots = args.slots or len(models)
        if slots < 1:
            raise BadInputError(f"--slots {slots}; expected 1 or more worker slots")
        # every model needs a worker at least: those past the slots are not served
        no_slot, models = models[slots:], models[:slots]
        for m in no_slot:
            print(f"planner: NOT serving {m}: no worker slot left (--slots {slots} for "
                  f"{slots + len(no_slot)} models)", file=sys.stderr)
        built = {m: b for m, b in built.items() if m in models}
        cores = usable_cores()
        shared_cores = local_class == CPU_CLASS and slots > cores
        if shared_cores:
            # a CPU worker is one core (CPU_WORKER_THREADS thread, as profiled); more workers
            # than cores share them: plan (and reserve) what each takes when all are busy
            profiles = time_sliced(profiles, [m for m in models if m in built], local_class,
                                   slots / cores)
        plan = local_plan(profiles, models, local_class, slots, slo, weights=weights,
                          strict_slo=getattr(args, "strict_slo", False))
        what = f"local {local_class} x{slots}"
        if shared_cores:
            what += (f"; {slots} workers on {cores} CPU cores: block latencies planned "
                     f"x{slots / cores:.2f}, what each worker takes when all are busy "
                     f"(serving at most {cores} models here avoids it)")
    derived = [m for m in models if m not in slo]
    if derived and args.plan is None:
        what += (f"; SLO derived from the profile (no slo_ms in the config) for: "
                 f"{', '.join(derived)}")
    raised = plan.params.get(SLO_RAISED_PARAM, {}) if args.plan is None else {}
    for m, r in raised.items():
        print(f"planner: serving {m} at SLO {r['slo_ms']:g} ms: {r['reason']}", file=sys.stderr)
    if raised:
        what += ("; SLO RAISED (the SLO asked cannot be met here; serving at the smallest "
                 "feasible one, --strict-slo refuses instead): " + ", ".join(
                     f"{m} {r['asked_slo_ms']:g} -> {r['slo_ms']:g} ms"
                     for m, r in raised.items()))
    if timing_only:
        what += f"; TIMING-ONLY (no engines, profiles only): {', '.join(timing_only)}"
    if broken:
        what += "; NOT SERVED (unusable engines): " + "; ".join(
            f"{m}: {exc}" for m, exc in broken.items())
    if no_slot:
        what += (f"; NOT SERVED (no worker slot left, --slots {len(models)}; give --slots >= "
                 f"{len(models) + len(no_slot)}): {', '.join(no_slot)}")
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
