"""``ppipe engines build|list``: build block engines and profiles; show the store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ppipe_trt.errors import BadInputError, EngineBuildError, PPipeError
from ppipe_trt.models import BUILTIN_MODELS

DEFAULT_TOLERANCE = 1e-5


def register(subparsers) -> None:
    engines = subparsers.add_parser("engines", help="build and list per-GPU-class block engines")
    sub = engines.add_subparsers(dest="engines_command", metavar="ACTION")

    build = sub.add_parser(
        "build", help="pre-partition a model into blocks, build engines, profile them",
        description="MODEL is a built-in name (" + ", ".join(BUILTIN_MODELS) + "), 'all' "
                    "(the three built-ins) or a path to an ONNX model (opset >= 13).  With "
                    "--model-repository DIR (Triton's layout: DIR/<name>/config.pbtxt and "
                    "DIR/<name>/<version>/model.onnx) every model of DIR is built, or those "
                    "named with --model.")
    build.add_argument("model", metavar="MODEL", nargs="?")
    build.add_argument("--model-repository", type=Path, default=None, metavar="DIR",
                       help="build the models of this Triton-layout repository")
    build.add_argument("--model", dest="repo_models", action="append", metavar="NAME",
                       help="with --model-repository: only this model (repeatable)")
    build.add_argument("--gpu-class", default=None,
                       help="GPU class to build for (default: detected with nvidia-ml-py; "
                            "'cpu' without an NVIDIA driver)")
    build.add_argument("--blocks", type=int, default=10, help="number of blocks (default 10)")
    build.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    build.add_argument("--max-batch", type=int, default=8,
                       help="largest batch (default 8; a repository's max_batch_size wins)")
    build.add_argument("--precision", default="tf32", choices=("tf32", "fp16", "fp32"),
                       help="TensorRT precision flag (default tf32)")
    build.add_argument("--fp16-cuts", action="store_true",
                       help="count float activations at cuts as fp16 (2 bytes) in the profile")
    build.add_argument("--store", default="engines", help="artifact store root (default engines/)")
    build.add_argument("--no-profile", action="store_true", help="skip latency profiling")
    build.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    build.add_argument("--mps-shares", default=None, metavar="1,2,3,4",
                       help="MPS shares to profile (default: 1..4 on a GPU with an MPS daemon, "
                            "else 1; a CPU has one share)")
    build.add_argument("--verify", action="store_true",
                       help="run the chained block sub-graphs against the full model at batch 1 "
                            "and max batch; exit 1 above --tolerance")
    build.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                       help=f"largest relative error --verify accepts (default {DEFAULT_TOLERANCE})")
    build.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="write a JSON summary (one object, or a list for several models)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(handler=cmd_build)

    lst = sub.add_parser("list", help="list the builds in the store")
    lst.add_argument("--store", default="engines")
    lst.set_defaults(handler=cmd_list)
    engines.set_defaults(handler=lambda args: (engines.print_help(), 2)[1])


def _summary(built, check, fp16_check) -> dict:
    engines = []
    for b in range(built.num_blocks):
        ins, outs = built.stage_io(b, b)
        entry = {"block": b, "nodes": list(built.block_node_ranges[b]),
                 "onnx": str(built.stage_onnx(b, b)),
                 "inputs": [s.name for s in ins], "outputs": [s.name for s in outs],
                 "bytes_in_per_sample": sum(s.bytes_per_sample for s in ins),
                 "bytes_out_per_sample": sum(s.bytes_per_sample for s in outs)}
        plan = built.stage_path(b, b, ".plan")
        if plan.exists():
            entry["plan"] = str(plan)
        engines.append(entry)
    part = built.manifest["partition"]
    return {"model": built.model_name, "gpu_class": built.gpu_class, "blocks": built.num_blocks,
            "max_rel_error": None if check is None else check.max_rel_error,
            "fp16_cuts_max_rel_error": None if fp16_check is None else fp16_check.max_rel_error,
            "verified_batches": None if check is None else list(check.batches),
            "backend": built.backend, "content_hash": built.content_hash,
            "balance_bounds": [part.get("lower"), part.get("upper")],
            "cut_bytes_per_sample": list(built.cut_bytes_per_sample()),
            "profile": str(built.profile_path) if built.profile_path.exists() else None,
            "engines": engines}


def _parse_shares(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shares = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise BadInputError(f"--mps-shares {text!r}; expected comma-separated integers like 1,2,4") from None
    if any(s < 1 for s in shares):
        raise BadInputError(f"--mps-shares {text!r}; shares must be >= 1")
    return shares


def _build_targets(args: argparse.Namespace) -> list[tuple[str, object]]:
    """[(label, what to build)]: repository entries, built-in names or ONNX paths."""
    if args.model_repository is not None:
        if args.model:
            raise BadInputError(f"give either MODEL ({args.model}) or --model-repository, "
                                "not both")
        from ppipe_trt.repository import load_repository

        entries = load_repository(args.model_repository)
        wanted = args.repo_models or list(entries)
        unknown = [m for m in wanted if m not in entries]
        if unknown:
            raise BadInputError(f"models {unknown} are not in {args.model_repository} "
                                f"(it holds {sorted(entries)})")
        return [(m, entries[m]) for m in wanted]
    if args.repo_models:
        raise BadInputError("--model NAME selects models of --model-repository DIR")
    if not args.model:
        raise BadInputError("nothing to build: give MODEL (a built-in name, 'all' or an .onnx "
                            "path) or --model-repository DIR")
    models = list(BUILTIN_MODELS) if args.model == "all" else [args.model]
    return [(str(m), m) for m in models]


def cmd_build(args: argparse.Namespace) -> int:
    from ppipe_trt.engines.build import build_model_engines
    from ppipe_trt.engines.verify import check_chain
    from ppipe_trt.repository import ModelEntry
    from ppipe_trt.repository.engines import build_entry

    if args.blocks < 1:
        raise BadInputError(f"--blocks {args.blocks}; expected >= 1")
    targets = _build_targets(args)
    summaries, failed, broken = [], [], []
    common = dict(num_blocks=args.blocks, backend=args.backend, progress=not args.quiet,
                  profile=not args.no_profile, precision=args.precision,
                  fp16_cuts=args.fp16_cuts, repeats=args.repeats,
                  mps_shares=_parse_shares(args.mps_shares))
    bar = None
    if len(targets) > 1 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), desc="models", unit="model", dynamic_ncols=True)
    for label, model in targets:
        if bar is not None:
            bar.set_postfix_str(label)
        try:
            if isinstance(model, ModelEntry):
                built = build_entry(model, args.gpu_class or _detected_class(), args.store,
                                    **common)
            else:
                built = build_model_engines(model, args.gpu_class, store_root=args.store,
                                            max_batch=args.max_batch, **common)
        except PPipeError as exc:
            if len(targets) == 1:
                raise
            print(f"{label}: build failed: {exc}", file=sys.stderr)
            broken.append(label)
            continue
        finally:
            if bar is not None:
                bar.update(1)
        check = fp16_check = None
        if args.verify:
            check = check_chain(built)
            fp16_check = check_chain(built, fp16_cuts=True)
            ok = check.max_rel_error <= args.tolerance
            if not ok:
                failed.append(built.model_name)
            print(f"{built.model_name}: chained {built.num_blocks} blocks vs full model at batch "
                  f"{list(check.batches)}: max relative error {check.max_rel_error:.3g} "
                  f"({'ok' if ok else 'ABOVE'} tolerance {args.tolerance:g}); with fp16 at cuts "
                  f"{fp16_check.max_rel_error:.3g}")
        summary = _summary(built, check, fp16_check)
        summaries.append(summary)
        lat = ""
        if built.profile_path.exists():
            from ppipe_trt.profiles import read_profile

            prof, _ = read_profile(built.profile_path)
            table = prof.table(built.gpu_class)
            lat = (f", batch-1 block latency {sum(r[0] for r in table.latency_us) / 1e3:.2f} ms "
                   f"total")
        print(f"{built.model_name}: {built.num_blocks} blocks on {built.gpu_class} "
              f"({built.backend}, bounds {summary['balance_bounds']}) -> {built.build_dir}{lat}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=1))
    if bar is not None:
        bar.close()
    if broken:
        raise EngineBuildError(f"{len(broken)} of {len(targets)} models did not build: "
                               f"{broken} (errors above); the others are built")
    if failed:
        raise EngineBuildError(f"verification above tolerance {args.tolerance:g} for {failed}")
    return 0


def _detected_class() -> str:
    from ppipe_trt.engines.gpu import detect_gpu_class

    return detect_gpu_class()




def cmd_list(args: argparse.Namespace) -> int:
    """One row per model and GPU class: blocks, backend, max batch, hash, profile, whether a
    repository config is kept with it, and its state (ok, or why it is stale or corrupt)."""
    from ppipe_trt.engines.store import BuiltModel, build_problem
    from ppipe_trt.repository.engines import CONFIG_COPY

    root = Path(args.store)
    rows = []
    for current in sorted(root.glob("*/*/CURRENT")):
        build_dir = current.parent / current.read_text().strip()
        try:
            built = BuiltModel.from_manifest(build_dir)
            m = built.manifest
            state = build_problem(built) or "ok"
        except Exception as exc:  # list what is readable, name what is not
            rows.append((current.parent.parent.name, current.parent.name, "?", "?", "?", "?",
                         "?", "?", "?", f"unreadable ({exc})"))
            continue
        rows.append((m["gpu_class"], m["model"], m["num_blocks"], m["backend"],
                     m["backend_version"], m["max_batch"], m["content_hash"],
                     "yes" if (current.parent / "profile.json").exists() else "no",
                     "yes" if (current.parent / CONFIG_COPY).exists() else "no", state))
    if not rows:
        print(f"no builds in {root}; run: ppipe engines build --model-repository DIR")
        return 0
    header = ("gpu_class", "model", "blocks", "backend", "version", "max_batch", "hash",
              "profile", "config", "state")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0
