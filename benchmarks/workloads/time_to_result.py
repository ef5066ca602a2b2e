"""Time-to-result workloads: what a user waits for, each framework at its best.

Unlike the equal-work rows (same solver steps on both sides), these rows let each
side do the work its design allows and time the result (one run per side, jax first;
JAX's compile time is part of the time to result and also reported apart):

* :func:`train_to_accuracy` — the ``deq_mnist`` model (MDEQ width 32, pool-flatten
  head; Adam 2e-3, 50 warm-up steps and cosine decay over 3 epochs, batch 64, global
  gradient clip 1.0) trained on mnist_5k until its test accuracy (1,000 images, each
  side's evaluation forward, measured every ``eval_every`` steps) first reaches
  ``target``. deqjax: ``experiments/configs/deq_mnist.py`` as shipped (Anderson ≤ 20
  steps, rel. tol 1e-3, implicit gradient with an Anderson adjoint, Jacobian
  regulariser 4.0; 60-step evaluation) through ``experiments.train.make_train_step``.
  torch: :class:`benchmarks.torch_models.TorchMDEQ` with **torchdeq's defaults**
  (``get_deq()``: "sliced" core, fixed-point iteration ≤ 40 steps, tol 1e-3, 1-step
  phantom gradient), the same initial weights (copied from deqjax's), data order
  (:func:`deqjax.data.epoch_permutation`), optimiser, schedule, clipping and batch.
  Time to result = the training steps' wall time until the first evaluation at or
  above ``target`` (the evaluations themselves are reported apart).
* :func:`pgd_warm_vs_torch` — PGD-``steps`` (L∞, ε, α = 2.5·ε/steps, one random start,
  CE) on the shipped TRADES MDEQ at its evaluation solver (Anderson ≤ 40 steps, rel.
  tol 1e-3; implicit gradient, Anderson adjoint ≤ 12 steps, tol 1e-3): deqjax with
  warm-started solves (:func:`deqjax.models.warm_start_logits`) vs a PGD loop over
  the torchdeq port. The torch loop is ours, not torchattacks' ``PGD``: that one
  differentiates the batch-**mean** cross-entropy, and torchdeq's Anderson adjoint
  (absolute ridge 1e-4) solves the 1/B-scaled cotangent inaccurately — measured on the
  first 100 test images, the same loop with the mean loss leaves 45% robust against 35%
  with the sum (and deqjax's 34-35%). The torch loop differentiates the sum, so both
  sides compute the same attack; ``peer_n`` images are also attacked with
  torchattacks' PGD as shipped for the record. Each side scores its own points with
  its own model in eval mode.
* :func:`autoattack_suite` — the AutoAttack "standard" suite on the benchmark conv net
  (``benchmarks.crosscheck``'s, trained here), ``n`` images: deqjax's compacting
  ensemble (``evaluate_ensemble(attacks="standard", compact=True)``: APGD-CE, APGD-T,
  FAB-T, Square 5000, each later attack on the survivors only) vs torchattacks'
  ``MultiAttack`` of the same four attacks at the reference budgets (100 iterations, 9
  targets, Square 5000), which also attacks survivors only; and torchattacks'
  ``AutoAttack`` as shipped (10 iterations) for the record.
"""

from __future__ import annotations

import time

import numpy as np

TARGET_ACCURACY = 0.95
# further deqjax rows of the training benchmark: name -> config overrides
TRAIN_VARIANTS = {
    "deqjax, phantom gradient": {"deq.backward": "phantom"},
    # the algorithm of torchdeq's defaults, in deqjax: fixed-point iteration ≤ 40 steps to
    # an absolute residual of 1e-3, a 1-step phantom gradient (τ = 1), no regulariser
    "deqjax, torchdeq's recipe": {
        "deq.solver": "fixed_point",
        "deq.max_iter": 40,
        "deq.eval_max_iter": 40,
        "deq.tol": 1e-3,
        "deq.stop_mode": "abs",
        "deq.backward": "phantom",
        "deq.phantom_steps": 1,
        "deq.phantom_damping": 1.0,
        "deq.jac_reg": 0.0,
    },
}


# --------------------------------------------------------------------------- training
def _torch_schedule(t, total_steps: int):
    """The optax learning-rate schedule of ``experiments.common.build_optimizer`` as a
    Python function of the step (for torch's LambdaLR)."""
    import optax

    sched = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, min(t.warmup_steps, total_steps // 2), max(total_steps, 1)
    )
    return lambda step: float(sched(step)) / t.learning_rate


def _jax_trainer(config, n_train: int):
    """deqjax's ``deq_mnist`` training as shipped: ``(state, step_fn, accuracy_fn)``."""
    from experiments import common, models
    from experiments import train as train_lib

    steps_per_epoch = n_train // config.train.batch_size
    spec = models.build(config, 10)
    opt = common.build_optimizer(config.train, steps_per_epoch * config.train.epochs)
    state = common.init_state(spec.module, opt, (28, 28, 1), config.seed)
    step_fn = train_lib.make_train_step(spec, opt, config)
    predict = train_lib.make_eval_fn(spec)

    def accuracy(state, images, labels):
        return train_lib.evaluate(predict, state, images, labels, config.eval.batch_size)[
            "accuracy"
        ]

    return state, step_fn, accuracy


def _torch_trainer(config, init_params, n_train: int):
    """The same model in torch with torchdeq's defaults: ``(step_fn, accuracy_fn)``."""
    import torch

    from benchmarks import common
    from benchmarks.torch_models import TorchMDEQ, robust_flags

    m, t = config.model, config.train
    tm = TorchMDEQ(m.width, m.inner, m.groups, head_kind=m.head, deq_kwargs={})
    tm.load_flax(init_params)
    opt = torch.optim.Adam(tm.parameters(), lr=t.learning_rate, eps=1e-8)
    total = (n_train // t.batch_size) * t.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _torch_schedule(t, total))

    def step(x, y):
        tm.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(tm(common.to_nchw(x)), torch.from_numpy(y).long())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        return loss.item()

    def accuracy(images, labels):
        everyone = np.ones(len(labels), bool)
        return float(robust_flags(tm, common.to_nchw(images), labels, everyone).mean())

    return step, accuracy


def train_to_accuracy(
    target: float = TARGET_ACCURACY,
    eval_every: int = 31,
    epochs: int | None = None,
    limit_train: int = 0,
    limit_test: int = 0,
    overrides: dict | None = None,
    variants: dict | None = None,
    include_default: bool = True,
) -> dict:
    """Train deqjax's and torch's ``deq_mnist`` until the test accuracy reaches
    ``target`` (or the schedule ends); returns one row per framework with
    ``time_to_target_s`` (None if never reached), the evaluation trace and times.
    ``epochs``, ``limit_train`` / ``limit_test`` (first N images) and ``overrides``
    (config keys, e.g. ``{"deq.max_iter": 4}``) exist for the tests' tiny runs.
    ``variants`` maps a row name to more config overrides for further deqjax runs from
    the same initial weights (default: :data:`TRAIN_VARIANTS`); ``include_default=False``
    skips the shipped-config row (to add variants to an earlier run)."""
    import jax

    from deqjax import data as data_lib
    from experiments.configs import deq_mnist

    config = deq_mnist.get_config()
    if epochs is not None:
        config.train.epochs = epochs
    config.update_from_flattened_dict(overrides or {})
    ds = data_lib.mnist_5k()
    xtr, ytr = ds.train_images, ds.train_labels.astype(np.int32)
    if limit_train:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    xte, yte = ds.test_images, ds.test_labels.astype(np.int32)
    if limit_test:
        xte, yte = xte[:limit_test], yte[:limit_test]
    bs = config.train.batch_size
    state, jstep, jacc = _jax_trainer(config, len(ytr))
    init_params = jax.device_get(state.params)
    tstep, tacc = _torch_trainer(config, init_params, len(ytr))

    def batches():
        for epoch in range(config.train.epochs):
            perm = data_lib.epoch_permutation(len(ytr), config.seed, epoch)
            for b in range(len(ytr) // bs):
                idx = perm[b * bs : (b + 1) * bs]
                yield xtr[idx], ytr[idx]

    def run(step, accuracy, name):
        train_s, eval_s, trace, first_s = 0.0, 0.0, [], None
        for i, (x, y) in enumerate(batches(), start=1):
            t0 = time.perf_counter()
            step(x, y)
            dt = time.perf_counter() - t0
            train_s += dt
            if i == 1:
                first_s = dt
            if i % eval_every == 0:
                t0 = time.perf_counter()
                acc = accuracy(xte, yte)
                eval_s += time.perf_counter() - t0
                trace.append(dict(step=i, train_s=train_s, test_accuracy=acc))
                print(f"    {name} step {i}: acc {acc:.3f} after {train_s:.1f} s", flush=True)
                if acc >= target:
                    break
        hit = [r for r in trace if r["test_accuracy"] >= target]
        return dict(
            time_to_target_s=hit[0]["train_s"] if hit else None,
            steps_to_target=hit[0]["step"] if hit else None,
            best_accuracy=max([r["test_accuracy"] for r in trace], default=float("nan")),
            train_s=train_s,
            eval_s=eval_s,
            first_step_s=first_s,
            trace=trace,
        )

    def run_jax(state, jstep, jacc, name):
        holder = {"state": state}

        def jax_step(x, y):
            holder["state"], aux = jstep(
                holder["state"], jax.numpy.asarray(x), jax.numpy.asarray(y)
            )
            jax.block_until_ready(aux["loss"])

        return run(jax_step, lambda a, b: jacc(holder["state"], a, b), name)

    rows = {"deqjax": run_jax(state, jstep, jacc, "deqjax")} if include_default else {}
    for name, extra in (TRAIN_VARIANTS if variants is None else variants).items():
        vconfig = config.copy_and_resolve_references()
        vconfig.update_from_flattened_dict(extra)
        vstate, vstep, vacc = _jax_trainer(vconfig, len(ytr))  # same seed: same weights
        rows[name] = run_jax(vstate, vstep, vacc, name)
    rows["torch + torchdeq defaults"] = run(tstep, tacc, "torch")
    return dict(target=target, eval_every=eval_every, epochs=config.train.epochs, rows=rows)


# --------------------------------------------------------------------------- PGD
def torch_pgd(model, x, y, *, eps, steps, alpha, batch, seed=0, reduction="sum"):
    """L∞ PGD on a torch model from a uniform random start (torchattacks' update and
    projection), differentiating the ``reduction`` of the per-example CE; returns the
    last iterate as NHWC numpy. The model attacks in training mode (torchdeq builds its
    implicit backward only there)."""
    import torch

    from benchmarks import common

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(y), batch):
        xb, yb = common.to_nchw(x[i : i + batch]), torch.from_numpy(y[i : i + batch]).long()
        adv = (xb + torch.empty_like(xb).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
        for _ in range(steps):
            model.train()
            adv.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(adv), yb, reduction=reduction)
            (g,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + alpha * g.sign()
            adv = (xb + (adv - xb).clamp(-eps, eps)).clamp(0, 1).detach()
        out.append(adv.permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def pgd_warm_vs_torch(
    n: int = 500, batch: int = 20, eps: float = 0.1, steps: int = 20, peer_n: int = 100
) -> dict:
    """deqjax warm-started PGD vs the torch PGD loop on the shipped TRADES DEQ."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks import common, crosscheck
    from benchmarks.torch_models import TorchMDEQ, robust_flags, torchdeq_kwargs
    from benchmarks.warm_start import StepCounter, run_deqjax
    from deqjax import data as data_lib
    from deqjax.models import warm_start_logits

    config, spec, variables = crosscheck.load_trades_deq()
    ecfg = spec.eval_kwargs["config"]
    cold = jax.jit(lambda xb: spec.module.apply(variables, xb, config=ecfg)[0])
    tm = TorchMDEQ(head_kind=config.model.head, deq_kwargs=torchdeq_kwargs(ecfg))
    tm.load_flax(variables["params"])
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[:n], ds.test_labels[:n].astype(np.int32)

    def t_robust(xa, labels, correct):  # torch's own eval-mode scoring
        return robust_flags(tm, common.to_nchw(xa), labels, correct)

    cj = np.concatenate([np.asarray(cold(x[i : i + batch])).argmax(-1) for i in range(0, n, batch)])
    cj, ct = cj == y, t_robust(x, y, np.ones(n, bool))
    counter = StepCounter()
    warm = warm_start_logits(spec.module, variables, config=ecfg, on_steps=counter)
    row_j, _ = run_deqjax(
        warm,
        cold,
        jnp.asarray(x),
        jnp.asarray(y),
        cj,
        jax.random.PRNGKey(0),
        eps,
        steps,
        batch,
        counter,
    )
    row_j["time_to_result_s"] = row_j["s"] + row_j["compile_s"]
    alpha = 2.5 * eps / steps
    t0 = time.perf_counter()
    adv = torch_pgd(tm, x, y, eps=eps, steps=steps, alpha=alpha, batch=batch)
    row_t = dict(s=time.perf_counter() - t0)
    row_t["robust"] = float(t_robust(adv, y, ct).mean())
    row_t["time_to_result_s"] = row_t["s"]
    res = dict(
        n=n,
        batch=batch,
        eps=eps,
        steps=steps,
        clean_deqjax=float(cj.mean()),
        clean_torch=float(ct.mean()),
        rows={"deqjax warm-started": row_j, "torch PGD loop + torchdeq": row_t},
    )
    if peer_n:
        from benchmarks.crosscheck import torch_attack

        atk = torch_attack("pgd", tm, dict(pgd_steps=steps), eps, "linf")
        atk.set_model_training_mode(model_training=True)
        xs, ys = x[:peer_n], y[:peer_n]
        t0 = time.perf_counter()
        advs = np.concatenate(
            [
                atk(common.to_nchw(xs[i : i + batch]), torch.from_numpy(ys[i : i + batch]).long())
                .detach()
                .permute(0, 2, 3, 1)
                .numpy()
                for i in range(0, peer_n, batch)
            ]
        )
        sec = time.perf_counter() - t0
        mine = torch_pgd(tm, xs, ys, eps=eps, steps=steps, alpha=alpha, batch=batch)
        pr = lambda a: float(t_robust(a, ys, ct[:peer_n]).mean())
        res["torchattacks_mean_ce"] = dict(
            n=peer_n, robust=pr(advs), s=sec, robust_sum_ce_loop=pr(mine)
        )
    return res


# --------------------------------------------------------------------------- AutoAttack
def autoattack_suite(n: int = 500, eps: float = 0.1, quick: bool = False) -> dict:
    """deqjax's compacting standard ensemble vs torchattacks at the reference budgets."""
    import jax
    import jax.numpy as jnp

    from benchmarks import crosscheck as X
    from deqjax import attacks as A
    from deqjax import data as data_lib

    b = X.BUDGETS["quick" if quick else "convnet"]
    logits_fn, tatk, tscore, _ = X.load_model("convnet", quick)
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[:n], ds.test_labels[:n].astype(np.int32)
    cl = X._clean(logits_fn, tscore, x, y)
    kw = dict(n_iter=b["n_iter"], n_queries=b["n_queries"], n_target_classes=b["n_targets"])
    fn = lambda xx, yy, k: A.evaluate_ensemble(
        logits_fn, xx, yy, k, eps=eps, norm="linf", compact=True, **kw
    )
    rj, cj, sj = X.run_jax(
        fn, logits_fn, jnp.asarray(x), jnp.asarray(y), cl["correct_jax"], jax.random.PRNGKey(0)
    )
    rows = {
        "deqjax standard (compacting)": dict(
            robust=float(rj.mean()), s=sj, compile_s=cj, time_to_result_s=sj + cj
        )
    }
    for ref, name in (
        (True, "torchattacks, reference budgets"),
        (False, "torchattacks.AutoAttack as shipped (10 iterations)"),
    ):
        atk = X.torch_autoattack(tatk, b, eps, "linf", reference_budgets=ref)
        r, s = X.run_torch(atk, tatk, x, y, cl["correct_torch"], train_mode=False)
        rows[name] = dict(robust=float(r.mean()), s=s, time_to_result_s=s)
    return dict(n=n, eps=eps, budgets=b, rows=rows)


WORKLOADS = {
    "ttr_train": train_to_accuracy,
    "ttr_pgd": pgd_warm_vs_torch,
    "ttr_autoattack": autoattack_suite,
}
QUICK = {  # ``benchmarks.run --quick``: smoke sizes
    "ttr_train": dict(limit_train=512, limit_test=200, target=0.5, eval_every=4),
    "ttr_pgd": dict(n=40, peer_n=20),
    "ttr_autoattack": dict(n=64, quick=True),
}


# --------------------------------------------------------------------------- report
def _fmt_s(v):
    return "not reached" if v is None else f"{v:.1f}"


def markdown_rows(T: dict) -> list[str]:
    """The time-to-result table of ``benchmarks.run``'s report (deqjax vs its peer;
    speed-up = peer time / deqjax time, > 1: deqjax faster)."""
    lines = [
        "| time to result | deqjax (s) | peer (s) | speed-up | deqjax result | peer result "
        "| what runs |",
        "|---|---|---|---|---|---|---|",
    ]
    if "ttr_train" in T:
        r = T["ttr_train"]
        t = r["rows"]["torch + torchdeq defaults"]
        res = lambda x: (
            f"{100 * r['target']:.0f}% at step {x['steps_to_target']}"
            if x["steps_to_target"]
            else f"best {100 * x['best_accuracy']:.1f}% in {r['epochs']} epochs"
        )
        for name, j in r["rows"].items():
            if name == "torch + torchdeq defaults":
                continue
            sj, st = j["time_to_target_s"], t["time_to_target_s"]
            sp = f"{st / sj:.2f}×" if sj and st else "–"
            lines.append(
                f"| train deq_mnist to {100 * r['target']:.0f}% test accuracy: {name} "
                f"| {_fmt_s(sj)} | {_fmt_s(st)} | {sp} | {res(j)} | {res(t)} | deqjax: "
                f"deq_mnist {'as shipped' if name == 'deqjax' else 'with ' + name.split(', ')[-1]} "
                f"(first step incl. compile {j['first_step_s']:.1f} s); torch: same model, "
                f"init, data order, optimiser, with torchdeq's defaults; test accuracy every "
                f"{r['eval_every']} steps (evaluations not timed: deqjax {j['eval_s']:.0f} s, "
                f"torch {t['eval_s']:.0f} s) |"
            )
    if "ttr_pgd" in T:
        r = T["ttr_pgd"]
        j, t = r["rows"]["deqjax warm-started"], r["rows"]["torch PGD loop + torchdeq"]
        note = ""
        if "torchattacks_mean_ce" in r:
            m = r["torchattacks_mean_ce"]
            note = (
                f"; torchattacks' PGD as shipped (mean CE) on the first {m['n']}: "
                f"{100 * m['robust']:.1f}% robust vs {100 * m['robust_sum_ce_loop']:.1f}% "
                "with the sum"
            )
        lines.append(
            f"| PGD-{r['steps']} ε={r['eps']:g}, TRADES DEQ, {r['n']} images | "
            f"{j['time_to_result_s']:.1f} | {t['time_to_result_s']:.1f} | "
            f"{t['time_to_result_s'] / j['time_to_result_s']:.2f}× | "
            f"{100 * j['robust']:.1f}% robust | {100 * t['robust']:.1f}% robust | deqjax "
            f"warm-started (compile {j['compile_s']:.1f} s incl.; {j['mean_steps']:.1f} "
            f"forward steps per solve) vs a torch PGD loop (sum CE) over torchdeq, batch "
            f"{r['batch']}{note} |"
        )
    if "ttr_autoattack" in T:
        r = T["ttr_autoattack"]
        j = r["rows"]["deqjax standard (compacting)"]
        t = r["rows"]["torchattacks, reference budgets"]
        s = r["rows"]["torchattacks.AutoAttack as shipped (10 iterations)"]
        lines.append(
            f"| AutoAttack standard, conv net, {r['n']} images, ε={r['eps']:g} | "
            f"{j['time_to_result_s']:.1f} | {t['time_to_result_s']:.1f} | "
            f"{t['time_to_result_s'] / j['time_to_result_s']:.2f}× | "
            f"{100 * j['robust']:.1f}% robust | {100 * t['robust']:.1f}% robust | "
            f"deqjax compacting ensemble (compile {j['compile_s']:.1f} s incl.) vs "
            f"torchattacks APGD-CE, APGD-T, FAB-T, Square at the reference budgets "
            f"{r['budgets']}; torchattacks.AutoAttack as shipped (10 iterations): "
            f"{s['s']:.1f} s, {100 * s['robust']:.1f}% |"
        )
    return lines
