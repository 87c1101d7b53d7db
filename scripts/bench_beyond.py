#!/usr/bin/env python3
"""Beyond PPipe (issue 13), on the simulator: low-load latency, goodput, bursty arrivals.

Per configuration of the paper's 24 (6 model groups x 4 clusters), three variants:

* ``ppipe``: today's PPipe plan (``planner.plan_cluster``, default options: 40 % SLO margin)
  under today's reservation policy (PPipe's wait for a fuller batch);
* ``ppipe+wc``: the same plan under the work-conserving reservation policy (the ablation
  that isolates part 1);
* ``beyond``: the plan chosen by simulation among SLO margins
  (:func:`planner.tuning.plan_by_simulation`, selected on seed 1) under the
  work-conserving policy.

Measured for each (seed 0, Poisson, ``--duration`` s after ``--warmup`` s): the median
latency of each model at 10 / 20 / 30 % of the plan's per-model capacity, next to the
model's batch-1 execution + transfer time (its fastest pipeline's); the load factor at 99 %
attainment (load 1.0 = the plan's per-model capacity, as in reproduce_paper.py); and the
goodput: the largest total rate, models at their weights, with every model >= 99 %
(:func:`ppipe_trt.simulator.goodput.search_goodput`).

The bursty table reads reproduce_paper.py JSON files (one per arrival process, e.g.
``scripts/reproduce_paper.py --arrivals mmpp --json DIR/mmpp.json``) from ``--bursty-dir``.

    scripts/bench_beyond.py [--only 2:L4-T4 ...] [--plans-dir DIR] [--json PATH]
                            [--doc docs/benchmarks/beyond.md] [--bursty-dir DIR] [--jobs 1]

``--json`` rows: ``models``, ``cluster``, ``group``, ``variant``, ``goodput_rps``,
``load_factor``, ``p50_ms_at_20pct`` (mean over the group's models), per model figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

LOW_LOADS = (0.1, 0.2, 0.3)
VARIANTS = ("ppipe", "ppipe+wc", "beyond")
ARRIVALS = ("poisson", "gamma-cv2", "gamma-cv4", "mmpp")


def _beyond_plan(profiles_dir, group, cluster, plans_dir):
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.plan import load_plan, save_plan
    from ppipe_trt.profiles import load_profiles
    path = Path(plans_dir) / f"g{group}_{cluster}_beyond.json" if plans_dir else None
    if path is not None and path.is_file():
        return load_plan(path), None
    from planner.tuning import plan_by_simulation
    setting = load_paper_setting(profiles_dir)
    profiles = load_profiles(profiles_dir)
    tuned = plan_by_simulation(profiles, setting.cluster(cluster),
                               setting.workloads(group, profiles))
    if path is not None:
        save_plan(tuned.plan, path)
    return tuned.plan, tuned


def batch1_work_ms(plan, profiles):
    """Per model: the batch-1 execution + transfer time (ms) of its fastest pipeline."""
    from ppipe_trt.scheduler import place_workers
    from ppipe_trt.scheduler.tables import build_pipeline_tables
    placement = place_workers(plan)
    out = {}
    for m in plan.models:
        tables = build_pipeline_tables(plan, m, profiles, placement)
        out[m.model] = min(sum(st.latency_us[1] + st.transfer_in_us[1] for st in pt.stages)
                           for pt in tables) / 1e3
    return out


def pipeline_work_ms(plan, profiles):
    """Per model, per pipeline: batch-1 execution + transfer time (ms)."""
    from ppipe_trt.scheduler import place_workers
    from ppipe_trt.scheduler.tables import build_pipeline_tables
    placement = place_workers(plan)
    return {m.model: [sum(st.latency_us[1] + st.transfer_in_us[1] for st in pt.stages) / 1e3
                      for pt in build_pipeline_tables(plan, m, profiles, placement)]
            for m in plan.models}


class DispatchRecorder:
    """Wraps a scheduler (``simulate(wrap=...)``) and keeps, per request, its reserved
    finish and pipeline (exact latencies: the reserved finish is the real one)."""

    def __init__(self, inner, sink):
        self._inner = inner
        self._sink = sink

    def _keep(self, dec):
        for d in dec.dispatches:
            if d.route[0].stage == 0:
                for r in d.requests:
                    self._sink.append((r.model, r.arrival_us, d.finish_us, d.pipeline))
        return dec

    def on_arrival(self, request, now_us):
        return self._keep(self._inner.on_arrival(request, now_us))

    def on_arrivals(self, requests, now_us):
        return self._keep(self._inner.on_arrivals(requests, now_us))

    def on_wake(self, now_us):
        return self._keep(self._inner.on_wake(now_us))

    def on_stage_finished(self, batch_id, stage, finish_us, now_us):
        return self._keep(self._inner.on_stage_finished(batch_id, stage, finish_us, now_us))

    def __getattr__(self, name):
        return getattr(self._inner, name)


def own_pipeline_ratio(plan, profiles, cfg):
    """Per model: median over measured requests of latency / (batch-1 execution + transfer
    time of the pipeline that served it), and the run's median latency (ms)."""
    from ppipe_trt.simulator import simulate
    work = pipeline_work_ms(plan, profiles)
    seen = []
    res = simulate(plan, profiles, cfg, wrap=lambda s: DispatchRecorder(s, seen))
    warm = cfg.warmup_s * 1e6
    ratios = {}
    for model, arrival, finish, p in seen:
        if arrival >= warm:
            ratios.setdefault(model, []).append((finish - arrival) / 1e3 / work[model][p])
    med = {m: sorted(v)[len(v) // 2] for m, v in ratios.items()}
    return med, {m.model: m.latency_p50_us / 1e3 for m in res.models}


def _measure(job):
    """All figures of one configuration (runs in a worker process)."""
    from dataclasses import replace

    from ppipe_trt.profiles import load_profiles
    from ppipe_trt.simulator import ArrivalSpec, SimConfig, search_load_factor
    from ppipe_trt.simulator.goodput import search_goodput
    from reproduce_paper import _plan
    profiles_dir, group, cluster, plans_dir, sim = job
    t0 = time.perf_counter()
    today = _plan(profiles_dir, group, cluster, "ppipe", plans_dir)
    beyond, tuned = _beyond_plan(profiles_dir, group, cluster, plans_dir)
    profiles = load_profiles(profiles_dir, today.model_names)
    base = SimConfig(duration_s=sim["duration_s"], warmup_s=sim["warmup_s"], seed=sim["seed"],
                     arrivals=ArrivalSpec.parse(sim["arrivals"]))
    if sim["goodput_only"]:
        rows = []
        for variant, plan, wc in (("ppipe", today, False), ("beyond", beyond, True)):
            gp = search_goodput(plan, profiles, replace(base, policy_options={
                "work_conserving": wc}), rel_tol=sim["rel_tol"])
            rows.append({"group": group, "cluster": cluster, "models": list(plan.model_names),
                         "variant": variant, "arrivals": sim["arrivals"],
                         "goodput_rps": gp.goodput_rps,
                         "goodput_probes": [list(p) for p in gp.probes],
                         "wall_s": time.perf_counter() - t0})
        return rows
    rows = []
    for variant, plan, wc in (("ppipe", today, False), ("ppipe+wc", today, True),
                              ("beyond", beyond, True)):
        cfg = replace(base, policy_options={"work_conserving": wc})
        work = batch1_work_ms(plan, profiles)
        p50, own = {}, {}
        for lf in LOW_LOADS:
            own[f"{lf:.1f}"], p50[f"{lf:.1f}"] = own_pipeline_ratio(
                plan, profiles, replace(cfg, load_factor=lf))
        sr = search_load_factor(plan, profiles, cfg)
        gp = search_goodput(plan, profiles, cfg, rel_tol=sim["rel_tol"])
        at20 = p50["0.2"]
        rows.append({
            "group": group, "cluster": cluster, "models": list(plan.model_names),
            "variant": variant, "work_conserving": wc,
            "slo_margin": plan.params.get("slo_margin") if plan.params else None,
            "planned_rps": plan.normalized_throughput * sum(m.weight for m in plan.models),
            "goodput_rps": gp.goodput_rps,
            "goodput_probes": [list(p) for p in gp.probes],
            "load_factor": sr.load_factor,
            "per_model_load_factor": dict(sr.per_model_load_factor),
            "p50_ms_at_20pct": sum(at20.values()) / len(at20),
            "p50_ms_by_load": p50,
            "batch1_work_ms": work,
            "p50_over_work_max": max(v / work[m] for d in p50.values() for m, v in d.items()),
            "own_pipeline_ratio_p50_by_load": own,
            "own_pipeline_ratio_p50_max": max(v for d in own.values() for v in d.values()),
        })
    for r in rows:
        r["wall_s"] = time.perf_counter() - t0
        if tuned is not None and r["variant"] == "beyond":
            r["tuning"] = [{"slo_margin": t.slo_margin, "planned_rps": t.planned_rps,
                            "goodput_rps_seed1": t.goodput_rps} for t in tuned.trials]
    return rows


def summarise(rows):
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[(r["group"], r["cluster"])] = r
    out = {}
    old, wc, new = by.get("ppipe", {}), by.get("ppipe+wc", {}), by.get("beyond", {})
    keys = sorted(k for k in old if k in new and old[k]["goodput_rps"] > 0)
    if keys:
        ratios = [new[k]["goodput_rps"] / old[k]["goodput_rps"] for k in keys]
        out["configs"] = len(keys)
        out["goodput_ratio_geomean"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        out["goodput_ratio_min"] = min(ratios)
        out["goodput_ratio_max"] = max(ratios)
    for name, d in (("ppipe", old), ("ppipe+wc", wc), ("beyond", new)):
        if d and all("load_factor" in r for r in d.values()):
            out[f"mean_load_factor_{name}"] = sum(r["load_factor"] for r in d.values()) / len(d)
            out[f"p50_over_work_max_{name}"] = max(r["p50_over_work_max"] for r in d.values())
            out[f"own_pipeline_ratio_p50_max_{name}"] = max(
                r["own_pipeline_ratio_p50_max"] for r in d.values())
    lk = [k for k in old if k in wc]
    if lk:
        out["load_factor_wc_ge_old_configs"] = sum(
            wc[k]["load_factor"] >= old[k]["load_factor"] - 1e-9 for k in lk)
    return out


def bursty_table(bursty_dir):
    """Rows of the bursty table from reproduce_paper.py JSON files named ARRIVALS.json."""
    lines = []
    for name in ARRIVALS:
        path = Path(bursty_dir) / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        s = data["summary"]
        lines.append(
            f"| {name} | {s.get('configs', '-')} | "
            f"{100 * s.get('mean_load_factor_np', float('nan')):.1f} % | "
            f"{100 * s.get('mean_load_factor_dart-r', float('nan')):.1f} % | "
            f"{100 * s.get('mean_load_factor_ppipe', float('nan')):.1f} % | "
            f"{100 * s.get('gain_over_np_mean_of_ratios', float('nan')):+.1f} % | "
            f"{100 * s.get('gain_over_dart-r_mean_of_ratios', float('nan')):+.1f} % |")
    if not lines:
        return []
    return (["| arrivals | configs | NP | DART-r | PPipe | PPipe gain over NP | over DART-r |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             "| paper: Azure Functions 2021 trace | 24 | 61.1 % | 69.4 % | 90.3 % | +75.1 % "
             "| +35.8 % |"] + lines)


def bursty_goodput_table(bursty_dir):
    """Rows of the goodput table from ``goodput_ARRIVALS.json`` (``--goodput-only`` runs)."""
    lines = []
    for name in ARRIVALS:
        path = Path(bursty_dir) / f"goodput_{name}.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())["summary"]
        lines.append(f"| {name} | {s.get('configs', '-')} | "
                     f"{s.get('goodput_ratio_geomean', float('nan')):.3f} | "
                     f"{s.get('goodput_ratio_min', float('nan')):.3f} | "
                     f"{s.get('goodput_ratio_max', float('nan')):.3f} |")
    if not lines:
        return []
    return ["| arrivals | configs | goodput ratio geomean | min | max |",
            "| --- | --- | --- | --- | --- |"] + lines


def report(rows, summary, bursty_dir, args, wall_s):
    idx = {(r["variant"], r["group"], r["cluster"]): r for r in rows}
    keys = sorted({(r["group"], r["cluster"]) for r in rows})
    lines = ["# Beyond PPipe (simulator)", "",
             f"Command: `scripts/bench_beyond.py {' '.join(args)}`  ",
             f"{len(keys)} configurations, Poisson arrivals, seed 0, "
             f"{rows[0]['_duration']:g} simulated seconds per run after a "
             f"{rows[0]['_warmup']:g} s warm-up; wall time {wall_s:.0f} s.", "",
             "| metric | value |", "| --- | --- |"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "## Per configuration", "",
              "p50 at 20 %: mean over the group's models of the median latency at 20 % of each "
              "model's planned capacity (ms), old policy / work-conserving; work: the same "
              "mean of the batch-1 execution + transfer time of each model's fastest "
              "pipeline; own: the largest over the group's models of the median, over "
              "requests, of latency / the batch-1 execution + transfer time of the pipeline "
              "that served the request, at 20 % (old / work-conserving).  LF: load factor at 99 %, old policy / work-conserving (today's "
              "plans).  Goodput: req/s, today's plans + old policy vs the new plans + "
              "work-conserving policy.", "",
              "| group | cluster | p50 @20 % old / new (ms) | work (ms) | own old / new | "
              "LF old / new | goodput ppipe / beyond (req/s) | ratio | margin |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g, c in keys:
        o, w, n = (idx.get((v, g, c)) for v in VARIANTS)
        if not (o and w and n):
            continue
        work = sum(o["batch1_work_ms"].values()) / len(o["batch1_work_ms"])
        ratio = n["goodput_rps"] / o["goodput_rps"] if o["goodput_rps"] else float("nan")
        own_o = max(o["own_pipeline_ratio_p50_by_load"]["0.2"].values())
        own_w = max(w["own_pipeline_ratio_p50_by_load"]["0.2"].values())
        lines.append(f"| {g} | {c} | {o['p50_ms_at_20pct']:.1f} / {w['p50_ms_at_20pct']:.1f} | "
                     f"{work:.1f} | {own_o:.2f} / {own_w:.2f} | {o['load_factor']:.3f} / {w['load_factor']:.3f} | "
                     f"{o['goodput_rps']:.0f} / {n['goodput_rps']:.0f} | {ratio:.3f} | "
                     f"{n['slo_margin']} |")
    gt = bursty_goodput_table(bursty_dir) if bursty_dir else []
    if gt:
        lines += ["", "## Goodput under bursty arrivals (today's plans + PPipe's wait vs the new "
                  "plans + work-conserving; plans tuned under Poisson)", ""] + gt
    bt = bursty_table(bursty_dir) if bursty_dir else []
    if bt:
        lines += ["", "## Bursty arrivals (approximation of the paper's Azure Functions 2021 "
                  "trace, which is not available here)", ""] + bt
    return lines


def _write_doc(path, lines) -> None:
    """Write the report above the doc's ``<!-- notes -->`` marker, keeping what follows it."""
    path = Path(path)
    existing = path.read_text() if path.is_file() else ""
    notes = existing.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in existing else "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n<!-- notes -->" + notes)


def main(argv=None) -> int:
    from ppipe_trt.cluster import load_paper_setting
    from ppipe_trt.profiles import default_profiles_dir
    from reproduce_paper import _configs
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=str(default_profiles_dir()))
    ap.add_argument("--only", nargs="*", default=None, help="GROUP:CLUSTER, e.g. 2:L4-T4")
    ap.add_argument("--plans-dir", default=None,
                    help="reuse/save plans here (g{G}_{CLUSTER}_ppipe.json / _beyond.json)")
    ap.add_argument("--json", default=None, help="write the rows and summary here")
    ap.add_argument("--doc", default=None, help="write the markdown report here")
    ap.add_argument("--bursty-dir", default=None,
                    help="folder of reproduce_paper.py --json outputs named ARRIVALS.json")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rel-tol", type=float, default=0.02, help="goodput search precision")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--arrivals", default="poisson", choices=ARRIVALS,
                    help="arrival process of every run (default poisson)")
    ap.add_argument("--goodput-only", action="store_true",
                    help="only the goodput of today's plans vs the new ones (e.g. under bursty "
                         "--arrivals); rows go to --json, the doc is not written")
    ap.add_argument("--report-only", action="store_true",
                    help="simulate nothing: rewrite --doc from the rows in --json (e.g. once "
                         "the bursty runs are in --bursty-dir)")
    args = ap.parse_args(argv)
    if args.report_only:
        if not (args.json and args.doc):
            print("--report-only needs --json (rows to read) and --doc", file=sys.stderr)
            return 2
        data = json.loads(Path(args.json).read_text())
        _write_doc(args.doc, report(data["rows"], data["summary"], args.bursty_dir,
                                    data.get("command", []), data.get("wall_s", 0.0)))
        return 0
    setting = load_paper_setting(args.profiles)
    configs = _configs(setting, set(args.only) if args.only else None)
    if not configs:
        print(f"no configuration matches {args.only}", file=sys.stderr)
        return 2
    sim = {"duration_s": args.duration, "warmup_s": args.warmup, "seed": args.seed,
           "rel_tol": args.rel_tol, "arrivals": args.arrivals,
           "goodput_only": args.goodput_only}
    jobs = [(args.profiles, g, c, args.plans_dir, sim) for g, c in configs]
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for out in ex.map(_measure, jobs):
            if args.goodput_only:
                rows.extend(out)
                o, n = out
                print(f"{o['group']}:{o['cluster']:<9} {args.arrivals} goodput "
                      f"{o['goodput_rps']:7.0f} -> {n['goodput_rps']:7.0f} "
                      f"({n['goodput_rps'] / max(o['goodput_rps'], 1e-9):.3f})", flush=True)
                continue
            for r in out:
                r["_duration"], r["_warmup"] = args.duration, args.warmup
            rows.extend(out)
            o, w, n = out
            print(f"{o['group']}:{o['cluster']:<9} p50@20% {o['p50_ms_at_20pct']:6.1f} -> "
                  f"{w['p50_ms_at_20pct']:6.1f} ms  LF {o['load_factor']:.3f} -> "
                  f"{w['load_factor']:.3f}  goodput {o['goodput_rps']:7.0f} -> "
                  f"{n['goodput_rps']:7.0f} ({n['goodput_rps'] / max(o['goodput_rps'], 1e-9):.3f})"
                  f"  {o['wall_s']:.0f} s", flush=True)
    wall = time.perf_counter() - t0
    if args.goodput_only:
        summary = summarise(rows)
        summary["arrivals"] = args.arrivals
        print(json.dumps(summary))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary,
                                                   "command": sys.argv[1:] if argv is None
                                                   else list(argv), "wall_s": wall}, indent=1))
        return 0
    summary = summarise(rows)
    for k, v in summary.items():
        print(f"{k:<36} {v:.4f}" if isinstance(v, float) else f"{k:<36} {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    command = sys.argv[1:] if argv is None else list(argv)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary,
                                               "command": command, "wall_s": wall}, indent=1))
    lines = report(rows, summary, args.bursty_dir, command, wall)
    if args.doc:
        _write_doc(args.doc, lines)
    else:
        print("\n".join(lines[lines.index("## Per configuration"):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
