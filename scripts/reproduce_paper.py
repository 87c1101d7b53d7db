#!/usr/bin/env python3
"""Reproduce the paper's main comparison on the simulator.

For each of the 24 configurations (6 model groups x 4 clusters of eval_setting.json), plan
with PPipe, NP and DART-r (the planner), then search each plan's load factor at 99 %
attainment with the reservation scheduler, plus the PPipe plan under the reactive scheduler
(the ablation).  Load factor 1.0 is the PPipe plan's throughput of each model, for every row.

    scripts/reproduce_paper.py [--profiles DIR] [--only 2:L4-T4 ...] [--json PATH]
                               [--csv PATH] [--plots-dir DIR] [--doc docs/benchmarks/reproduction.md]
                               [--link-model duplex|sender|channel] [--schedulers ppipe,np,dart-r]
                               [--isolate-models] [--load-basis capacity|objective]
                               [--arrivals poisson|gamma-cv2|gamma-cv4|mmpp]

``--link-model sender`` runs the simulator and scheduler with a transfer occupying only the
sender's uplink; ``--link-model channel`` with the public artifact's exact model (only the
sending worker's channel of ``gpus_per_server x mps_share`` workers of its stage);
``--schedulers`` restricts the plans searched; ``--isolate-models`` searches each model of a
group alone (as the artifact's simulator runs them); ``--load-basis objective`` offers each
model ``weight x`` the PPipe plan's normalized throughput at load 1.0 instead of its own
planned capacity (see :func:`reference_rates`); ``--arrivals`` replaces the Poisson arrivals
with a bursty process (gamma inter-arrivals of CV 2 or 4, or an on/off MMPP: an
approximation of the paper's Azure Functions 2021 trace, which is not available here; see
:mod:`ppipe_trt.simulator.arrivals`).

Writes JSON rows (``models``, ``cluster``, ``scheduler``, ``policy``,
``per_model_load_factor``, ``load_factor``, ``utilization``), a CSV, PNG plots in the paper's
style and a markdown summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIGH = ("L4", "V100")
PLAN_POLICIES = ("np", "dart-r", "ppipe")
ANCHORS = {"np": 0.668, "dart-r": 0.749, "ppipe": 0.965}


def _configs(setting, only):
    out = []
    for g in range(1, len(setting.model_groups) + 1):
        for c in setting.clusters:
            tag = f"{g}:{c.label}"
            if not only or tag in only:
                out.append((g, c.label))
    return out


def _plan(profiles_dir, group, cluster, policy, plans_dir):
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.plan import load_plan, save_plan
    from ppipe_trt.profiles import load_profiles
    # scripts/bench_planner.py --plans-dir names plans g{group}_{cluster}_{policy}.json
    path = Path(plans_dir) / f"g{group}_{cluster}_{policy}.json" if plans_dir else None
    if path is not None and path.is_file():
        return load_plan(path)
    from planner import plan_cluster
    setting = load_paper_setting(profiles_dir)
    profiles = load_profiles(profiles_dir)
    plan = plan_cluster(profiles, setting.cluster(cluster), setting.workloads(group, profiles),
                        policy)
    if path is not None:
        save_plan(plan, path)
    return plan


def reference_rates(ref, basis: str) -> dict:
    """Each model's rate at load factor 1.0, from the PPipe plan ``ref``.

    ``"capacity"`` (default): the model's own planned throughput (its bottleneck stage's exact
    capacity, spare GPUs included).  ``"objective"``: ``weight x`` the plan's normalized
    throughput, the rate the max-min objective guarantees every model -- the value the
    public artifact's MILP may give a model's continuous ``xput`` variable, which it bounds
    above by capacity only and from below by the objective (``ilp_v4.py``), and which its
    ``run_sim_in_batch.py`` offers as load 1.0.  Equal for the model that sets the objective.
    """
    if basis == "capacity":
        return {m.model: m.throughput_rps for m in ref.models}
    if basis == "objective":
        return {m.model: m.weight * ref.normalized_throughput for m in ref.models}
    raise ValueError(f"load basis {basis!r}; expected capacity or objective")


def _search(job):
    profiles_dir, group, cluster, plan_policy, sched_policy, plans_dir, sim = job
    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.simulator import ArrivalSpec, SimConfig, search_load_factor
    t0 = time.perf_counter()
    ref = _plan(profiles_dir, group, cluster, "ppipe", plans_dir)
    plan = ref if plan_policy == "ppipe" else _plan(profiles_dir, group, cluster, plan_policy,
                                                     plans_dir)
    profiles = load_profiles(profiles_dir, plan.model_names)
    rates = reference_rates(ref, sim.get("load_basis", "capacity"))
    cfg = SimConfig(duration_s=sim["duration_s"], warmup_s=sim["warmup_s"], seed=sim["seed"],
                    policy=sched_policy, rates_rps=rates,
                    link_model=sim.get("link_model", "duplex"),
                    arrivals=ArrivalSpec.parse(sim.get("arrivals", "poisson")))
    if sim.get("isolate"):
        return _search_isolated(plan, profiles, cfg, group, cluster, plan_policy, sched_policy,
                                sim, t0)
    sr = search_load_factor(plan, profiles, cfg)
    return {
        "group": group, "models": list(plan.model_names), "cluster": cluster,
        "scheduler": plan_policy if sched_policy == "reservation" else f"{plan_policy}+{sched_policy}",
        "plan": plan_policy, "policy": sched_policy,
        "link_model": sim.get("link_model", "duplex"),
        "load_basis": sim.get("load_basis", "capacity"),
        "arrivals": sim.get("arrivals", "poisson"),
        "per_model_load_factor": dict(sr.per_model_load_factor),
        "load_factor": sr.load_factor,
        "utilization": dict(sr.utilization),
        "attainment_at_factor": sr.final.attainment if sr.final else 0.0,
        "steps": len(sr.runs), "wall_s": time.perf_counter() - t0,
    }


def _search_isolated(plan, profiles, cfg, group, cluster, plan_policy, sched_policy, sim, t0):
    """Each model searched alone: a plan holding only its pipelines, so its workers share no
    server (and no link) with another model's -- how the artifact's simulator runs them.
    Utilisation is not comparable in this mode (other models' GPUs are absent) and is left out."""
    from dataclasses import replace

    from ppipe_trt.simulator import search_load_factor

    per_model = {}
    for mp in plan.models:
        alone = replace(plan, models=(mp,))
        sr = search_load_factor(alone, profiles, cfg)
        per_model[mp.model] = sr.per_model_load_factor[mp.model]
    return {
        "group": group, "models": list(plan.model_names), "cluster": cluster,
        "scheduler": plan_policy if sched_policy == "reservation" else f"{plan_policy}+{sched_policy}",
        "plan": plan_policy, "policy": sched_policy,
        "link_model": sim.get("link_model", "duplex"), "isolated_models": True,
        "load_basis": sim.get("load_basis", "capacity"),
        "per_model_load_factor": per_model,
        "load_factor": sum(per_model.values()) / len(per_model),
        "utilization": {}, "attainment_at_factor": None, "steps": None,
        "wall_s": time.perf_counter() - t0,
    }


def summarise(rows):
    """Means over configurations, PPipe's gains, low-class utilisation, the ablation."""
    by = {}
    for r in rows:
        by.setdefault(r["scheduler"], {})[(r["group"], r["cluster"])] = r
    out = {"configs": len(by.get("ppipe", {}))}
    for s, cfgs in by.items():
        out[f"mean_load_factor_{s}"] = sum(r["load_factor"] for r in cfgs.values()) / len(cfgs)
        lows = [sum(v for k, v in r["utilization"].items() if k not in HIGH) for r in cfgs.values()]
        highs = [sum(v for k, v in r["utilization"].items() if k in HIGH) for r in cfgs.values()]
        out[f"low_util_{s}"] = sum(lows) / len(lows)
        out[f"high_util_{s}"] = sum(highs) / len(highs)
    pp = by.get("ppipe", {})
    for s in ("np", "dart-r"):
        other = by.get(s, {})
        keys = [k for k in pp if k in other and other[k]["load_factor"] > 0]
        if keys:
            out[f"gain_over_{s}_mean_of_ratios"] = sum(
                pp[k]["load_factor"] / other[k]["load_factor"] - 1 for k in keys) / len(keys)
            out[f"gain_over_{s}_ratio_of_means"] = (
                sum(pp[k]["load_factor"] for k in keys)
                / sum(other[k]["load_factor"] for k in keys) - 1)
    rea = by.get("ppipe+reactive", {})
    l4t4 = [k for k in pp if k[1] == "L4-T4" and k in rea]
    if l4t4:
        out["ablation_L4-T4_reservation"] = sum(pp[k]["load_factor"] for k in l4t4) / len(l4t4)
        out["ablation_L4-T4_reactive"] = sum(rea[k]["load_factor"] for k in l4t4) / len(l4t4)
    return out


def plot(rows, plots_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    clusters = sorted({r["cluster"] for r in rows})
    groups = sorted({r["group"] for r in rows})
    scheds = [s for s in ("np", "dart-r", "ppipe", "ppipe+reactive")
              if any(r["scheduler"] == s for r in rows)]
    colors = {"np": "#9e9e9e", "dart-r": "#64b5f6", "ppipe": "#e53935", "ppipe+reactive": "#ffb74d"}
    labels = {"np": "NP", "dart-r": "DART-r", "ppipe": "PPipe", "ppipe+reactive": "PPipe (reactive)"}
    idx = {(r["scheduler"], r["group"], r["cluster"]): r for r in rows}
    fig, axes = plt.subplots(1, len(clusters), figsize=(4.2 * len(clusters), 3.2), squeeze=False)
    width = 0.8 / max(1, len(scheds))
    for ax, c in zip(axes[0], clusters):
        for i, s in enumerate(scheds):
            xs = [g + (i - (len(scheds) - 1) / 2) * width for g in groups]
            ys = [idx[(s, g, c)]["load_factor"] if (s, g, c) in idx else 0 for g in groups]
            ax.bar(xs, ys, width, color=colors[s], label=labels[s], edgecolor="black", lw=0.4)
        ax.set_title(c.replace("-", "+"))
        ax.set_xticks(groups)
        ax.set_xticklabels([f"G{g}" for g in groups])
        ax.set_ylim(0, 1.1)
        ax.axhline(1.0, color="black", lw=0.5, ls=":")
        ax.set_ylabel("load factor @ 99% attainment")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(plots_dir / "load_factor.png", dpi=130)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, which in zip(axes, ("high", "low")):
        for i, s in enumerate([s for s in scheds if "+" not in s]):
            xs = [k + (i - 1) * 0.27 for k in range(len(clusters))]
            ys = []
            for c in clusters:
                vals = [sum(v for k, v in r["utilization"].items() if (k in HIGH) == (which == "high"))
                        for r in rows if r["scheduler"] == s and r["cluster"] == c]
                ys.append(100 * sum(vals) / len(vals) if vals else 0)
            ax.bar(xs, ys, 0.27, color=colors[s], label=labels[s], edgecolor="black", lw=0.4)
        ax.set_xticks(range(len(clusters)))
        ax.set_xticklabels([c.replace("-", "+") for c in clusters])
        ax.set_ylim(0, 100)
        ax.set_title(f"{which}-class GPU utilisation (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots_dir / "utilization.png", dpi=130)
    plt.close(fig)


def write_doc(path, rows, summary, args, wall_s):
    lines = ["# Reproduction of the paper's main comparison (simulator)", "",
             f"Command: `scripts/reproduce_paper.py {' '.join(args)}`  ",
             f"{summary['configs']} configurations, {_arrivals_label(args)}, "
             "30 simulated seconds per load step after a 2 s warm-up (excluded), seed 0; "
             f"wall time {wall_s:.0f} s.", "",
             "| metric | ours | paper |", "| --- | --- | --- |"]
    paper = {"np": "66.8 %", "dart-r": "74.9 %", "ppipe": "96.5 %"}
    for s in ("np", "dart-r", "ppipe"):
        k = f"mean_load_factor_{s}"
        if k in summary:
            lines.append(f"| load factor @ 99 %, {s} | {100 * summary[k]:.1f} % | {paper[s]} |")
    for s, pv in (("np", "+48.0 %"), ("dart-r", "+32.2 %")):
        k = f"gain_over_{s}_mean_of_ratios"
        if k in summary:
            lines.append(f"| PPipe gain over {s} (mean of per-config ratios) | "
                         f"{100 * summary[k]:+.1f} % | {pv} |")
            lines.append(f"| PPipe gain over {s} (ratio of means) | "
                         f"{100 * summary[f'gain_over_{s}_ratio_of_means']:+.1f} % | |")
    lowp = {"ppipe": "73.6 %", "np": "8.1 %", "dart-r": "29.5 %"}
    for s in ("ppipe", "np", "dart-r"):
        k = f"low_util_{s}"
        if k in summary:
            lines.append(f"| low-class GPU utilisation, {s} | {100 * summary[k]:.1f} % | {lowp[s]} |")
    if "ablation_L4-T4_reservation" in summary:
        lines.append(f"| ablation L4+T4: reservation vs reactive | "
                     f"{summary['ablation_L4-T4_reservation']:.2f} vs "
                     f"{summary['ablation_L4-T4_reactive']:.2f} | 0.92 vs 0.71 |")
    lines += ["", "## Per configuration (mean load factor over the group's 3 models)", "",
              "| group | cluster | NP | DART-r | PPipe | PPipe reactive | low util NP / DART-r / PPipe |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    idx = {(r["scheduler"], r["group"], r["cluster"]): r for r in rows}
    keys = sorted({(r["group"], r["cluster"]) for r in rows})
    for g, c in keys:
        def lf(s):
            r = idx.get((s, g, c))
            return f"{r['load_factor']:.3f}" if r else "-"

        def lu(s):
            r = idx.get((s, g, c))
            return f"{100 * sum(v for k, v in r['utilization'].items() if k not in HIGH):.0f}" if r else "-"
        lines.append(f"| {g} | {c} | {lf('np')} | {lf('dart-r')} | {lf('ppipe')} | "
                     f"{lf('ppipe+reactive')} | {lu('np')} / {lu('dart-r')} / {lu('ppipe')} |")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    existing = Path(path).read_text() if Path(path).is_file() else ""
    notes = existing.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in existing else "\n"
    Path(path).write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)


def _arrivals_label(args) -> str:
    """How the doc names the arrival process of a run with command-line ``args``."""
    name = "poisson"
    for i, a in enumerate(args):
        if a == "--arrivals" and i + 1 < len(args):
            name = args[i + 1]
        elif a.startswith("--arrivals="):
            name = a.split("=", 1)[1]
    if name == "poisson":
        return "Poisson arrivals"
    return (f"{name} arrivals (bursty; an approximation of the paper's Azure Functions 2021 "
            "trace, which is not available here)")


def main(argv=None) -> int:
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.profiles import default_profiles_dir
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=str(default_profiles_dir()))
    ap.add_argument("--only", nargs="*", default=None, help="GROUP:CLUSTER, e.g. 2:L4-T4")
    ap.add_argument("--json", default=None, help="write the rows (and summary) here")
    ap.add_argument("--csv", default="docs/benchmarks/reproduction.csv")
    ap.add_argument("--plots-dir", default="docs/benchmarks/reproduction")
    ap.add_argument("--doc", default="docs/benchmarks/reproduction.md")
    ap.add_argument("--plans-dir", default=None, help="reuse/save plan JSONs here")
    ap.add_argument("--no-reactive", action="store_true", help="skip the reactive ablation")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--link-model", default="duplex", choices=("duplex", "sender", "channel"),
                    help="duplex (default): sender uplink + receiver downlink per transfer; "
                         "sender: only the sender's uplink; channel: only the sending "
                         "worker's channel (the public artifact's exact model)")
    ap.add_argument("--schedulers", default=",".join(PLAN_POLICIES),
                    help="comma-separated plans to search (default: np,dart-r,ppipe)")
    ap.add_argument("--isolate-models", action="store_true",
                    help="search each model alone (its workers share no server with another "
                         "model's), as the artifact's simulator does; utilisation not reported")
    ap.add_argument("--load-basis", default="capacity", choices=("capacity", "objective"),
                    help="load factor 1.0 = each model's planned capacity in the PPipe plan "
                         "(default) or weight x the plan's normalized throughput (what the "
                         "max-min objective guarantees; see reference_rates)")
    ap.add_argument("--arrivals", default="poisson",
                    choices=("poisson", "gamma-cv2", "gamma-cv4", "mmpp"),
                    help="arrival process of every model (default poisson; the others are "
                         "bursty stand-ins for the paper's Azure Functions 2021 trace)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    from tqdm import tqdm
    setting = load_paper_setting(args.profiles)
    only = set(args.only) if args.only else None
    plan_policies = tuple(p.strip() for p in args.schedulers.split(",") if p.strip())
    bad = [p for p in plan_policies if p not in PLAN_POLICIES]
    if bad or not plan_policies:
        print(f"--schedulers {args.schedulers!r}: expected a comma-separated subset of "
              f"{','.join(PLAN_POLICIES)}", file=sys.stderr)
        return 2
    configs = _configs(setting, only)
    if not configs:
        print(f"no configuration matches {sorted(only or [])}", file=sys.stderr)
        return 2
    if args.plans_dir:  # plan once, up front, so the workers only read
        for g, c in tqdm(configs, desc="planning", file=sys.stderr):
            for pol in set(plan_policies) | {"ppipe"}:
                _plan(args.profiles, g, c, pol, args.plans_dir)
    sim = {"duration_s": args.duration, "warmup_s": args.warmup, "seed": args.seed,
           "link_model": args.link_model, "isolate": args.isolate_models,
           "load_basis": args.load_basis, "arrivals": args.arrivals}
    jobs = [(args.profiles, g, c, pol, "reservation", args.plans_dir, sim)
            for g, c in configs for pol in plan_policies]
    if not args.no_reactive and "ppipe" in plan_policies:
        jobs += [(args.profiles, g, c, "ppipe", "reactive", args.plans_dir, sim)
                 for g, c in configs]
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        futs = [ex.submit(_search, j) for j in jobs]
        for f in tqdm(as_completed(futs), total=len(futs), desc="load-factor searches",
                      file=sys.stderr):
            rows.append(f.result())
    rows.sort(key=lambda r: (r["group"], r["cluster"], r["scheduler"]))
    wall = time.perf_counter() - t0
    summary = summarise(rows)
    for k, v in summary.items():
        print(f"{k:<40} {v:.4f}" if isinstance(v, float) else f"{k:<40} {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["group", "cluster", "scheduler", "models", "load_factor",
                        "per_model_load_factor", "utilization"])
            for r in rows:
                w.writerow([r["group"], r["cluster"], r["scheduler"], " ".join(r["models"]),
                            f"{r['load_factor']:.4f}", json.dumps(r["per_model_load_factor"]),
                            json.dumps(r["utilization"])])
    if args.plots_dir:
        plot(rows, args.plots_dir)
    if args.doc:
        write_doc(args.doc, rows, summary, sys.argv[1:] if argv is None else argv, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
