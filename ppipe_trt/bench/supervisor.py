"""One server under test as a subprocess: start, wait until ready, stop, read its log.

Each server runs in its own session (process group), so that stopping it ends its whole tree
(Triton's Python-backend stubs, ``ppipe serve``'s front-end processes) and nothing else.  The
log (stdout and stderr together) goes to a file; a server that exits or is not ready in time
raises :class:`ServerStartError` ending with the log's tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ppipe_trt.bench.errors import ServerStartError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback interface now (another process may take it before it
    is bound again: callers start the server at once and fail loudly when it is taken)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def http_ready(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET ``url`` answers 200 (a KServe v2 ``/v2/health/ready``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ('' when there is none yet)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from ``/proc``)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(name))
    return members


class ServerProcess:
    """A server subprocess owned by the benchmark; a context manager that stops it.

    ``name`` labels messages ("tritonserver", "ppipe serve"); ``log_path`` receives stdout and
    stderr; ``nice`` > 0 runs the server (every thread and child it starts) at that lower
    priority, so that a load generator sharing its cores keeps its schedule.  :meth:`start`
    returns at once; :meth:`wait_ready` polls a readiness check.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, nice: int = 0):
        self.name = name
        # nice(1) execs the command: the pid stays the server's
        prefix = ["nice", "-n", str(int(nice))] if nice else []
        self.command = prefix + [str(c) for c in command]
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "ServerProcess":
        if self._proc is not None:
            raise RuntimeError(f"{self.name} is already started (pid {self._proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            try:
                self._proc = subprocess.Popen(self.command, stdout=log,
                                              stderr=subprocess.STDOUT, env=self.env,
                                              cwd=self.cwd, start_new_session=True)
            except OSError as exc:
                raise ServerStartError(f"{self.name}: cannot run {self.command[0]}: {exc}"
                                       ) from None
        return self

    def wait_ready(self, check: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``check()`` every 0.2 s until it is true; returns the seconds it took.
        Raises :class:`ServerStartError` with the log's tail when the process exits first
        or ``timeout_s`` passes."""
        start = time.monotonic()
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise ServerStartError(
                    f"{self.name} exited with code {code} before it was ready; log "
                    f"{self.log_path}, last lines:\n{log_tail(self.log_path)}")
            if check():
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                self.stop()
                raise ServerStartError(
                    f"{self.name} was not ready within {timeout_s:.0f} s (stopped it); log "
                    f"{self.log_path}, last lines:\n{log_tail(self.log_path)}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; returns the exit code
        (None when never started)."""
        proc = self._proc
        if proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # the leader may be gone while members of its group still run (a stub that ignored
        # SIGTERM, or outlived a leader that exited on its own): end them too
        if _group_members(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return proc.returncode

    def __enter__(self) -> "ServerProcess":
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["ServerProcess", "free_port", "http_ready", "log_tail", "LOOPBACK"]
