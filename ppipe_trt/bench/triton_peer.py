"""A real Triton Inference Server beside ``ppipe serve``: locate or install it, and run it.

Triton comes from the ``nvidia-pytriton`` wheel (PyPI), which carries a complete
``tritonserver`` binary (2.51 in 0.7.0) with its Python backend and a backend stub per Python
version (3.8-3.13).  It runs on a CPU-only Linux x86-64 machine with glibc >= 2.35 (the wheel
is ``manylinux_2_35_x86_64``) and a Python built with a shared ``libpython`` (the stub links
it).  The wheel is installed with ``pip install --no-deps --target`` into a cache folder of its
own (default ``<checkout>/.cache/triton/nvidia-pytriton-<version>``; ``$PPIPE_TRITON_HOME``
names another folder holding such an install, used as it is), never into the project's
environment: its dependencies would disturb ours and only its binaries are used.

Running it (:class:`TritonServer`):

* ``LD_LIBRARY_PATH`` = the wheel's ``nvidia_pytriton.libs`` + this Python's ``LIBDIR`` (the
  stub embeds ``libpython3.X``);
* ``--backend-directory``: a copy of the wheel's ``backends/python`` with the stub of the
  running Python (``python_backend_stubs/<major.minor>/``);
* loopback addresses, ports picked free, metrics off, ``--exit-timeout-secs 5``; ready when
  ``GET /v2/health/ready`` answers 200 (strict readiness: every model loaded).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ppipe_trt.bench.errors import ServerStartError, TritonUnavailableError
from ppipe_trt.bench.supervisor import LOOPBACK, ServerProcess, free_port, http_ready, log_tail

PYTRITON_VERSION = "0.7.0"
PYTRITON_REQUIREMENT = f"nvidia-pytriton=={PYTRITON_VERSION}"
HOME_ENV = "PPIPE_TRITON_HOME"
CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = CHECKOUT / ".cache" / "triton"
_COMPLETE = ".complete"  # written last: an interrupted install is redone


def python_tag() -> str:
    """``major.minor`` of the running Python (the stub folder's name)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True, slots=True)
class TritonInstall:
    """An unpacked nvidia-pytriton wheel (the ``pip --target`` folder)."""

    root: Path

    @property
    def server_binary(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs_dir(self) -> Path:
        return self.root / "nvidia_pytriton.libs"

    @property
    def python_backend_dir(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "backends" / "python"

    def stub(self, tag: str | None = None) -> Path:
        return (self.root / "pytriton" / "tritonserver" / "python_backend_stubs"
                / (tag or python_tag()) / "triton_python_backend_stub")

    def stub_versions(self) -> list[str]:
        folder = self.root / "pytriton" / "tritonserver" / "python_backend_stubs"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def library_path(self) -> str:
        """``LD_LIBRARY_PATH`` for the server and its stubs (any inherited value last)."""
        parts = [str(self.libs_dir), sysconfig.get_config_var("LIBDIR") or ""]
        parts.append(os.environ.get("LD_LIBRARY_PATH", ""))
        return os.pathsep.join(p for p in parts if p)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": self.library_path()}

    def backend_directory(self) -> Path:
        """A ``--backend-directory`` whose ``python/`` holds the Python backend and the stub
        of the running Python (made once per Python version, inside the install)."""
        tag = python_tag()
        folder = self.root / f"backends-py{tag}"
        target = folder / "python"
        if not (target / "triton_python_backend_stub").is_file():
            stub = self.stub(tag)
            if not stub.is_file():
                raise TritonUnavailableError(
                    f"{self.root} has no Triton Python-backend stub for Python {tag} (it has "
                    f"{self.stub_versions()}); run the benchmark with one of those versions")
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.python_backend_dir, tmp / "python",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        return folder

    def missing(self) -> list[str]:
        """Files a usable install must have that this one lacks."""
        needed = [self.server_binary, self.libs_dir,
                  self.python_backend_dir / "libtriton_python.so"]
        return [str(p) for p in needed if not p.exists()]


def _check_links(install: TritonInstall) -> None:
    """Fail now, with the loader's words, when the server or the stub cannot load a
    library (a Python built without ``libpython3.X.so``, a libc too old for the wheel)."""
    if shutil.which("ldd") is None:
        return
    for binary in (install.server_binary, install.stub()):
        if not binary.is_file():
            continue
        out = subprocess.run(["ldd", str(binary)], env=install.environment(),
                             capture_output=True, text=True)
        missing = [line.strip() for line in out.stdout.splitlines() if "not found" in line]
        if missing:
            raise TritonUnavailableError(
                f"{binary} cannot load {missing} with LD_LIBRARY_PATH={install.library_path()}"
                " (the stub needs this Python's shared libpython: a Python built with "
                "--enable-shared)")


def install_dir(cache_dir: Path | str | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / f"nvidia-pytriton-{PYTRITON_VERSION}"


def locate_triton(cache_dir: Path | str | None = None) -> TritonInstall | None:
    """The install named by ``$PPIPE_TRITON_HOME``, else the cached one; None when there is
    no complete install."""
    home = os.environ.get(HOME_ENV)
    if home:
        install = TritonInstall(Path(home))
        if install.missing():
            raise TritonUnavailableError(
                f"${HOME_ENV}={home} is not an unpacked nvidia-pytriton wheel: missing "
                f"{install.missing()}; unset it to install {PYTRITON_REQUIREMENT} into "
                f"{install_dir(cache_dir)}")
        return install
    root = install_dir(cache_dir)
    if (root / _COMPLETE).is_file() and not TritonInstall(root).missing():
        return TritonInstall(root)
    return None


def ensure_triton(cache_dir: Path | str | None = None, pip_args: tuple[str, ...] = ()
                  ) -> TritonInstall:
    """A usable Triton install: the located one, or ``pip install --no-deps --target``
    of :data:`PYTRITON_REQUIREMENT` into the cache (once; concurrent callers wait on a file
    lock).  Raises :class:`TritonUnavailableError` saying why when that fails."""
    if not sys.platform.startswith("linux"):
        raise TritonUnavailableError(f"tritonserver from {PYTRITON_REQUIREMENT} runs on "
                                     f"Linux only (this is {sys.platform})")
    root = install_dir(cache_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        install = locate_triton(cache_dir) or _pip_install(root, pip_args)
        install.backend_directory()
    _check_links(install)
    return install


def _pip_install(root: Path, pip_args: tuple[str, ...]) -> TritonInstall:
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--target", str(tmp), PYTRITON_REQUIREMENT, *pip_args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TritonUnavailableError(f"installing {PYTRITON_REQUIREMENT} failed: {exc}") from None
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise TritonUnavailableError(
            f"`{' '.join(command)}` failed (exit {done.returncode}); tritonserver comes from "
            "that wheel (PyPI, manylinux_2_35_x86_64: Linux x86-64 with glibc >= 2.35). pip "
            f"said:\n{tail}")
    install = TritonInstall(tmp)
    if install.missing():
        raise TritonUnavailableError(f"{PYTRITON_REQUIREMENT} installed into {tmp} but lacks "
                                     f"{install.missing()}; its layout changed")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    (root / _COMPLETE).write_text(PYTRITON_REQUIREMENT + "\n")
    return TritonInstall(root)


_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$')
# logged on every machine without a GPU, harmless
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)


def triton_errors(log: str, limit: int = 400) -> list[str]:
    """The error lines of a Triton log (``E...`` lines without the benign ones, each cut at
    its first embedded traceback and at ``limit`` characters), then its final ``error:``."""
    found = []
    for line in log.splitlines():
        match = _ERROR_LINE.match(line)
        text = match.group(1) if match else (line if line.startswith("error:") else None)
        if text is None or any(b in text for b in _BENIGN_ERRORS):
            continue
        text = text.split("\\n\\nAt:")[0].replace("\\n", " ").strip()
        found.append(text[:limit])
    return found


_SHM_REGION = re.compile(r"^triton_python_backend_shm_region_[0-9a-f-]+$")
_PORT_TAKEN = "already in use"


class TritonServer:
    """``tritonserver`` on a model repository, as a context manager.

    ``work_dir`` receives the log (``tritonserver.log``).  :attr:`grpc_url` and
    :attr:`http_url` are ``127.0.0.1:PORT``; :attr:`pid` roots the process tree (the server
    and one stub process per model instance); ``nice`` > 0 runs them all at lower priority.
    """

    def __init__(self, install: TritonInstall, model_repository: Path | str, work_dir: Path |
                 str, startup_timeout_s: float = 180.0, extra_args: tuple[str, ...] = (),
                 nice: int = 0):
        self.install = install
        self.nice = nice
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir)
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = tuple(extra_args)
        self.http_port = self.grpc_port = 0
        self.startup_s: float | None = None
        self._process: ServerProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("tritonserver is not started")
        return self._process.pid

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [str(self.install.server_binary),
                "--model-repository", str(self.model_repository),
                "--backend-directory", str(self.install.backend_directory()),
                "--http-address", LOOPBACK, "--http-port", str(self.http_port),
                "--grpc-address", LOOPBACK, "--grpc-port", str(self.grpc_port),
                "--allow-metrics", "false", "--exit-timeout-secs", "5",
                "--strict-readiness", "true", "--log-verbose", "0",
                # no GPU: skip the pinned-memory pool (it only logs that CUDA is missing)
                "--pinned-memory-pool-byte-size", "0", *self.extra_args]

    def start(self) -> "TritonServer":
        """Start the server and wait until every model is loaded; a port taken meanwhile
        is retried twice with fresh ports."""
        for attempt in range(3):
            self.http_port, self.grpc_port = free_port(), free_port()
            self._process = ServerProcess("tritonserver", self.command(), self.log_path,
                                          env=self.install.environment(),
                                          nice=self.nice).start()
            try:
                self.startup_s = self._process.wait_ready(
                    lambda: http_ready(f"http://{self.http_url}/v2/health/ready"),
                    self.startup_timeout_s)
                return self
            except ServerStartError as exc:
                self._process.stop()
                log = log_tail(self.log_path, 400)
                if attempt < 2 and _PORT_TAKEN in log:
                    continue
                errors = triton_errors(log)
                if not errors:
                    raise
                raise ServerStartError("tritonserver did not start:\n" + "\n".join(errors)
                                       + f"\n{exc}") from None
        raise AssertionError("unreachable")

    def server_version(self) -> str | None:
        """Triton's version as its start-up table reports it (None before start)."""
        match = re.search(r"server_version\s*\|\s*(\S+)", log_tail(self.log_path, 400))
        return match.group(1) if match else None

    def _shm_regions(self) -> list[str]:
        """Shared-memory regions of the live stubs (their second argument)."""
        from ppipe_trt.bench.procs import process_tree

        regions = []
        for pid in process_tree(self.pid)[1:]:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(args) > 2 and _SHM_REGION.match(args[2].decode(errors="replace")):
                regions.append(args[2].decode())
        return regions

    def stop(self) -> None:
        """Stop the server and its stubs; removes the stubs' shared-memory regions a forced
        stop leaves in /dev/shm."""
        if self._process is None:
            return
        regions = self._shm_regions() if self._process.running else []
        self._process.stop(grace_s=15.0)
        for name in regions:
            path = Path("/dev/shm") / name
            if path.exists():
                path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["TritonInstall", "TritonServer", "ensure_triton", "locate_triton", "install_dir",
           "triton_errors",
           "python_tag", "PYTRITON_REQUIREMENT", "PYTRITON_VERSION", "DEFAULT_CACHE_DIR",
           "HOME_ENV"]
