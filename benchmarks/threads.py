"""Thread settings shared by every benchmark CLI (no jax import: it must run first)."""

from __future__ import annotations

import os


def configure_threads(n: int) -> None:
    """Give XLA:CPU and torch the same number of threads. Must run before jax is
    imported (XLA reads ``XLA_FLAGS`` at backend start-up); inherited by the memory
    subprocesses."""
    if "jax" in __import__("sys").modules:
        raise RuntimeError("configure_threads must be called before jax is imported")
    os.environ["BENCH_THREADS"] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1:
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    else:
        flags += f" intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = flags.strip()
