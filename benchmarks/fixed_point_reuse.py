"""Fixed-point reuse in training: solver steps, convergence and time to 95% on deq_mnist.

    python -m benchmarks.fixed_point_reuse [--variants cold,residual,none] [--seeds 2]
        [--vmapped] [--eval_every 31] [--epochs 3] [--limit_train 0] [--limit_test 0]
        [--out benchmarks/results]

``experiments/configs/deq_mnist.py`` as shipped (Anderson ≤ 20 steps, rel. tol 1e-3,
implicit gradient, Jacobian regulariser 4.0; mnist_5k, batch 64, 3 epochs), seeds
0 … K-1 (``--seeds``; the same initial weights and data order in every variant), one
program per seed (``--vmapped``: one vmapped program, ``train.seeds = K``), through
``experiments.train.make_train_step``:

* ``cold``: every training solve starts from zero (the shipped config);
* ``residual``: ``train.reuse_fixed_points`` with ``train.reuse_reset = "residual"``
  (a stored start worse than zero, ‖f(z_prev) − z_prev‖ > ‖f(0)‖, is reset to zero);
* ``none``: reuse with no reset test.

Per variant and seed: the mean forward steps per training solve and the fraction of
solves that stopped at the budget without reaching the tolerance, per epoch; the mean
adjoint steps; the fraction of reset starts; the test accuracy (1,000 images, the 60-step
evaluation forward) every ``eval_every`` steps and at the end; the training steps to
the first evaluation at or above 95%, and the wall time of the K-seed program's
training steps until then (evaluations apart; the machine may be shared, so the steps
are the load-independent number). Writes ``OUT/fixed_point_reuse.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TARGET = 0.95
VARIANTS = {
    "cold": {"train.reuse_fixed_points": False},
    "residual": {"train.reuse_fixed_points": True, "train.reuse_reset": "residual"},
    "none": {"train.reuse_fixed_points": True, "train.reuse_reset": "none"},
}


def run_variant(name, n_seeds, eval_every, epochs, limit_train, limit_test, extra=None):
    import jax

    from deqjax import data as data_lib
    from experiments import common, models, seeds
    from experiments import fixed_points as fp
    from experiments import train as train_lib
    from experiments.configs import deq_mnist

    config = deq_mnist.get_config()
    config.train.epochs, config.train.seeds = epochs, n_seeds
    config.limit_train, config.limit_test = limit_train, limit_test
    config.update_from_flattened_dict({**VARIANTS[name], **(extra or {})})
    ds = data_lib.load_dataset(config.dataset, None, config.limit_train, config.limit_test)
    bs, n = config.train.batch_size, len(ds.train_images)
    steps_per_epoch = n // bs
    spec = models.build(config, ds.num_classes)
    opt = common.build_optimizer(config.train, steps_per_epoch * epochs)
    seed_list = seeds.seed_values(config)
    states = [common.init_state(spec.module, opt, ds.image_shape, s) for s in seed_list]
    state = seeds.stack(states) if n_seeds > 1 else states[0]
    reuse = fp.enabled(config)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    store = fp.new_store(spec, ds.image_shape, n, mesh, n_seeds) if reuse else None
    step_fn = train_lib.make_train_step(spec, opt, config)
    predict = train_lib.make_eval_fn(spec)

    def accuracies(state):
        one = (lambda i: seeds.seed_state(state, i)) if n_seeds > 1 else (lambda i: state)
        return [
            train_lib.evaluate(predict, one(i), ds.test_images, ds.test_labels, 250)["accuracy"]
            for i in range(n_seeds)
        ]

    per_epoch, trace, train_s, step, compile_s = [], [], 0.0, 0, None
    for epoch in range(epochs):
        sums, count = {}, 0
        its = [
            data_lib.epoch_permutation(n, s, epoch)[: steps_per_epoch * bs].reshape(-1, bs)
            for s in seed_list
        ]
        for b in range(steps_per_epoch):
            idx = np.stack([it[b] for it in its])
            x, y = ds.train_images[idx], ds.train_labels[idx].astype(np.int32)
            if n_seeds == 1:
                idx, x, y = idx[0], x[0], y[0]
            t0 = time.perf_counter()
            if reuse:
                state, aux, store = step_fn(state, x, y, idx, store)
            else:
                state, aux = step_fn(state, x, y)
            jax.block_until_ready(aux["loss"])
            dt = time.perf_counter() - t0
            compile_s = dt if compile_s is None else compile_s
            train_s += dt if step else 0.0  # the first step (compile) is reported apart
            step += 1
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
            count += 1
            if step % eval_every == 0:
                acc = accuracies(state)
                trace.append(dict(step=step, train_s=train_s, test_accuracy=acc))
                print(f"  {name} step {step}: acc {acc} after {train_s:.1f} s", flush=True)
        per_epoch.append(
            {
                k: (np.reshape(sums[k], -1) / count).tolist()
                for k in (
                    "forward_steps",
                    "nonconverged",
                    "backward_steps",
                    "reuse_reset",
                    "loss",
                )
                if k in sums
            }
        )
        print(f"  {name} epoch {epoch + 1}: {per_epoch[-1]}", flush=True)
    final = accuracies(state)
    to_target = []
    for i in range(n_seeds):
        hit = [r for r in trace if r["test_accuracy"][i] >= TARGET]
        to_target.append(
            dict(
                steps=hit[0]["step"] if hit else None,
                train_s=hit[0]["train_s"] if hit else None,
            )
        )
    return dict(
        seeds=seed_list,
        compile_s=compile_s,
        train_s=train_s,
        s_per_step=train_s / max(step - 1, 1),
        final_test_accuracy=final,
        to_95=to_target,
        per_epoch=per_epoch,
        trace=trace,
        store_mb=n_seeds * fp.nbytes(spec, ds.image_shape, n) / 1e6 if reuse else 0.0,
    )


def merge_seeds(runs: list) -> dict:
    """Single-seed results (``run_variant(..., n_seeds=1)``) as one multi-seed result."""
    as_list = lambda v: v if isinstance(v, list) else [v]
    out = {
        "seeds": [s for r in runs for s in r["seeds"]],
        "compile_s": float(np.mean([r["compile_s"] for r in runs])),
        "train_s": float(np.mean([r["train_s"] for r in runs])),
        "s_per_step": float(np.mean([r["s_per_step"] for r in runs])),
        "final_test_accuracy": [a for r in runs for a in as_list(r["final_test_accuracy"])],
        "to_95": [t for r in runs for t in r["to_95"]],
        "store_mb": runs[0]["store_mb"],
        "per_epoch": [
            {k: [v for r in runs for v in r["per_epoch"][e][k]] for k in runs[0]["per_epoch"][e]}
            for e in range(len(runs[0]["per_epoch"]))
        ],
        "trace": [
            {
                "step": t["step"],
                "train_s": [r["trace"][i]["train_s"] for r in runs],
                "test_accuracy": [a for r in runs for a in r["trace"][i]["test_accuracy"]],
            }
            for i, t in enumerate(runs[0]["trace"])
        ],
    }
    return out


def markdown(results: dict) -> str:
    lines = [
        "| variant | seed | fwd steps / solve (epoch 1, 2, 3) | not converged (epoch 1, 2, 3) "
        "| adjoint steps (epoch 3) | reset (epoch 2, 3) | steps to 95% | final test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["variants"].items():
        for i, s in enumerate(r["seeds"]):
            ep = r["per_epoch"]
            f = ", ".join(f"{e['forward_steps'][i]:.1f}" for e in ep)
            nc = ", ".join(f"{100 * e['nonconverged'][i]:.0f}%" for e in ep)
            bw = f"{ep[-1]['backward_steps'][i]:.1f}"
            rs = (
                ", ".join(f"{100 * e['reuse_reset'][i]:.0f}%" for e in ep[1:])
                if "reuse_reset" in ep[-1]
                else "–"
            )
            st = r["to_95"][i]["steps"]
            lines.append(
                f"| {name} | {s} | {f} | {nc} | {bw} | {rs} | {st if st else 'not reached'} "
                f"| {r['final_test_accuracy'][i]:.3f} |"
            )
    lines.append("")
    lines.append(
        f"| variant | s / step ({results.get('seeds_as', 'one vmapped program')}) "
        "| compile s | store MB |"
    )
    lines.append("|---|---|---|---|")
    for name, r in results["variants"].items():
        lines.append(
            f"| {name} | {r['s_per_step']:.3f} | {r['compile_s']:.1f} | {r['store_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="cold,residual,none")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval_every", type=int, default=31)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit_train", type=int, default=0)
    p.add_argument("--limit_test", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument(
        "--vmapped",
        action="store_true",
        help="train the seeds as one vmapped program (train.seeds) instead of one by one",
    )
    a = p.parse_args(argv)
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            cpu = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        cpu = []
    machine = f"{cpu[0] if cpu else platform.processor()}, {os.cpu_count()} cores"
    results = {"machine": machine, "variants": {}}
    path = os.path.join(a.out, "fixed_point_reuse")
    results["seeds_as"] = "one vmapped program" if a.vmapped else "one program per seed"
    for name in a.variants.split(","):
        if a.vmapped:
            results["variants"][name] = run_variant(
                name, a.seeds, a.eval_every, a.epochs, a.limit_train, a.limit_test
            )
        else:
            per_seed = [
                run_variant(
                    name, 1, a.eval_every, a.epochs, a.limit_train, a.limit_test, {"seed": s}
                )
                for s in range(a.seeds)
            ]
            results["variants"][name] = merge_seeds(per_seed)
        os.makedirs(a.out, exist_ok=True)
        with open(path + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(path + ".md", "w") as f:
            f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
