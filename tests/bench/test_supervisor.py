"""Server subprocesses (ppipe_trt/bench/supervisor.py): readiness, failure with the log's
tail, and a stop that ends the whole process group."""

from __future__ import annotations

import os
import sys
import time

import pytest

from ppipe_trt.bench.errors import ServerStartError
from ppipe_trt.bench.procs import process_tree
from ppipe_trt.bench.supervisor import ServerProcess, free_port, http_ready


def test_a_server_that_exits_fails_with_its_log(tmp_path):
    proc = ServerProcess("broken", [sys.executable, "-c",
                                    "print('cannot bind port 1234'); raise SystemExit(3)"],
                         tmp_path / "broken.log").start()
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*cannot bind port 1234"):
        proc.wait_ready(lambda: False, timeout_s=30)


def test_ready_then_stop_ends_the_group(tmp_path):
    port = free_port()
    server = (f"import http.server, subprocess, sys\n"
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"class H(http.server.BaseHTTPRequestHandler):\n"
              f"    def do_GET(self):\n"
              f"        self.send_response(200); self.end_headers()\n"
              f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    with ServerProcess("http", [sys.executable, "-c", server], tmp_path / "http.log") as proc:
        took = proc.wait_ready(lambda: http_ready(f"http://127.0.0.1:{port}/v2/health/ready"),
                               timeout_s=30)
        assert took < 30
        deadline = time.monotonic() + 10
        while len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        assert len(tree) == 2
    assert not proc.running
    for pid in tree:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_not_ready_in_time_is_stopped(tmp_path):
    proc = ServerProcess("sleepy", [sys.executable, "-c", "import time; time.sleep(600)"],
                         tmp_path / "sleepy.log").start()
    with pytest.raises(ServerStartError, match="not ready within 1 s"):
        proc.wait_ready(lambda: False, timeout_s=1)
    assert not proc.running


def test_nice_applies_to_the_server_and_what_it_starts(tmp_path):
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "time.sleep(600)\n")
    with ServerProcess("niced", [sys.executable, "-c", code], tmp_path / "n.log",
                       nice=7) as proc:
        deadline = time.monotonic() + 10
        while len(process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        assert len(tree) == 2
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in tree] == [7, 7]
