"""deqjax vs optimistix on optimistix's fixed-point test problems
(tests/fixed_point_problems.py): jitted value + gradient of a scalar loss of the fixed
point w.r.t. the problem's parameters, float64, CPU.

deqjax: each forward solver to an absolute residual of 1e-12, implicit adjoint
(``adjoint_solver="auto"``: dense LU for these small states) to 1e-12. optimistix:
``FixedPointIteration(rtol=atol=1e-13)`` with its default ``ImplicitAdjoint``. Each
function is compiled and run once, then all are timed alternately (median of ``reps``).
Ratio = deqjax time / optimistix time (< 1: deqjax faster).

    python -m benchmarks.optimistix_problems [--reps N]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import optimistix as optx  # noqa: E402

from deqjax import DEQConfig, SolverConfig, deq_fixed_point  # noqa: E402
from deqjax.solvers import SOLVERS  # noqa: E402
from tests.fixed_point_problems import (  # noqa: E402
    PROBLEM_NAMES,
    loss,
    make_problem,
    problem_tol,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def deq_fn(p, method, tol):
    cfg = DEQConfig(
        forward=SolverConfig(method=method, max_iter=1000, tol=tol, stop_mode="abs"),
        adjoint_tol=1e-12,
        adjoint_max_iter=1000,
    )
    return jax.jit(jax.value_and_grad(lambda a: loss(deq_fixed_point(p.f, p.z0, a, cfg)[0])))


def optx_fn(p, tol):
    solver = optx.FixedPointIteration(rtol=0.1 * tol, atol=0.1 * tol)
    return jax.jit(
        jax.value_and_grad(
            lambda a: loss(optx.fixed_point(p.f, solver, p.z0, a, max_steps=10_000).value)
        )
    )


def _run(fn, args):
    t = time.perf_counter()
    jax.block_until_ready(fn(args))
    return time.perf_counter() - t


def main(reps: int = 21) -> str:
    header = (
        "| problem | optimistix FPI (µs) | "
        + " | ".join(f"deqjax {m} (µs) | ratio" for m in SOLVERS)
        + " |"
    )
    lines = [header, "|" + "---|" * (2 + 2 * len(SOLVERS))]
    for name in PROBLEM_NAMES:
        p = make_problem(name)
        tol = problem_tol(name)
        fns = {"optx": optx_fn(p, tol)} | {m: deq_fn(p, m, tol) for m in SOLVERS}
        for fn in fns.values():  # compile + warm up
            _run(fn, p.args)
            _run(fn, p.args)
        times = {k: [] for k in fns}
        for _ in range(reps):  # alternate the sides so load changes hit all equally
            for k, fn in fns.items():
                times[k].append(_run(fn, p.args))
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        cells = " | ".join(f"{med[m]:.0f} | {med[m] / med['optx']:.2f}" for m in SOLVERS)
        lines.append(f"| {name} | {med['optx']:.0f} | {cells} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    note = (
        "# deqjax vs optimistix: fixed-point problems (value + gradient)\n\n"
        "`python -m benchmarks.optimistix_problems` (float64, CPU, jitted, median of "
        f"{reps} alternating runs after warm-up; {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, optimistix {optx.__version__}). Ratio = deqjax / "
        "optimistix (< 1: deqjax faster). Forward tolerance 1e-12 absolute (1e-17 for "
        "midpoint_k_robertson), adjoint 1e-12.\n\n"
    )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "optimistix_problems.md"), "w") as fh:
        fh.write(note + table + "\n")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    print(main(parser.parse_args().reps))
