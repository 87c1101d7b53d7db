"""Benchmarks as a library: servers under test, load generators and report writers, each a
small tested module; the scripts under ``scripts/`` are thin command lines over them.

Modules::

    procs         CPU of a process tree from /proc, and of this process
    supervisor    a server subprocess: start, readiness, stop, log tail
    openloop      the open-loop Poisson gRPC load generator and its per-point summary
    capacity      the 99 %-within-SLO capacity search
    triton_peer   tritonserver from the nvidia-pytriton wheel: install (cached) and run
    triton_twin   the Triton (Python backend + ONNX Runtime) twin of a ppipe model repository
    ppipe_peer    ppipe's engines build and ``ppipe serve`` as a server under test
    vs_triton     the ppipe-vs-Triton comparison (scripts/bench_vs_triton.py)
    report        its tables, JSON, figure and markdown page

Importing this package imports none of them (no grpc, tritonclient or matplotlib).
"""
