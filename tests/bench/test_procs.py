"""CPU accounting of process trees from /proc (ppipe_trt/bench/procs.py): a descendant burning
CPU counts, also when it exits between two samples."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ppipe_trt.bench.procs import (host_busy_cpu_s, others_share, process_tree, read_proc_stat,
                                   read_self, read_tree, self_cpu_s, tree_cpu_s,
                                   wait_for_quiet_host, wait_until_quiet)

# a parent that starts a grandchild burning `burn` CPU seconds, reaps it, then sleeps
PARENT = """
import subprocess, sys, time
burn = float(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c",
    "import time\\nend = time.process_time() + %f\\nwhile time.process_time() < end: pass" % burn])
print(child.pid, flush=True)
child.wait()
print("reaped", flush=True)
time.sleep(60)
"""


def _spawn_parent(burn_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT, str(burn_s)], stdout=subprocess.PIPE,
                            text=True)


def test_a_grandchild_burning_cpu_is_counted_live_and_after_it_is_reaped():
    parent = _spawn_parent(0.6)
    try:
        grandchild = int(parent.stdout.readline())
        before = tree_cpu_s(parent.pid)
        assert grandchild in process_tree(parent.pid)
        time.sleep(0.2)
        assert tree_cpu_s(parent.pid) > before  # counted while it runs
        assert parent.stdout.readline().strip() == "reaped"
        assert grandchild not in process_tree(parent.pid)
        after = tree_cpu_s(parent.pid)
        # the grandchild is gone, its CPU stays in the parent's cutime
        assert after - before >= 0.4
        assert read_proc_stat(parent.pid).reaped_children_cpu_s >= 0.5
    finally:
        parent.kill()
        parent.wait()


def test_an_unknown_root_raises():
    parent = _spawn_parent(0.0)
    parent.kill()
    parent.wait()
    with pytest.raises(ProcessLookupError):
        tree_cpu_s(parent.pid)


def test_self_and_host_cpu_grow_with_work():
    host0, self0, reading = host_busy_cpu_s(), self_cpu_s(), read_self()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert self_cpu_s() - self0 >= 0.25
    assert host_busy_cpu_s() - host0 >= 0.25  # the machine includes this process
    assert 0.3 < read_self().share_since(reading) <= 1.5


def test_wait_until_quiet_returns_once_the_tree_idles():
    parent = _spawn_parent(0.5)
    try:
        parent.stdout.readline()
        waited = wait_until_quiet(parent.pid, below_cores=0.05, window_s=0.1, timeout_s=10)
        assert 0.1 <= waited < 5
        assert read_tree(parent.pid).cpu_s >= 0.4
    finally:
        parent.kill()
        parent.wait()


def test_the_rest_of_the_machine_excludes_the_measured_trees():
    parent = _spawn_parent(3.0)  # a grandchild burns most of a core for 3 s
    try:
        parent.stdout.readline()
        time.sleep(0.1)
        assert others_share([parent.pid], 0.5) < others_share([], 0.5) - 0.3
        waited, share = wait_for_quiet_host([], below_cores=0.01, window_s=0.2, timeout_s=0.5)
        assert waited >= 0.5 and share > 0.3  # gave up: the burner kept the machine busy
    finally:
        parent.kill()
        parent.wait()
