"""Broyden's memory: steps to an absolute residual of 1e-10 (float64, max_iter 500) on
affine maps ``z ↦ Az + b`` and tanh maps ``z ↦ tanh(3Az + b)`` with ‖A‖₂ = ρ, for
several memories (``*``: not converged). The library default (50) comes from this table.

    python -m benchmarks.broyden_memory
"""

import jax
import jax.numpy as jnp

from deqjax.solvers import SolverConfig, solve

MEMORIES = (5, 10, 20, 30, 50, 0)  # 0 = max_iter


def problems():
    out = {}
    for n, rho in [(12, 0.8), (12, 0.95), (50, 0.9), (200, 0.9)]:
        a = jax.random.normal(jax.random.PRNGKey(n), (n, n))
        a = rho * a / jnp.linalg.norm(a, 2)
        b = jax.random.normal(jax.random.PRNGKey(n + 1), (n,))
        out[f"affine n={n} ρ={rho}"] = (lambda z, a=a, b=b: a @ z + b, n)
        out[f"tanh n={n} ρ={rho}"] = (lambda z, a=a, b=b: jnp.tanh(3 * a @ z + b), n)
    return out


def main():
    jax.config.update("jax_enable_x64", True)
    print("| map | " + " | ".join(f"memory {m or 'max_iter'}" for m in MEMORIES) + " |")
    print("| --- |" + " --- |" * len(MEMORIES))
    for name, (f, n) in problems().items():
        row = []
        for m in MEMORIES:
            cfg = SolverConfig(
                method="broyden", max_iter=500, tol=1e-10, stop_mode="abs", broyden_memory=m
            )
            _, st = solve(f, jnp.zeros(n), cfg)
            row.append(f"{int(st.steps)}{'' if bool(st.converged) else '*'}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
