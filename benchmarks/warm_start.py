"""Warm-started DEQ solves inside PGD: wall time, solver steps and robust accuracy.

    python -m benchmarks.warm_start [--n 200] [--batch 100] [--eps 0.1] [--steps 20]
        [--torch] [--out benchmarks/results]

PGD-``steps`` (L∞, ε ``eps``, α = 2.5·ε/steps, one random start, CE) on the shipped
TRADES MDEQ (``tests/data/deq_mnist_trades_params.msgpack``) at its evaluation
solver settings (Anderson m = 5, ≤ 40 steps, relative tol 1e-3; implicit gradient with
an Anderson adjoint, ≤ 12 steps, tol 1e-3), on the first ``n`` mnist_5k test images:

* ``deqjax cold``: every iterate's solve starts from zero (the plain logits function);
* ``deqjax warm``: each iterate's forward solve starts from the previous iterate's
  ``z*`` (:func:`deqjax.models.warm_start_logits`, as shipped);
* ``deqjax warm + adjoint``: the adjoint solve of each gradient too starts from the
  previous iterate's adjoint where that is the better start (``warm_adjoint=True``);
* ``torchattacks + torchdeq`` (``--torch``): torchattacks' PGD on the same weights
  ported by :mod:`benchmarks.torch_models` (torchdeq differentiates only in training
  mode, so it attacks in train mode and scores in eval mode, as
  :mod:`benchmarks.crosscheck`).

Every run attacks all ``n`` images with the same key; robust accuracy = clean-correct
and still correct on the attack's point, scored by each model's own cold forward. The
deqjax rows report the run time (compile time apart), and the forward solver steps of
every solve of the attack: mean per example, and the loop length per solve (the batch's
maximum: the solver's loop runs until every example of the batch has stopped, so the
loop length, not the mean, sets the wall time). Steps are counted by a
``jax.debug.callback`` on ``stats.steps`` in both deqjax runs. One CPU thread per
framework. Writes ``OUT/warm_start.json`` and ``OUT/warm_start.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class StepCounter:
    """Collects the per-example forward step counts of every solve (host side)."""

    def __init__(self):
        self.calls = []

    def __call__(self, steps):
        import numpy as np

        self.calls.append(np.asarray(steps).reshape(-1))

    def summary(self) -> dict:
        import numpy as np

        if not self.calls:
            return dict(solves=0, mean_steps=float("nan"), mean_loop_steps=float("nan"))
        return dict(
            solves=len(self.calls),
            mean_steps=float(np.mean(np.concatenate(self.calls))),
            mean_loop_steps=float(np.mean([c.max() for c in self.calls])),
        )


def run_deqjax(logits_fn, score_fn, x, y, correct, key, eps, steps, batch, counter):
    """PGD over ``x`` in batches (one compile); returns a result row."""
    import jax
    import numpy as np

    from deqjax import attacks as A

    def attack(xb, yb, kb):
        return A.pgd(logits_fn, xb, yb, kb, eps=eps, steps=steps, step_size=2.5 * eps / steps)

    t = time.perf_counter()
    compiled = jax.jit(attack).lower(x[:batch], y[:batch], key).compile()
    compile_s = time.perf_counter() - t
    counter.calls.clear()
    adv, run_s = [], 0.0
    for i in range(0, len(y), batch):
        t = time.perf_counter()
        adv.append(
            np.asarray(jax.block_until_ready(compiled(x[i : i + batch], y[i : i + batch], key)))
        )
        run_s += time.perf_counter() - t
    adv = np.concatenate(adv)
    pred = np.concatenate(
        [np.asarray(score_fn(adv[i : i + batch])).argmax(-1) for i in range(0, len(y), batch)]
    )
    robust = correct & (pred == y)
    return dict(robust=float(robust.mean()), s=run_s, compile_s=compile_s, **counter.summary()), adv


def run_torch(x, y, correct, eps, steps, desc_out):
    from benchmarks import crosscheck
    from benchmarks.torch_models import TorchMDEQ, torchdeq_kwargs

    config, spec, variables = crosscheck.load_trades_deq()
    ecfg = spec.eval_kwargs["config"]
    tm = TorchMDEQ(head_kind=config.model.head, deq_kwargs=torchdeq_kwargs(ecfg))
    tm.load_flax(variables["params"])
    desc_out["torchdeq"] = torchdeq_kwargs(ecfg)
    atk = crosscheck.torch_attack("pgd", tm, dict(pgd_steps=steps), eps, "linf")
    robust, sec = crosscheck.run_torch(atk, tm, x, y, correct, train_mode=True)
    return dict(robust=float(robust.mean()), s=sec)


def measure(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import crosscheck
    from deqjax import data as data_lib
    from deqjax.models import warm_start_logits

    config, spec, variables = crosscheck.load_trades_deq()
    ecfg = spec.eval_kwargs["config"]
    module = spec.module
    cold_fn = jax.jit(lambda xb: module.apply(variables, xb, config=ecfg)[0])
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[: a.n], ds.test_labels[: a.n].astype(np.int32)
    correct = (
        np.concatenate(
            [np.asarray(cold_fn(x[i : i + a.batch])).argmax(-1) for i in range(0, a.n, a.batch)]
        )
        == y
    )
    key = jax.random.PRNGKey(0)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    res = dict(
        n=a.n,
        batch=a.batch,
        eps=a.eps,
        steps=a.steps,
        clean=float(correct.mean()),
        solver=f"forward {ecfg.forward}; backward {ecfg.backward}, adjoint "
        f"{ecfg.adjoint_solver} max_iter={ecfg.adjoint_max_iter} tol={ecfg.adjoint_tol}",
        rows={},
    )
    cold_counter, warm_counter, adj_counter = StepCounter(), StepCounter(), StepCounter()
    counted = warm_start_logits(module, variables, config=ecfg, on_steps=cold_counter)
    warm = warm_start_logits(module, variables, config=ecfg, on_steps=warm_counter)
    warm_adj = warm_start_logits(
        module, variables, config=ecfg, on_steps=adj_counter, warm_adjoint=True
    )
    cold_plain = lambda xb: counted(xb)  # a plain logits function: every solve cold
    runs = [
        ("deqjax cold", cold_plain, cold_counter),
        ("deqjax warm", warm, warm_counter),
        ("deqjax warm + adjoint", warm_adj, adj_counter),
    ]
    adv = {}
    for name, fn, counter in runs:
        print(f"{name} ...", flush=True)
        res["rows"][name], adv[name] = run_deqjax(
            fn, cold_fn, xj, yj, correct, key, a.eps, a.steps, a.batch, counter
        )
        print(res["rows"][name], flush=True)
    adv_c, adv_w = adv["deqjax cold"], adv["deqjax warm"]
    res["adv_max_abs_diff"] = float(np.abs(adv_c - adv_w).max())
    res["adv_frac_pixels_differ"] = float(np.mean(np.abs(adv_c - adv_w) > 1e-4))
    if a.torch:
        print("torchattacks + torchdeq ...", flush=True)
        res["rows"]["torchattacks + torchdeq"] = run_torch(x, y, correct, a.eps, a.steps, res)
        print(res["rows"]["torchattacks + torchdeq"], flush=True)
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    cold = res["rows"]["deqjax cold"]["s"]
    lines = [
        "# Warm-started DEQ solves inside PGD",
        "",
        f"CPU {m.get('cpu')}, 1 thread per framework; jax {m.get('jax')}, torch "
        f"{m.get('torch')}, torchattacks {m.get('torchattacks')}, torchdeq "
        f"{m.get('torchdeq')}; load average at start {m.get('load_average_1_5_15')}.",
        "",
        f"PGD-{res['steps']} (L∞, ε = {res['eps']}, α = 2.5·ε/{res['steps']}, one random "
        f"start) on the shipped TRADES MDEQ, {res['n']} mnist_5k test images in batches of "
        f"{res['batch']} (clean accuracy {100 * res['clean']:.1f}%). Solver: {res['solver']}.",
        "Robust accuracy is scored by each model's own cold forward. Steps: forward solver "
        "steps per solve, mean per example and loop length (the batch's maximum, which "
        "sets the wall time).",
        "",
        "| run | robust % | run s | compile s | speed vs deqjax cold | steps/solve (mean) "
        "| loop steps/solve |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        dash = "–"
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else dash
        mean = f"{r['mean_steps']:.1f}" if "mean_steps" in r else dash
        loop = f"{r['mean_loop_steps']:.1f}" if "mean_loop_steps" in r else dash
        lines.append(
            f"| {name} | {100 * r['robust']:.1f} | {r['s']:.1f} | {comp} | "
            f"{cold / r['s']:.2f}× | {mean} | {loop} |"
        )
    peer = res["rows"].get("torchattacks + torchdeq")
    if peer is not None:
        warm = res["rows"]["deqjax warm"]
        lines += [
            "",
            f"deqjax warm vs torchattacks + torchdeq: {peer['s'] / warm['s']:.2f}× the "
            f"speed; robust accuracy {100 * warm['robust']:.1f} vs {100 * peer['robust']:.1f}.",
        ]
    lines += [
        "",
        f"Adversarial examples cold vs warm: max |Δ| {res['adv_max_abs_diff']:.3g}, "
        f"fraction of pixels differing by > 1e-4: {res['adv_frac_pixels_differ']:.3f}.",
        "",
        "Produced by:",
        "",
        f"    {res['command']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="mnist_5k test images (default 200)")
    p.add_argument("--batch", type=int, default=100, help="attack batch (default 100)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--torch", action="store_true", help="also torchattacks + torchdeq")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.n % a.batch:
        p.error(f"--n ({a.n}) must be a multiple of --batch ({a.batch}): one compile")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.threads import configure_threads

    configure_threads(1)
    import torch

    from benchmarks import common

    torch.set_num_threads(1)
    common.steady_state_malloc()
    machine = common.machine()
    res = measure(a)
    res["machine"] = machine
    args = sys.argv[1:] if argv is None else list(argv)
    res["command"] = " ".join(["python -m benchmarks.warm_start", *args])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "warm_start.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    with open(os.path.join(a.out, "warm_start.md"), "w") as fh:
        fh.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
