"""``ppipe serve`` as a server under test: build its engines, start it, read its banner.

The server is this checkout's ``ppipe`` run by the benchmark's interpreter, from the checkout
root (the engine store ``engines/`` is relative to it), on loopback ports picked free.  Its
start-up banner states the plan's capacity ("... normalized throughput 803.7 req/s") and each
model's SLO; :attr:`PpipeServer.capacity_line` keeps the first line naming a rate.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ppipe_trt.bench.errors import BenchError, ServerStartError
from ppipe_trt.bench.supervisor import LOOPBACK, ServerProcess, free_port, http_ready, log_tail

CHECKOUT = Path(__file__).resolve().parents[2]
_RATE = re.compile(r"\breq/s\b")


def ppipe_command() -> list[str]:
    """How to run this checkout's ``ppipe`` with the running interpreter."""
    script = Path(sys.executable).parent / "ppipe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ppipe_trt.cli"]


def build_engines(repository: Path | str, models: Sequence[str], timeout_s: float = 3600.0
                  ) -> str:
    """``ppipe engines build --model-repository DIR --model NAME ...`` (what ``make engines``
    runs; an up-to-date build is reused in a second); returns its output.  Raises
    :class:`BenchError` with the output's tail when it fails."""
    command = [*ppipe_command(), "engines", "build", "--model-repository",
               str(Path(repository).resolve()), "--quiet"]
    for model in models:
        command += ["--model", model]
    try:
        done = subprocess.run(command, cwd=CHECKOUT, capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"`{' '.join(command)}` failed: {exc}") from None
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        tail = "\n".join(out.splitlines()[-15:])
        raise BenchError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n{tail}")
    return out


class PpipeServer:
    """``ppipe serve --model-repository DIR --model NAME... --slots N`` as a context
    manager, with HTTP and gRPC on free loopback ports; ``extra_args`` are appended as given
    (e.g. ``--slo-ms 50``); ``nice`` > 0 runs it at lower priority.  The log is
    ``<work_dir>/ppipe-serve.log``."""

    def __init__(self, repository: Path | str, models: Sequence[str], slots: int,
                 work_dir: Path | str, extra_args: Sequence[str] = (),
                 startup_timeout_s: float = 600.0, nice: int = 0):
        self.repository = Path(repository).resolve()
        self.nice = nice
        self.models = list(models)
        self.slots = slots
        self.work_dir = Path(work_dir)
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.http_port = self.grpc_port = 0
        self.startup_s: float | None = None
        self._process: ServerProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "ppipe-serve.log"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("ppipe serve is not started")
        return self._process.pid

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    def command(self) -> list[str]:
        command = [*ppipe_command(), "serve", "--model-repository", str(self.repository),
                   "--slots", str(self.slots), "--host", LOOPBACK,
                   "--port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        for model in self.models:
            command += ["--model", model]
        return command + self.extra_args

    def start(self) -> "PpipeServer":
        self.http_port, self.grpc_port = free_port(), free_port()
        self._process = ServerProcess("ppipe serve", self.command(), self.log_path,
                                      cwd=CHECKOUT, nice=self.nice).start()
        self.startup_s = self._process.wait_ready(
            lambda: http_ready(f"http://{self.http_url}/v2/health/ready"),
            self.startup_timeout_s)
        return self

    def banner(self) -> str:
        """What the server printed so far (its start-up lines)."""
        return log_tail(self.log_path, 200)

    def capacity_line(self) -> str | None:
        """The first banner line naming a rate (the plan's capacity), stripped."""
        return next((line.strip() for line in self.banner().splitlines() if _RATE.search(line)),
                    None)

    def slo_ms(self, model: str) -> float | None:
        """The SLO the banner states for ``model`` ("demo_resnet (SLO 50.0 ms)")."""
        match = re.search(rf"{re.escape(model)} \(SLO ([0-9.]+) ms\)", self.banner())
        return float(match.group(1)) if match else None

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(grace_s=15.0)

    def __enter__(self) -> "PpipeServer":
        try:
            return self.start()
        except ServerStartError:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["PpipeServer", "build_engines", "ppipe_command"]
