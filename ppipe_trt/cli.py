"""The ``ppipe`` command line.

Each sub-command lives next to the code it drives (``serve``, which wires several layers
together, in the composition root :mod:`ppipe_trt.server` above them) and exposes
``register(subparsers)``; this module only assembles them.  Sub-command modules must import
their heavy dependencies inside the handler, so ``ppipe --help`` is fast and works without a
GPU.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ppipe_trt.errors import PPipeError

#: Modules that contribute sub-commands, in the order they appear in ``ppipe --help``.
SUBCOMMAND_MODULES = (
    "ppipe_trt.engines.cli",      # ppipe engines build|list
    "planner.cli",                # ppipe plan
    "ppipe_trt.simulator.cli",    # ppipe simulate
    "ppipe_trt.server.cli",       # ppipe serve
    "ppipe_trt.server.replan_cli",  # ppipe replan
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppipe", description="Pipelined CNN serving on heterogeneous GPU clusters.")
    parser.add_argument("--version", action="version", version="ppipe-trt 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part of the project is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except PPipeError as exc:
        print(f"ppipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
