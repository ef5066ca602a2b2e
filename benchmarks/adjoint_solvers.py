"""The implicit backward's adjoint solve ``u = v + Jᵀu``: deqjax's solvers (jaxopt's
Krylov solvers behind ``deqjax._jaxopt``, the dense LU, Anderson) against lineax's
(GMRES, BiCGStab, LU), and the size below which the dense solve is the fastest
(``deqjax.deq.DENSE_ADJOINT_MAX_SIZE``).

The system is the adjoint of a DEQ cell ``z ↦ tanh(W z + x)`` at its fixed point
(``‖W‖₂ = ρ``), ``n`` unknowns, a batch of ``B`` examples (vmapped, as in a DEQ's
backward), float32. Every method gets the library's default budget (relative residual
``1e-4``, ``30`` iterations); the achieved relative residual is reported next to the
time, so a fast answer that missed the tolerance is visible. Times: median of
``reps`` jitted calls after one warm-up call (whose time, ``compile``, is reported).

    python -m benchmarks.adjoint_solvers [--sizes 16,32,64,128,256,512,1024] [--rho 0.9]
        [--out benchmarks/results]

Writes ``OUT/adjoint_solvers.json``; ``tools/render_results.py`` renders it to
``docs/benchmarks/adjoint_solvers.md`` (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.threads import configure_threads

TOL, MAX_ITER = 1e-4, 30


def methods():
    """name → ``solve(jt, v) -> u`` for one example (``jt``: ``u ↦ Jᵀu``)."""
    import jax
    import jax.numpy as jnp
    import lineax as lx

    from deqjax.deq import DEQConfig, _solve_adjoint

    def deqjax_method(name):
        cfg = DEQConfig(adjoint_solver=name, adjoint_tol=TOL, adjoint_max_iter=MAX_ITER)
        return lambda jt, v: _solve_adjoint(jt, v, cfg)[0]

    def lineax_krylov(solver):
        def run(jt, v):
            struct = jax.ShapeDtypeStruct(v.shape, v.dtype)
            op = lx.FunctionLinearOperator(lambda u: u - jt(u), struct)
            return lx.linear_solve(op, v, solver, throw=False).value

        return run

    def lineax_lu(jt, v):
        eye = jnp.eye(v.size, dtype=v.dtype)
        op = lx.MatrixLinearOperator(eye - jax.vmap(jt)(eye).T)
        return lx.linear_solve(op, v, lx.LU()).value

    # lineax's Krylov tolerance is on the max-norm residual: rtol·‖v‖∞ + atol
    return {
        "dense LU (deqjax, jnp.linalg.solve)": deqjax_method("dense"),
        "dense LU (lineax)": lineax_lu,
        "Anderson (deqjax)": deqjax_method("anderson"),
        "GMRES (jaxopt)": deqjax_method("gmres"),
        "GMRES (lineax)": lineax_krylov(
            lx.GMRES(rtol=TOL, atol=0.0, max_steps=MAX_ITER, restart=MAX_ITER)
        ),
        "BiCGStab (jaxopt)": deqjax_method("bicgstab"),
        "BiCGStab (lineax)": lineax_krylov(lx.BiCGStab(rtol=TOL, atol=0.0, max_steps=MAX_ITER)),
    }


def problem(n: int, batch: int, rho: float):
    """``(W, x, z*, v)``: a contractive tanh cell, its fixed points for ``batch`` inputs
    (300 plain iterations) and random cotangents."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.PRNGKey(n), 3)
    w = jax.random.normal(k[0], (n, n))
    w = rho * w / jnp.linalg.norm(w, 2)
    x = jax.random.normal(k[1], (batch, n))
    z = jax.lax.fori_loop(0, 300, lambda _, z: jnp.tanh(z @ w.T + x), jnp.zeros_like(x))
    v = jax.random.normal(k[2], (batch, n))
    return w, x, z, v


def measure(solve, w, x, z, v, reps: int):
    import jax
    import jax.numpy as jnp

    def one(x1, z1, v1):
        _, vjp = jax.vjp(lambda zz: jnp.tanh(w @ zz + x1), z1)
        jt = lambda u: vjp(u)[0]
        u = solve(jt, v1)
        return jnp.linalg.norm(u - v1 - jt(u)) / jnp.linalg.norm(v1)

    run = jax.jit(jax.vmap(one))
    t0 = time.perf_counter()
    rel = run(x, z, v).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(x, z, v).block_until_ready()
        times.append(time.perf_counter() - t0)
    return dict(
        ms=1e3 * statistics.median(times),
        compile_s=compile_s,
        max_rel_residual=float(jnp.max(rel)),
    )


def markdown(res: dict) -> str:
    """The table: time per batch (ms, median) and the worst relative residual."""
    sizes = sorted({r["n"] for r in res["rows"]})
    names = list(dict.fromkeys(r["method"] for r in res["rows"]))
    cell = {(r["method"], r["n"]): r for r in res["rows"]}
    m = res["machine"]
    lines = [
        f"CPU {m.get('cpu')}, {res.get('threads', 1)} thread(s); jax {m.get('jax')}, "
        f"lineax {res.get('lineax')}. Batch {res['batch']} (vmapped), float32, "
        f"ρ = {res['rho']}, relative tolerance {res['tol']}, at most {res['max_iter']} "
        "iterations. Each cell: median ms per batch (worst relative residual "
        "‖u − v − Jᵀu‖ / ‖v‖ of the batch).",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in sizes) + " |",
        "| --- |" + " --- |" * len(sizes),
    ]
    for name in names:
        cells = []
        for n in sizes:
            r = cell.get((name, n))
            cells.append("–" if r is None else f"{r['ms']:.2f} ({r['max_rel_residual']:.0e})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Produced by:", "", f"    {res['command']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16,32,64,128,256,512,1024")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rho", type=float, default=0.9)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    a = p.parse_args(argv)
    configure_threads(a.threads)
    run(a, sys.argv[1:] if argv is None else list(argv))


def run(a, args) -> dict:
    """Measure every method at every size of ``a`` (parsed options; threads already
    configured) and write ``a.out/adjoint_solvers.json``; returns its content."""
    import jax

    from benchmarks.common import machine

    sizes = [int(s) for s in a.sizes.split(",")]
    ms = methods()
    rows = []
    print(f"batch {a.batch}, rho {a.rho}, float32, tol {TOL}, max_iter {MAX_ITER}")
    print("| method | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("| --- |" + " --- |" * len(sizes))
    cells = {name: [] for name in ms}
    for n in sizes:
        w, x, z, v = problem(n, a.batch, a.rho)
        for name, solve in ms.items():
            r = measure(solve, w, x, z, v, a.reps)
            rows.append(dict(method=name, n=n, **r))
            cells[name].append(f"{r['ms']:.2f} ms ({r['max_rel_residual']:.0e})")
            jax.clear_caches()
    for name, c in cells.items():
        print(f"| {name} | " + " | ".join(c) + " |")
    import lineax

    res = dict(
        machine=machine(),
        lineax=lineax.__version__,
        threads=a.threads,
        batch=a.batch,
        rho=a.rho,
        tol=TOL,
        max_iter=MAX_ITER,
        rows=rows,
        command=" ".join(["python -m benchmarks.adjoint_solvers", *args]),
    )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "adjoint_solvers.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
