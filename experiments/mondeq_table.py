"""The comparison table of docs/methods/mondeq.md: monDEQ vs CPL on their provable
certificates (certified accuracy with exact 95 % Clopper–Pearson intervals, clean
accuracy, training time), and the monDEQ's forward/backward timings.

    python -m experiments.mondeq_table monDEQ=runs/mondeq_mnist CPL=runs/cpl_mnist
    python -m experiments.mondeq_table --timings monDEQ=runs/mondeq_mnist

(A module of its own: it loads workdirs, and ``experiments.workdir`` imports the model
registry, which imports the families.)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from deqjax.mondeq import certify, fb_max_step


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """Exact 95 % interval of a binomial proportion k/n."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def certified_counts(workdir: str, eps_list, n: int) -> dict:
    """``{"n", "clean": k, "certified": {ε: k}, "train_seconds"}`` of a trained workdir
    (``mondeq`` or ``cpl``) on its first ``n`` test images, with the family's provable
    certificate."""
    import json
    import os

    from experiments.workdir import load_run

    run = load_run(workdir)
    config, spec, state, ds = run.config, run.spec, run.state, run.dataset
    x, y = jnp.asarray(ds.test_images[:n]), jnp.asarray(ds.test_labels[:n])
    if config.model.name == "mondeq":
        module = spec.module
        p = module.mondeq_params(state.params, x.shape[1:])
        cert = certify(
            p,
            x,
            y,
            splitting=module.splitting,
            alpha=module.alpha,
            config=spec.eval_kwargs["config"],
        )
        radius, correct = cert.radius, cert.correct
    else:
        from deqjax.cpl import certified_logits, certified_radius
        from experiments.families.cpl import cpl_net, net_variables

        variables = {"params": state.params, **state.model_state}
        c = certified_logits(cpl_net(spec.module), net_variables(variables), x)
        radius, correct = certified_radius(c, y), jnp.argmax(c.logits, -1) == y
    radius, correct = np.asarray(radius), np.asarray(correct)
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh]
    train_seconds = sum(float(r.get("seconds", 0.0)) for r in metrics)  # per-epoch steps
    return {
        "n": len(y),
        "clean": int(correct.sum()),
        "certified": {e: int((correct & (radius > e)).sum()) for e in eps_list},
        "train_seconds": train_seconds,
    }


def comparison_table(named, eps_list) -> str:
    """Markdown: per model clean accuracy, certified accuracy at each radius (with exact
    95 % intervals) and training time. ``named``: ``[(label, certified_counts)]``."""
    head = "| model | clean | " + " | ".join(f"certified ε={e:g}" for e in eps_list)
    lines = [
        head + " | training |",
        "| --- | --- | " + " | ".join("---" for _ in eps_list) + " | --- |",
    ]

    def cell(k, n):
        lo, hi = clopper_pearson(k, n)
        return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"

    for label, c in named:
        n = c["n"]
        cells = [cell(c["certified"][e], n) for e in eps_list]
        lines.append(
            f"| {label} | {cell(c['clean'], n)} | "
            + " | ".join(cells)
            + f" | {c['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def solver_timings(workdir: str, n: int = 100, repeats: int = 20) -> str:
    """Markdown: forward steps and seconds, and the implicit backward's steps, residual,
    seconds and gradient error against the dense solve, per splitting (PR at the model's
    α; FB at half its sufficient bound 2m/L̂²) and adjoint solver (``dense`` LU,
    ``fixed_point`` = the splitting's own adjoint iteration ``u = v + J_fᵀu``,
    ``anderson``) on the first ``n`` test images of a trained ``mondeq`` workdir
    (median of ``repeats`` jitted calls)."""
    import optax

    from deqjax.cpl import multiclass_hinge_loss
    from deqjax.deq import DEQConfig
    from deqjax.mondeq import equilibrium, head
    from deqjax.solvers import SolverConfig
    from experiments.workdir import load_run

    run = load_run(workdir)
    module = run.spec.module
    x = jnp.asarray(run.dataset.test_images[:n])
    y = jnp.asarray(run.dataset.test_labels[:n])
    p = module.mondeq_params(run.state.params, x.shape[1:])

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return out, float(np.median(ts))

    lines = [
        "| splitting | α | adjoint | fwd steps | fwd s | bwd steps | bwd residual | "
        "fwd+bwd s | grad rel. err vs dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for splitting, alpha in (("pr", module.alpha), ("fb", 0.5 * fb_max_step(p))):
        ref = None
        for adjoint in ("dense", "fixed_point", "anderson"):
            cfg = DEQConfig(
                forward=SolverConfig(method="fixed_point", max_iter=2000, tol=1e-4),
                backward="implicit",
                adjoint_solver=adjoint,
                adjoint_max_iter=500,
                adjoint_tol=1e-4,
            )

            def loss(q, probe, cfg=cfg, splitting=splitting, alpha=alpha):
                z, st = equilibrium(
                    q, x, splitting=splitting, alpha=alpha, config=cfg, backward_probe=probe
                )
                return jnp.mean(multiclass_hinge_loss(head(q, z), y)), st

            fwd = jax.jit(lambda q, loss=loss: loss(q, jnp.zeros((n, 2)))[1].steps)
            grad = jax.jit(jax.grad(lambda q, pr, loss=loss: loss(q, pr)[0], argnums=(0, 1)))
            steps, t_fwd = timed(fwd, p)
            (g, probe), t_all = timed(grad, p, jnp.zeros((n, 2)))
            if ref is None:
                ref = g
            err = float(optax.global_norm(jax.tree.map(jnp.subtract, g, ref)))
            err /= float(optax.global_norm(ref))
            lines.append(
                f"| {splitting} | {alpha:.3g} | {adjoint} | {float(jnp.mean(steps)):.1f} | "
                f"{t_fwd:.3f} | {float(jnp.mean(probe[:, 1])):.1f} | "
                f"{float(jnp.max(probe[:, 0])):.1e} | {t_all:.3f} | {err:.1e} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="monDEQ vs CPL certified accuracy table")
    ap.add_argument("--eps", default="0.5,1.0,1.58", help="ℓ2 radii")
    ap.add_argument("--n", type=int, default=1000, help="first n test images")
    ap.add_argument(
        "--timings", action="store_true", help="solver/backward timings of ONE mondeq run"
    )
    ap.add_argument("runs", nargs="+", help="LABEL=WORKDIR (trained mondeq or cpl)")
    args = ap.parse_args(argv)
    if args.timings:
        print(solver_timings(args.runs[0].partition("=")[2], n=min(args.n, 100)))
        return
    eps_list = [float(e) for e in args.eps.split(",")]
    named = []
    for item in args.runs:
        label, _, workdir = item.partition("=")
        named.append((label, certified_counts(workdir, eps_list, args.n)))
    print(comparison_table(named, eps_list))


if __name__ == "__main__":
    main()
