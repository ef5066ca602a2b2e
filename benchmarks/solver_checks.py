"""Solver checks behind docs/results/solvers.md: Anderson's regulariser (absolute,
as before, vs relative to the Gram matrix) and the SHINE backward, on analytic
problems and on the shipped TRADES DEQ (``tests/data/deq_mnist_trades_params.msgpack``
with ``experiments/configs/deq_mnist_trades.py``).

    python -m benchmarks.solver_checks [--images 200] [--batch 64] [--repeats 5] \
        [--out /tmp/solver_checks.json]

Runs on 1 CPU thread (set before JAX starts). Parts:

* ``ridge_analytic``: steps to tolerance of plain iteration, Anderson with the
  absolute ridge 1e-4, the relative ridge 1e-4 and ridge 0 (float64), on the affine
  map ``z ↦ Az + b`` (‖A‖₂ = 0.8, n = 12) and ``z ↦ tanh(Az + b)``.
* ``ridge_mdeq``: mean forward steps and converged fraction of Anderson on the first
  ``--images`` test images of mnist_5k at the config's evaluation budget, per ridge
  mode and tolerance.
* ``shine_analytic``: relative error of pure SHINE's and the Jacobian-free adjoint
  (``u = v``) against the exact one, on the affine and tanh maps of sizes 6, 12, 40
  (float64, Broyden forward to 1e-10).
* ``forward_mode_cost``: the input gradient of the TRADES DEQ (batch ``--batch``)
  through the probe path (``custom_vjp``) and the probe-less path (``custom_jvp`` +
  ``custom_linear_solve``): median time and the largest difference.
* ``shine_mdeq``: on one training batch, a Broyden forward at the training budget,
  and the parameter gradient of the cross-entropy for each backward: cosine
  similarity and relative error against the exact implicit gradient (adjoint
  solved to 1e-6), the adjoint residual and steps the probe reports, and the median
  time of one jitted value-and-grad (the train step without the optimizer update).
* ``adjoint_ridge``: the adjoint's Anderson ridge, absolute vs relative
  (``DEQConfig.adjoint_ridge_mode``), at the TRADES DEQ's evaluation solver: how far
  the input gradient of ``c · Σ CE``, divided by ``c``, moves when ``c`` goes from 1 to
  1/64 (a batch mean; exact linear algebra gives 0) on the first 64 test images; and
  PGD-20 / APGD-CE-20 robust accuracy at ε = 0.1 and 0.2 on the first ``--images``
  test images (scored by the model's own evaluation forward).

``--parts`` runs a subset (default: all).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = os.path.join(ROOT, "tests", "data", "deq_mnist_trades_params.msgpack")


def ridge_analytic():
    import jax
    import jax.numpy as jnp

    from deqjax.solvers import SolverConfig, solve

    with jax.enable_x64(True):
        a = jax.random.normal(jax.random.PRNGKey(0), (12, 12))
        a = 0.8 * a / jnp.linalg.norm(a, 2)
        b = jax.random.normal(jax.random.PRNGKey(1), (12,))
        maps = {"affine": lambda z: a @ z + b, "tanh": lambda z: jnp.tanh(a @ z + b)}
        variants = {
            "plain": dict(method="fixed_point"),
            "anderson_absolute": dict(anderson_ridge_mode="absolute"),
            "anderson_relative": dict(),
            "anderson_ridge0": dict(anderson_ridge=0.0),
        }
        rows = []
        for name, f in maps.items():
            for tol in (1e-6, 1e-10, 1e-13):
                row = {"map": name, "tol": tol}
                for v, kw in variants.items():
                    cfg = SolverConfig(max_iter=500, tol=tol, stop_mode="abs", **kw)
                    _, st = solve(f, jnp.zeros(12, jnp.float64), cfg)
                    row[v] = int(st.steps) if bool(st.converged) else None
                rows.append(row)
    return rows


def _adjoint_errors(cell, n: int, rho: float) -> dict:
    """Relative errors of pure SHINE's and the Jacobian-free gradient wrt b of
    wᵀz*(b) on ``cell`` with a random A (‖A‖₂ = rho), float64."""
    import jax
    import jax.numpy as jnp

    from deqjax.deq import DEQConfig, deq_fixed_point
    from deqjax.solvers import SolverConfig

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    a = rho * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    w = jax.random.normal(jax.random.PRNGKey(2), (n,))
    fwd = SolverConfig(method="broyden", max_iter=200, tol=1e-10, stop_mode="abs")

    def grad_b(backward, **kw):
        cfg = DEQConfig(forward=fwd, backward=backward, **kw)
        loss = lambda b: jnp.dot(w, deq_fixed_point(cell, jnp.zeros(n), (a, b), cfg)[0])
        return jax.grad(loss)(b)

    exact = grad_b("implicit", adjoint_max_iter=1000, adjoint_tol=1e-14)
    err = lambda g: float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
    return {
        "shine": err(grad_b("shine")),
        "jacobian_free": err(grad_b("phantom", phantom_steps=1, phantom_damping=1.0)),
    }


def shine_analytic():
    import jax
    import jax.numpy as jnp

    cells = {
        "affine": lambda z, p: p[0] @ z + p[1],
        "tanh": lambda z, p: jnp.tanh(p[0] @ z + p[1]),
    }
    with jax.enable_x64(True):
        return [
            {"map": name, "n": n, "rho": rho, **_adjoint_errors(cell, n, rho)}
            for n, rho in ((6, 0.7), (12, 0.8), (40, 0.9))
            for name, cell in cells.items()
        ]


def forward_mode_cost(module, params, ds, batch: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from deqjax.deq_gradients import AttackView

    x, y = jnp.asarray(ds.test_images[:batch]), jnp.asarray(ds.test_labels[:batch])
    ce = lambda logits: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    paths = {
        "probe_custom_vjp": lambda x: module.apply(
            {"params": params}, x, backward_probe=jnp.zeros((batch, 2))
        )[0],
        # the implicit attack view solves without a probe: the custom_jvp path
        "no_probe_custom_jvp": lambda x: module.apply(
            {"params": params}, x, view=AttackView("implicit")
        )[0],
    }
    out, grads = {}, {}
    for name, fn in paths.items():
        g = jax.jit(jax.grad(lambda x, fn=fn: ce(fn(x))))
        grads[name] = jax.block_until_ready(g(x))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(g(x))
            times.append(time.perf_counter() - t)
        out[name + "_s"] = float(np.median(times))
    a, b = grads.values()
    out["max_abs_diff"] = float(jnp.max(jnp.abs(a - b)))
    out["max_abs_grad"] = float(jnp.max(jnp.abs(a)))
    out["batch"] = batch
    return out


def load_trades_deq():
    """(module, params, config, dataset) of the shipped TRADES DEQ."""
    import flax.serialization
    import jax
    import jax.numpy as jnp

    from deqjax import data as data_lib
    from experiments import common, models
    from experiments.configs import deq_mnist_trades

    config = deq_mnist_trades.get_config()
    ds = data_lib.load_dataset(config.dataset)
    spec = models.build(config, ds.num_classes)
    state = common.init_state(
        spec.module, common.build_optimizer(config.train, 1), ds.image_shape, 0
    )
    with open(PARAMS, "rb") as fh:
        loaded = flax.serialization.msgpack_restore(fh.read())
    params = jax.tree.map(
        lambda ref, v: jnp.asarray(v, ref.dtype),
        state.params,
        flax.serialization.from_state_dict(state.params, loaded),
    )
    return spec.module, params, config, ds


def ridge_mdeq(module, params, config, ds, n_images: int):
    import jax
    import jax.numpy as jnp

    from experiments.spec import deq_config

    x = jnp.asarray(ds.test_images[:n_images])
    base = deq_config(config.deq, evaluation=True)
    rows = []
    for tol in (base.forward.tol, 1e-5):
        for mode in ("absolute", "relative"):
            fwd = dataclasses.replace(base.forward, tol=tol, anderson_ridge_mode=mode)
            cfg = dataclasses.replace(base, forward=fwd)
            run = jax.jit(lambda x, cfg=cfg: module.apply({"params": params}, x, config=cfg)[1])
            st = run(x)
            rows.append(
                {
                    "tol": tol,
                    "max_iter": fwd.max_iter,
                    "ridge_mode": mode,
                    "mean_steps": float(jnp.mean(st.steps)),
                    "converged": float(jnp.mean(st.converged)),
                }
            )
    return rows


def shine_mdeq(module, params, config, ds, batch: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from deqjax.deq import DEQConfig
    from experiments.spec import deq_config

    x, y = jnp.asarray(ds.train_images[:batch]), jnp.asarray(ds.train_labels[:batch])
    train = deq_config(config.deq)  # the training budget (12 / 12 steps, tol 1e-3)
    fwd = dataclasses.replace(train.forward, method="broyden")
    budget = dict(adjoint_max_iter=train.adjoint_max_iter, adjoint_tol=train.adjoint_tol)
    backwards = {
        "exact": DEQConfig(forward=fwd, adjoint_max_iter=300, adjoint_tol=1e-6),
        "implicit": DEQConfig(forward=fwd, **budget),
        "shine": DEQConfig(forward=fwd, backward="shine", **budget),
        "shine_refine": DEQConfig(forward=fwd, backward="shine_refine", **budget),
        "phantom": DEQConfig(forward=fwd, backward="phantom"),
        "jacobian_free": DEQConfig(
            forward=fwd, backward="phantom", phantom_steps=1, phantom_damping=1.0
        ),
    }

    def step_fn(cfg):
        def loss(p, probe):
            logits, st = module.apply({"params": p}, x, config=cfg, backward_probe=probe)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.mean(ce), st

        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        return jax.jit(lambda p: grad(p, jnp.zeros((batch, 2))))

    flat = lambda g: jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)])
    results, grads = {}, {}
    for name, cfg in backwards.items():
        fn = step_fn(cfg)
        (_, st), (g, probe) = jax.block_until_ready(fn(params))  # compile + first call
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(params))
            times.append(time.perf_counter() - t)
        grads[name] = flat(g)
        results[name] = {
            "step_s": float(np.median(times)),
            "forward_steps": float(jnp.mean(st.steps)),
            "forward_converged": float(jnp.mean(st.converged)),
            "adjoint_rel_residual": float(jnp.mean(probe[:, 0])),
            "adjoint_steps": float(jnp.mean(probe[:, 1])),
        }
    ref = grads["exact"]
    for name, g in grads.items():
        results[name]["cosine"] = float(
            jnp.dot(g, ref) / (jnp.linalg.norm(g) * jnp.linalg.norm(ref))
        )
        results[name]["rel_error"] = float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))
    return {"batch": batch, "forward": dataclasses.asdict(fwd), "budget": budget, "modes": results}


def adjoint_ridge(module, params, config, ds, n_images: int):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from deqjax import attacks as A
    from experiments.spec import deq_config

    ecfg = deq_config(config.deq, evaluation=True)
    variables = {"params": params}
    x = jnp.asarray(ds.test_images[:n_images])
    y = jnp.asarray(ds.test_labels[:n_images].astype(np.int32))
    with_mode = lambda mode: dataclasses.replace(ecfg, adjoint_ridge_mode=mode)
    logits = lambda cfg: lambda xb: module.apply(variables, xb, config=cfg)[0]

    def input_grad(cfg, c):
        loss = lambda xb: (
            c * optax.softmax_cross_entropy_with_integer_labels(logits(cfg)(xb), y[:64]).sum()
        )
        return jax.jit(jax.grad(loss))(x[:64]) / c

    out = {"scale_discrepancy": {}, "robust": {}}
    for mode in ("absolute", "relative"):
        g1 = input_grad(with_mode(mode), 1.0)
        gc = input_grad(with_mode(mode), 1.0 / 64)
        err = float(jnp.linalg.norm(gc - g1) / jnp.linalg.norm(g1))
        out["scale_discrepancy"][mode] = err
        print(f"adjoint_ridge {mode}: |g(c)/c - g(1)|/|g(1)| at c=1/64: {err:.3g}", flush=True)
    cold = jax.jit(logits(ecfg))
    correct = np.asarray(cold(x)).argmax(-1) == np.asarray(y)
    key = jax.random.PRNGKey(0)
    attacks = {
        "pgd20": lambda f, xx, yy, eps: A.pgd(f, xx, yy, key, eps=eps, steps=20),
        "apgd-ce20": lambda f, xx, yy, eps: A.apgd(f, xx, yy, key, eps=eps, steps=20),
    }
    for eps in (0.1, 0.2):
        for name, atk in attacks.items():
            for mode in ("absolute", "relative"):
                run = functools.partial(atk, logits(with_mode(mode)), eps=eps)
                adv = jax.jit(run)(x, y)
                robust = correct & (np.asarray(cold(adv)).argmax(-1) == np.asarray(y))
                out["robust"][f"eps={eps:g} {name} {mode}"] = float(robust.mean())
                print(f"adjoint_ridge eps={eps:g} {name} {mode}: {robust.mean():.3f}", flush=True)
    out["clean"] = float(correct.mean())
    out["n_images"] = n_images
    return out


PARTS = (
    "ridge_analytic",
    "shine_analytic",
    "ridge_mdeq",
    "forward_mode_cost",
    "shine_mdeq",
    "adjoint_ridge",
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    from benchmarks.threads import configure_threads

    configure_threads(1)
    t0 = time.time()
    module, params, config, ds = load_trades_deq()
    run = {
        "ridge_analytic": ridge_analytic,
        "shine_analytic": shine_analytic,
        "ridge_mdeq": lambda: ridge_mdeq(module, params, config, ds, args.images),
        "forward_mode_cost": lambda: forward_mode_cost(
            module, params, ds, args.batch, args.repeats
        ),
        "shine_mdeq": lambda: shine_mdeq(module, params, config, ds, args.batch, args.repeats),
        "adjoint_ridge": lambda: adjoint_ridge(module, params, config, ds, args.images),
    }
    report = {name: run[name]() for name in parts}
    report["wall_s"] = time.time() - t0
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
