"""CPU accounting of process trees from ``/proc`` (Linux), and of this process.

A server under test is a process tree: ``tritonserver`` and its Python-backend stubs, ``ppipe
serve`` and its front-end processes.  :func:`tree_cpu_s` adds, over the root and every live
descendant, ``utime + stime`` (all threads) and ``cutime + cstime`` (children that process has
reaped).  A descendant that exits and is reaped by its parent between two samples therefore
still counts, through the parent's ``cutime``.  Known limitation: a descendant that exits
unreaped by the tree (re-parented to init after its parent died) loses the CPU it spent
since the previous sample.

The client side is this process: :func:`self_cpu_s` (``getrusage(RUSAGE_SELF)``, every
thread; the servers are children of this process but ``RUSAGE_SELF`` never includes them).
The machine as a whole: :func:`host_busy_cpu_s` (``/proc/stat``), so that a measurement can
say how much CPU processes outside it took meanwhile (a shared machine).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """One process's ``/proc/<pid>/stat`` CPU fields, in seconds."""

    pid: int
    ppid: int
    own_cpu_s: float            # utime + stime: every thread of the process
    reaped_children_cpu_s: float  # cutime + cstime: children it has waited for


def read_proc_stat(pid: int) -> ProcStat:
    """The CPU fields of ``pid``; raises ``ProcessLookupError`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(f"process {pid} does not exist") from None
    # the command name (field 2) is in parentheses and may hold spaces and parentheses
    fields = text[text.rindex(")") + 2:].split()  # field 3 (state) on
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return ProcStat(pid, ppid, (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK)


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (one scan of ``/proc``), root first."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = read_proc_stat(int(name))
        except (ProcessLookupError, PermissionError, ValueError, IndexError):
            continue
        children.setdefault(stat.ppid, []).append(stat.pid)
    tree, frontier = [root], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        tree.extend(kids)
        frontier.extend(kids)
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds spent so far by ``root``'s tree (see the module docstring for what is
    counted); raises ``ProcessLookupError`` when ``root`` itself is gone."""
    total = 0.0
    for pid in process_tree(root):
        try:
            stat = read_proc_stat(pid)
        except ProcessLookupError:
            if pid == root:
                raise
            continue  # exited since the scan: its parent's cutime will hold it once reaped
        total += stat.own_cpu_s + stat.reaped_children_cpu_s
    return total


def self_cpu_s() -> float:
    """CPU seconds of this process so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class CpuReading:
    """CPU seconds of a tree (or this process) at a wall-clock instant (``time.monotonic``)."""

    cpu_s: float
    wall_s: float

    def share_since(self, earlier: "CpuReading") -> float:
        """Cores used on average between ``earlier`` and this reading (1.0 = one full core)."""
        wall = self.wall_s - earlier.wall_s
        return (self.cpu_s - earlier.cpu_s) / wall if wall > 0 else 0.0


def host_busy_cpu_s() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``:
    user + nice + system + irq + softirq + steal; guest time is inside user)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    if fields[0] != "cpu":
        raise OSError(f"/proc/stat starts with {fields[0]!r}; expected the 'cpu' line")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def read_host() -> CpuReading:
    """The whole machine's busy CPU now: the cores other processes took from a measurement
    are ``read_host()`` minus the processes measured."""
    return CpuReading(host_busy_cpu_s(), time.monotonic())


def read_tree(root: int) -> CpuReading:
    return CpuReading(tree_cpu_s(root), time.monotonic())


def read_self() -> CpuReading:
    return CpuReading(self_cpu_s(), time.monotonic())


def idle_share(root: int, seconds: float) -> float:
    """Cores ``root``'s tree uses over ``seconds`` of wall time while nobody talks to it."""
    first = read_tree(root)
    time.sleep(seconds)
    return read_tree(root).share_since(first)


def wait_until_quiet(root: int, below_cores: float = 0.05, window_s: float = 0.2,
                     timeout_s: float = 30.0) -> float:
    """Block until ``root``'s tree uses less than ``below_cores`` over one ``window_s``
    window (a server working off a backlog after a load point); returns the seconds waited.
    Gives up (returns) after ``timeout_s``: the caller records the wait and goes on."""
    start = time.monotonic()
    previous = read_tree(root)
    while time.monotonic() - start < timeout_s:
        time.sleep(window_s)
        current = read_tree(root)
        if current.share_since(previous) < below_cores:
            break
        previous = current
    return time.monotonic() - start


def others_share(exclude_roots: Sequence[int], window_s: float) -> float:
    """Cores the rest of the machine used over ``window_s`` (blocks that long): busy CPU
    less this process and the trees of ``exclude_roots``."""
    host0, self0 = read_host(), read_self()
    trees0 = [read_tree(pid) for pid in exclude_roots]
    time.sleep(window_s)
    mine = read_self().share_since(self0)
    mine += sum(read_tree(pid).share_since(t0) for pid, t0 in zip(exclude_roots, trees0))
    return max(0.0, read_host().share_since(host0) - mine)


def wait_for_quiet_host(exclude_roots: Sequence[int], below_cores: float,
                        window_s: float = 1.0, timeout_s: float = 60.0) -> tuple[float, float]:
    """Block until the rest of the machine (see :func:`others_share`) used less than
    ``below_cores`` over one window, or ``timeout_s`` passed; returns (seconds waited, the
    last window's share).  A shared machine: measure when the other users pause."""
    start = time.monotonic()
    while True:
        share = others_share(exclude_roots, window_s)
        if share < below_cores or time.monotonic() - start >= timeout_s:
            return time.monotonic() - start, share


__all__ = ["ProcStat", "CpuReading", "read_proc_stat", "process_tree", "tree_cpu_s",
           "self_cpu_s", "host_busy_cpu_s", "read_tree", "read_self", "read_host", "idle_share",
           "wait_until_quiet", "others_share", "wait_for_quiet_host", "CLK_TCK"]
