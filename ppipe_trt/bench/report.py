"""Reports of the ppipe-vs-Triton comparison: a table per model (console and markdown), the
JSON records, a goodput-vs-offered-load figure, and the markdown page around them.

Inputs are :class:`~ppipe_trt.bench.vs_triton.ModelResult` objects and the records of
:func:`~ppipe_trt.bench.vs_triton.aggregate` (medians over repeats).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ppipe_trt.bench.vs_triton import PPIPE, TRITON, ModelResult

CHECKOUT = Path(__file__).resolve().parents[2]
SERVER_LABELS = {TRITON: "Triton", PPIPE: "ppipe"}


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Where and how a run was made (the report's header)."""

    command: str
    date: str
    host: str
    commit: str
    note: str | None = None


def git_commit(root: Path = CHECKOUT) -> str:
    """``<short hash>`` of HEAD, with "+ uncommitted changes" when tracked files differ."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def host_note() -> str:
    """CPU model, cores, load average now, Python and library versions."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except ImportError:
        ort = "absent"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, load average {load} at the start; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
            f"onnxruntime {ort}")


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _rejected(record: dict) -> str:
    if not record["rejected"]:
        return "0"
    codes = ", ".join(f"{c} {v:g}" for c, v in record["rejections"].items() if v)
    return f"{record['rejected']:g} ({codes})" if codes else f"{record['rejected']:g}"


TABLE_HEADER = ("offered req/s", "x cap", "server", "goodput req/s", "vs Triton",
                "within SLO %", "rejected", "unanswered", "p50 ms", "p99 ms",
                "server CPU us/req", "server CPU %", "client CPU %", "other CPU %")


def table_rows(records: Sequence[dict]) -> list[tuple[str, ...]]:
    """One row per (load, server), Triton first; ``vs Triton``: ppipe's goodput over
    Triton's at the same load."""
    triton = {r["load_factor"]: r for r in records if r["server"] == TRITON}
    rows = []
    for r in sorted(records, key=lambda r: (r["load_factor"], r["server"] != TRITON)):
        base = triton.get(r["load_factor"])
        ratio = (r["goodput_rps"] / base["goodput_rps"]
                 if r["server"] != TRITON and base and base["goodput_rps"] else None)
        label = SERVER_LABELS.get(r["server"], r["server"])
        label += " !" if r.get("client_fell_behind") else ""
        rows.append((_fmt(r["offered_rps"]), f"{r['load_factor']:g}", label,
                     _fmt(r["goodput_rps"]),
                     _fmt(ratio, ".2f"), _fmt(100 * r["within_slo"], ".2f"), _rejected(r),
                     f"{r['unanswered']:g}", _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                     _fmt(r["cpu_us_per_request"], ".0f"), _fmt(r["server_cpu_pct"], ".0f"),
                     _fmt(r["client_cpu_pct"], ".0f"), _fmt(r.get("other_cpu_pct"), ".0f")))
    return rows


def markdown_table(records: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join("---:" if i != 2 else "---" for i in range(len(TABLE_HEADER))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


def console_table(records: Sequence[dict]) -> str:
    """The table in aligned plain-text columns."""
    rows = [TABLE_HEADER, *table_rows(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(cell.rjust(w) if i != 2 else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def write_json(path: Path | str, records: Sequence[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(list(records), indent=1) + "\n")


def write_png(path: Path | str, results: Sequence[ModelResult],
              records: Sequence[dict]) -> None:
    """Goodput against offered load, both servers, one panel per model (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        mine = [r for r in records if r["model"] == result.model]
        top = max([r["offered_rps"] for r in mine] + [1.0])
        ax.plot([0, top], [0, top], color="0.8", lw=1, ls="--", label="offered")
        for server, style in ((TRITON, "o-"), (PPIPE, "s-")):
            pts = sorted((r["offered_rps"], r["goodput_rps"]) for r in mine
                         if r["server"] == server)
            if pts:
                ax.plot(*zip(*pts), style, label=SERVER_LABELS[server])
        ax.axvline(result.capacity_rps, color="0.6", lw=1, ls=":",
                   label=f"Triton 99 % capacity {result.capacity_rps:.0f}")
        ax.set_title(f"{result.model} (SLO {result.slo_ms:g} ms, {result.workers} workers)")
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("goodput: answers within SLO (req/s)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_section(result: ModelResult, records: Sequence[dict]) -> str:
    lines = [f"## {result.model}", ""]
    lines.append(f"- SLO {result.slo_ms:g} ms ({result.slo_source}); {result.workers} workers: "
                 f"`ppipe serve --slots {result.workers}`, Triton `instance_group "
                 f"[{{count: {result.workers}, kind: KIND_CPU}}]`, dynamic batching "
                 + (f"rejecting requests queued over {result.triton_queue_timeout_ms:g} ms"
                    if result.triton_queue_timeout_ms else "with no queue timeout")
                 + f"; both servers at niceness {result.server_nice}")
    if result.capacity is not None:
        probes = ", ".join(f"{p.rate_rps:.0f} -> {100 * p.within_slo:.1f} %"
                           for p in result.capacity.probes)
        failed = (f"; smallest failing {result.capacity.failed_rps:.1f}"
                  if result.capacity.failed_rps else "")
        lines.append(f"- Triton 99 % capacity: **{result.capacity_rps:.1f} req/s**{failed} "
                     f"(probes, req/s -> within SLO: {probes})")
    else:
        lines.append(f"- Triton 99 % capacity: **{result.capacity_rps:.1f} req/s** (given)")
    lines.append(f"- ppipe printed capacity: `{result.ppipe_capacity_line or 'none printed'}`")
    lines.append(f"- tritonserver {result.triton_version or '?'}; start-up "
                 + ", ".join(f"{SERVER_LABELS[k]} {v:.1f} s" for k, v in result.startup_s.items())
                 + "; serial round trip "
                 + ", ".join(f"{SERVER_LABELS[k]} {v:.1f} ms" for k, v in result.serial_ms.items())
                 + "; idle CPU "
                 + ", ".join(f"{SERVER_LABELS[k]} {v:.1f} %" for k, v in
                             result.idle_cpu_pct.items()))
    for warning in result.warnings:
        lines.append(f"- **warning**: {warning}")
    lines += ["", markdown_table(records), ""]
    if any(r.get("client_fell_behind") for r in records):
        lines += ["! the client sent late (send lag p99 above 5 ms or a tenth of the SLO; "
                  "`send_lag_p99_ms` in the JSON): the load reached the server later than "
                  "scheduled, and latencies include the lag.", ""]
    return "\n".join(lines)


METHOD = """\
Method:

- Servers: the same ONNX model served by `ppipe serve --slots N` and by a real Triton
  Inference Server (tritonserver from the `nvidia-pytriton` wheel: Python backend running ONNX
  Runtime on CPU, N instances of one intra-op thread, dynamic batching, the config's max
  batch), on the same cores.  Only one server is loaded at a time (the other idles, its CPU
  is recorded); the order alternates per point; both run niced (`--server-nice`, default 10)
  so that the client sharing their cores keeps its schedule (nothing changes while a core is
  free).
- Client: one open-loop Poisson generator (gRPC, batch-1 requests of random input); the same
  seed, hence the same arrival times, for both servers at a point.  At low load goodput is
  the realized arrival rate, which is Poisson (+-sqrt(n) around the offered rate).
- Offered loads are multiples of Triton's 99 % capacity: the largest rate with >= 99 % of
  requests answered within the SLO (doubling, then bisection, short probes; a failing probe is
  measured again and the best of up to three tries counts, as disturbances only lower it).
- Goodput: answers within the SLO per second offered.  Within SLO %: of all requests sent.
  Latency counts from each request's scheduled send time.  Rejected: error answers by gRPC
  code; unanswered: cancelled 2 x SLO after the last send.
- Server CPU: the server's process tree (/proc) from the start of a point until it is quiet
  again, per successful answer and in % of one core.  Client CPU: the generator's process.
  Other CPU: the rest of the machine meanwhile (busy cores from /proc/stat less the servers
  and the client); above ~10 % the machine was shared and the figures are low.  Before each
  point the benchmark waits (up to a limit) until other processes use under a quarter core.
- Figures are medians over the repeats; the JSON holds every repeat."""


def write_markdown(path: Path | str, info: RunInfo, results: Sequence[ModelResult],
                   records: Sequence[dict], png_path: Path | str | None = None) -> None:
    title = "# ppipe serve vs Triton Inference Server: goodput against offered load (CPU)"
    lines = [title, ""]
    if info.note:
        lines += [f"**{info.note}**", ""]
    lines += [f"- date: {info.date}", f"- commit: {info.commit}", f"- host: {info.host}",
              f"- command: `{info.command}`", "", METHOD, ""]
    if png_path:
        rel = os.path.relpath(Path(png_path).resolve(), Path(path).resolve().parent)
        lines += [f"![goodput vs offered load]({rel})", ""]
    for result in results:
        lines.append(model_section(result, [r for r in records if r["model"] == result.model]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines).rstrip() + "\n")


def command_line(argv: Sequence[str] | None = None) -> str:
    import shlex

    argv = list(sys.argv if argv is None else argv)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *argv])


__all__ = ["RunInfo", "git_commit", "host_note", "markdown_table", "console_table",
           "table_rows", "write_json", "write_png", "write_markdown", "model_section",
           "command_line"]
