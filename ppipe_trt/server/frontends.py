"""``ppipe serve --frontends N``: N processes answering HTTP and gRPC over one runtime.

The process ``ppipe serve`` starts owns the runtime and serves the protocols itself; it starts
N - 1 front-end processes (``python -m ppipe_trt.server.frontends``) that listen on the same
ports (``SO_REUSEPORT``: the kernel spreads connections over the processes) and hand every
inference to it over a Unix socket (:mod:`api.remote`).  Each Python process spends at most
one core on the protocols; when the server's process is near a core, add one (see
docs/benchmarks/dataplane.md for the CPU a request costs).  The front-end processes are
children of the server's: they end with it.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ppipe_trt.errors import PPipeError


def shared_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other processes may bind too.  It is not
    listening yet: uvicorn listens once the app has started, so the kernel hands no
    connection to a process that cannot answer it yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PPipeError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(False)
    return sock


def link_path() -> str:
    """A fresh Unix socket path for the runtime's link (removed at exit)."""
    folder = tempfile.mkdtemp(prefix="ppipe-link-")
    path = os.path.join(folder, "runtime.sock")
    atexit.register(lambda: (Path(path).unlink(missing_ok=True), os.rmdir(folder)))
    return path


def start_frontends(count: int, link: str, host: str, port: int, grpc_port: int,
                    max_body_mb: float, log_level: str,
                    auth_token: str | None = None) -> list[subprocess.Popen]:
    """Start ``count`` front-end processes (they wait for the link to open); they are
    stopped when this process exits.  ``auth_token`` reaches them in their environment (not
    on a command line others can read)."""
    from ppipe_trt.server.cli import AUTH_TOKEN_ENV

    env = dict(os.environ)
    env.pop(AUTH_TOKEN_ENV, None)
    if auth_token:
        env[AUTH_TOKEN_ENV] = auth_token
    procs = []
    for i in range(count):
        cmd = [sys.executable, "-m", "ppipe_trt.server.frontends", "--link", link,
               "--host", host, "--port", str(port), "--grpc-port", str(grpc_port),
               "--max-body-mb", str(max_body_mb), "--log-level", log_level,
               "--index", str(i + 1)]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    atexit.register(stop_all)
    return procs


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the server's process ends, however it ends."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: atexit and the lost link still end it


def frontend_main(argv: list[str] | None = None) -> int:
    """One front-end process: the app over a :class:`~api.remote.RemoteRuntime`."""
    import uvicorn

    from api.app import ApiSettings, create_app
    from ppipe_trt.server.cli import AUTH_TOKEN_ENV
    from api.remote import RemoteRuntime

    p = argparse.ArgumentParser(prog="python -m ppipe_trt.server.frontends")
    p.add_argument("--link", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--max-body-mb", type=float, default=32.0)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--index", type=int, default=1)
    args = p.parse_args(argv)
    sys.setswitchinterval(0.0005)  # as the server's process
    def lost() -> None:  # the server's process is gone: so is everything to serve
        os.kill(os.getpid(), signal.SIGTERM)

    app = create_app(lambda: RemoteRuntime(args.link, on_lost=lost),
                     ApiSettings(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                                 grpc_host=args.host, grpc_port=args.grpc_port or None,
                                 reuse_port=True,
                                 auth_token=os.environ.get(AUTH_TOKEN_ENV) or None))
    from api.http_protocol import http_protocol_for

    sock = shared_socket(args.host, args.port)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level,
                                  http=http_protocol_for(app))).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(frontend_main())
