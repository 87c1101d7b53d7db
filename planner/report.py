"""A readable text summary of a plan (what ``ppipe plan`` prints)."""

from __future__ import annotations

from ppipe_trt.plan import Plan


def format_plan(plan: Plan) -> str:
    """Per model: pipelines -> stages (blocks, class, MPS, batch, workers, latency, transfer),
    throughput; then GPUs per class and the solver's figures."""
    classes = plan.cluster.gpu_classes
    have = {p.gpu_class: p.count for p in plan.cluster.pools}
    lines = [f"plan: {plan.scheduler} on {plan.cluster.label} "
             f"({', '.join(f'{have[c]} {c}' for c in classes)})"]
    for m in plan.models:
        gpus = ", ".join(f"{m.gpus_used.get(c, 0)} {c}" for c in classes)
        lines.append("")
        lines.append(f"{m.model}  SLO {m.slo_ms:.2f} ms  weight {m.weight:g}  "
                     f"throughput {m.throughput_rps:.1f} req/s  "
                     f"(normalized {m.throughput_rps / m.weight:.1f})  GPUs: {gpus}")
        lines.append(f"  {'pipe':>4} {'stage':>5} {'blocks':>7} {'class':>6} {'MPS':>3} "
                     f"{'batch':>5} {'workers':>7} {'lat ms':>8} {'xfer ms':>8} "
                     f"{'req/s':>9} {'e2e ms':>8}")
        for pi, p in enumerate(m.pipelines):
            for si, s in enumerate(p.stages):
                head = (f"  {pi:>4} " if si == 0 else f"  {'':>4} ")
                tail = (f" {p.throughput_rps:>9.1f} {p.latency_us / 1000:>8.2f}" if si == 0
                        else "")
                lines.append(
                    head + f"{si:>5} {f'{s.first_block}-{s.last_block}':>7} {s.gpu_class:>6} "
                    f"{s.mps_share:>3} {p.batch_size:>5} {s.workers:>7} "
                    f"{s.latency_us / 1000:>8.2f} {s.transfer_us / 1000:>8.2f}" + tail)
    lines.append("")
    used = ", ".join(f"{plan.gpus_used.get(c, 0)}/{have[c]} {c}" for c in classes)
    lines.append(f"normalized throughput (min over models of throughput / weight): "
                 f"{plan.normalized_throughput:.1f} req/s")
    lines.append(f"GPUs used: {used}")
    lines.append(f"solver: {plan.solver}  gap: {plan.mip_gap:.2e}  time: {plan.solve_s:.3f} s")
    return "\n".join(lines)
