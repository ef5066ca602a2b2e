"""Cross-check deqjax's attacks against torchattacks on identical weights and images.

    python -m benchmarks.crosscheck [--quick] [--model convnet|deq|all] [--n N]
        [--eps 0.05,0.1] [--norm linf|l2] [--parts attacks,ensemble,timing]
        [--out benchmarks/results]

torchattacks (3.5.1) carries PyTorch ports of the reference attacks (APGD, APGD-T and
FAB from fra31/auto-attack, Square) and an ``AutoAttack``. Both frameworks attack the
same network (weights copied Flax → torch by :mod:`benchmarks.torch_models`) on the
same mnist_5k test images with the same budgets; each framework scores its own
adversarial points with its own model, and robust accuracy = correct clean and still
correct on the attack's point.

Models (``--model``):

* ``convnet``: the benchmark conv net (:class:`benchmarks.common.SmallConvNet`)
  trained here on the mnist_5k training split (:func:`train_convnet`, deterministic).
* ``deq``: the shipped TRADES MDEQ (``tests/data/deq_mnist_trades_params.msgpack``,
  ``experiments/configs/deq_mnist_trades.py``) at its evaluation solver settings in
  both frameworks (Anderson m = 5, ridge 1e-4, ≤ 40 steps, relative tol 1e-3; implicit
  backward with an Anderson adjoint, ≤ 12 steps, tol 1e-3); torchdeq needs training
  mode to differentiate, so torch attacks in train mode and scores in eval mode.

Budgets (:data:`BUDGETS`): the conv net gets the reference's (100 iterations, 9
targets, Square 5000 queries; PGD-40), 500 images. One gradient of the DEQ costs
~150× the conv net's on this CPU (40 solver steps + 12 adjoint steps per call), so the
DEQ check runs 200 images with 10 iterations, 3 targets and 50 Square queries
(PGD-10) in both frameworks — a check of the implementations, not a strong evaluation.

Each deqjax attack runs as a one-attack compacting ensemble
(:func:`jax_compact_attack`: same robust flags as the plain call), so that, like
torchattacks, it attacks only the clean-correct examples and APGD-T / FAB-T run each
target only on the survivors; the times are then comparable.

Parts (``--parts``): ``attacks`` (PGD, APGD-CE, APGD-T, FAB-T, Square, one at a
time), ``ensemble`` (our ``evaluate_ensemble(attacks="standard", compact=True)`` vs
torchattacks' ``AutoAttack`` as shipped — 10 iterations of APGD/APGD-T/FAB — and vs
a torchattacks ``MultiAttack`` with the reference's budgets, the one to compare with)
and ``timing`` (the compacting ensemble's before/after wall time on 200 images).
Results are merged into ``OUT/crosscheck.json`` after every measurement (so parts
and models can be run separately) and ``OUT/crosscheck.md`` is rewritten from it.
Both frameworks run on 1 CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "fab-t", "square")
PARTS = ("attacks", "ensemble", "timing")
MODELS = ("convnet", "deq")

BUDGETS = {
    "convnet": dict(pgd_steps=40, n_iter=100, n_targets=9, n_queries=5000),
    "deq": dict(pgd_steps=10, n_iter=10, n_targets=3, n_queries=50),
    "quick": dict(pgd_steps=5, n_iter=5, n_targets=2, n_queries=50),
}
DEFAULT_EPS = {"convnet": (0.05, 0.1), "deq": (0.1, 0.2)}
DEFAULT_N = {"convnet": 500, "deq": 200}


# ------------------------------------------------------------------------ models
def train_convnet(n_train: int = 4000, epochs: int = 3, seed: int = 0):
    """SmallConvNet trained with Adam (lr 1e-3, batch 64) on the first ``n_train``
    mnist_5k training images; deterministic (fixed seed and shuffles, one thread).
    Returns (module, params)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from benchmarks import common
    from deqjax import data as data_lib

    ds = data_lib.mnist_5k()
    x, y = ds.train_images[:n_train], ds.train_labels[:n_train]
    net = common.SmallConvNet()
    params = net.init(jax.random.PRNGKey(seed), jnp.asarray(x[:2]))
    opt = optax.adam(1e-3)
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            net.apply(p, xb), yb
        ).mean()
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - 63, 64):
            idx = perm[i : i + 64]
            params, state = step(params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    return net, params


def load_trades_deq():
    """``(config, spec, variables)`` of the shipped TRADES MDEQ
    (``tests/data/deq_mnist_trades_params.msgpack``, ``experiments/configs/
    deq_mnist_trades.py``); ``spec.eval_kwargs["config"]`` is its evaluation solver."""
    import flax

    from experiments import models
    from experiments.configs import deq_mnist_trades

    config = deq_mnist_trades.get_config()
    spec = models.build(config, 10)
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
    with open(os.path.join(path, "deq_mnist_trades_params.msgpack"), "rb") as fh:
        params = flax.serialization.msgpack_restore(fh.read())
    return config, spec, {"params": params}


def load_model(name: str, quick: bool = False):
    """(jax logits_fn, torch attack model, torch scoring model, description dict)."""
    import jax

    from benchmarks.torch_models import TorchConvNet, TorchMDEQ, torchdeq_kwargs

    if name == "convnet":
        net, params = train_convnet(n_train=1000 if quick else 4000, epochs=1 if quick else 3)
        tnet = TorchConvNet().load_flax(jax.device_get(params)).eval()
        desc = dict(
            model="SmallConvNet (benchmarks.common) trained on mnist_5k "
            + ("(quick: 1000 images, 1 epoch)" if quick else "(4000 images, 3 epochs)"),
        )
        return (lambda xb: net.apply(params, xb)), tnet, tnet, desc
    config, spec, variables = load_trades_deq()
    params = variables["params"]
    ecfg = spec.eval_kwargs["config"]
    tm = TorchMDEQ(head_kind=config.model.head, deq_kwargs=torchdeq_kwargs(ecfg))
    tm.load_flax(params)
    desc = dict(
        model="TRADES MDEQ (tests/data/deq_mnist_trades_params.msgpack), implicit gradient",
        solver=f"forward {ecfg.forward}; adjoint {ecfg.adjoint_solver} "
        f"max_iter={ecfg.adjoint_max_iter} tol={ecfg.adjoint_tol}",
        torchdeq=torchdeq_kwargs(ecfg),
    )
    return (lambda xb: spec.module.apply(variables, xb, **spec.eval_kwargs)[0]), tm, tm, desc


# ---------------------------------------------------------------------- attacks
def jax_attack(name: str, b: dict, eps: float, norm: str):
    """deqjax attack ``(logits_fn, x, y, key) -> x_adv`` with the budgets ``b`` (the
    plain call; the cross-check runs :func:`jax_compact_attack`)."""
    from deqjax import attacks as A

    kw = dict(eps=eps, norm=norm)
    return {
        "pgd": lambda f, x, y, k: A.pgd(
            f, x, y, k, steps=b["pgd_steps"], step_size=2.5 * eps / b["pgd_steps"], **kw
        ),
        "apgd-ce": lambda f, x, y, k: A.apgd(f, x, y, k, steps=b["n_iter"], **kw),
        "apgd-t": lambda f, x, y, k: A.apgd_targeted(
            f, x, y, k, steps=b["n_iter"], n_target_classes=b["n_targets"], **kw
        ),
        "fab-t": lambda f, x, y, k: A.fab_targeted(
            f, x, y, k, steps=b["n_iter"], n_target_classes=b["n_targets"], **kw
        ),
        "square": lambda f, x, y, k: A.square(
            f, x, y, k, n_queries=b["n_queries"], rescale_schedule=False, **kw
        ),
    }[name]


def jax_compact_attack(name: str, b: dict, eps: float, norm: str, bucket=(64, 16)):
    """The attack as a one-attack compacting ensemble ``(logits_fn, x, y, key) ->
    EnsembleResult``: it runs only on the correctly classified examples and APGD-T /
    FAB-T run each target only on the survivors of the previous ones — the work
    torchattacks does — with the robust flags of the plain attack (see
    :mod:`deqjax.attacks.ensemble`; PGD's step 2.5·eps/steps as torchattacks' here)."""
    from deqjax import attacks as A

    n_iter = b["pgd_steps"] if name == "pgd" else b["n_iter"]
    kw = dict(n_iter=n_iter, n_queries=b["n_queries"], n_target_classes=b["n_targets"])
    return lambda f, x, y, k: A.evaluate_ensemble(
        f, x, y, k, eps=eps, norm=norm, attacks=[name], compact=True, bucket_size=bucket, **kw
    )


def torch_attack(name: str, model, b: dict, eps: float, norm: str, n_classes: int = 10):
    """The torchattacks peer of :func:`jax_attack` (seed 0)."""
    import torchattacks as ta

    tn = {"linf": "Linf", "l2": "L2"}[norm]
    if name == "pgd":
        cls = ta.PGD if norm == "linf" else ta.PGDL2
        atk = cls(model, eps=eps, alpha=2.5 * eps / b["pgd_steps"], steps=b["pgd_steps"])
    elif name == "apgd-ce":
        atk = ta.APGD(model, norm=tn, eps=eps, steps=b["n_iter"], loss="ce", seed=0)
    elif name == "apgd-t":
        atk = ta.APGDT(model, norm=tn, eps=eps, steps=b["n_iter"], n_classes=n_classes, seed=0)
        atk.n_target_classes = b["n_targets"]
    elif name == "fab-t":
        atk = ta.FAB(
            model, norm=tn, eps=eps, steps=b["n_iter"], multi_targeted=True, n_classes=n_classes
        )
        atk.n_target_classes = b["n_targets"]
    elif name == "square":
        atk = ta.Square(
            model, norm=tn, eps=eps, n_queries=b["n_queries"], resc_schedule=False, seed=0
        )
    else:
        raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
    return atk


def torch_autoattack(model, b: dict, eps: float, norm: str, reference_budgets: bool):
    """torchattacks' AutoAttack as shipped (``reference_budgets=False``: its APGD,
    APGD-T and FAB default to 10 iterations) or the same four attacks with the budgets
    ``b`` (the reference's: 100 iterations, 9 targets, Square 5000 without rescaling)."""
    import torchattacks as ta

    if not reference_budgets:
        return ta.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, seed=0)
    names = ("apgd-ce", "apgd-t", "fab-t", "square")
    return ta.MultiAttack([torch_attack(n, model, b, eps, norm) for n in names])


# ------------------------------------------------------------------------ running
def run_torch(atk, model, x, y, correct, train_mode: bool):
    """Attack with torchattacks; returns (robust flags, seconds)."""
    import torch

    from benchmarks import common
    from benchmarks.torch_models import robust_flags

    def set_mode(a):  # MultiAttack / AutoAttack call their sub-attacks with their own mode
        a.set_model_training_mode(model_training=train_mode)
        for sub in getattr(a, "attacks", []) + [getattr(a, "_autoattack", None)]:
            if sub is not None:
                set_mode(sub)

    set_mode(atk)
    xt, yt = common.to_nchw(x), torch.from_numpy(y).long()
    t = time.perf_counter()
    adv = atk(xt, yt).detach()
    sec = time.perf_counter() - t
    return robust_flags(model, adv, y, correct), sec


def run_jax(fn, logits_fn, x, y, correct, key, compiler_options=None):
    """Jit ``fn(x, y, key) -> x_adv`` (or an EnsembleResult); returns (robust flags,
    compile seconds, run seconds)."""
    import jax
    import numpy as np

    t = time.perf_counter()
    compiled = jax.jit(fn).lower(x, y, key).compile(compiler_options)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(x, y, key))
    run_s = time.perf_counter() - t
    if hasattr(out, "robust"):
        return np.asarray(out.robust) & correct, compile_s, run_s
    pred = np.asarray(jax.jit(logits_fn)(out)).argmax(-1)
    return correct & (pred == y), compile_s, run_s


def _clean(logits_fn, tscore, x, y):
    import jax
    import numpy as np
    import torch

    from benchmarks import common

    zj = np.asarray(jax.jit(logits_fn)(x))
    tscore.eval()
    with torch.no_grad():
        zt = np.concatenate(
            [tscore(common.to_nchw(x[i : i + 250])).numpy() for i in range(0, len(y), 250)]
        )
    return dict(
        correct_jax=zj.argmax(1) == y,
        correct_torch=zt.argmax(1) == y,
        max_abs_logit_diff=float(np.abs(zj - zt).max()),
        argmax_agreement=float(np.mean(zj.argmax(1) == zt.argmax(1))),
    )


# ------------------------------------------------------------------------- results
def _load(path):
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    return {"models": {}}


def _save(res, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "crosscheck.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    with open(os.path.join(out, "crosscheck.md"), "w") as fh:
        fh.write(markdown(res))


def _pct(v):
    return f"{100 * v:.1f}"


def markdown(res: dict) -> str:
    m = res.get("machine", {})
    lines = [
        "# deqjax vs torchattacks: robust accuracy on identical weights and images",
        "",
        f"jax {m.get('jax')}, torch {m.get('torch')}, torchattacks {m.get('torchattacks')}, "
        f"torchdeq {m.get('torchdeq')}; CPU {m.get('cpu')}, 1 thread per framework. "
        "Robust accuracy in %, Δ = deqjax − torchattacks (negative: deqjax stronger); "
        "times in seconds (deqjax: run, plus compile in brackets).",
        "",
    ]
    for mname, mres in res["models"].items():
        info = mres.get("info", {})
        lines += [f"## {mname}: {info.get('model', '')}", ""]
        if "solver" in info:
            lines += [f"Solver: {info['solver']}.", ""]
        lines += [
            f"{info.get('n')} mnist_5k test images; clean accuracy deqjax "
            f"{_pct(info.get('clean_jax', 0))}, torch {_pct(info.get('clean_torch', 0))}; "
            f"max |Δ logit| {info.get('max_abs_logit_diff', 0):.2e}, argmax agreement "
            f"{_pct(info.get('argmax_agreement', 0))}. Budgets: {info.get('budgets')}.",
            "",
            "| norm | eps | attack | deqjax | torchattacks | Δ | deqjax s | torch s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, rows in mres.get("results", {}).items():
            norm, eps = key.split(":")
            for att, r in rows.items():
                lines.append(
                    f"| {norm} | {eps} | {att} | {_pct(r['deqjax'])} | {_pct(r['torch'])} | "
                    f"{100 * (r['deqjax'] - r['torch']):+.1f} | {r['deqjax_s']:.1f} "
                    f"({r['deqjax_compile_s']:.1f}) | {r['torch_s']:.1f} |"
                )
        lines.append("")
        for key, t in mres.get("timing", {}).items():
            lines += [
                f"Ensemble wall time, {key} ({t['n']} images; seconds; robust % in brackets): "
                + "; ".join(f"{k} {v['s']:.0f} ({_pct(v['robust'])})" for k, v in t["runs"].items())
                + ".",
                "",
            ]
    lines += ["Produced by:", ""] + [f"    {c}" for c in res.get("commands", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def crosscheck_model(mname, res, args, out):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deqjax import attacks as A
    from deqjax import data as data_lib

    b = BUDGETS["quick" if args.quick else mname]
    n = args.n or (64 if args.quick else DEFAULT_N[mname])
    eps_list = [float(e) for e in args.eps.split(",")] if args.eps else DEFAULT_EPS[mname]
    logits_fn, tatk, tscore, desc = load_model(mname, args.quick)
    train_mode = mname == "deq"  # torchdeq differentiates only in training mode
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[:n], ds.test_labels[:n].astype(np.int32)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    cl = _clean(logits_fn, tscore, x, y)
    mres = res["models"].setdefault(mname, {})
    mres["info"] = dict(
        desc,
        n=n,
        budgets=b,
        clean_jax=float(cl["correct_jax"].mean()),
        clean_torch=float(cl["correct_torch"].mean()),
        max_abs_logit_diff=cl["max_abs_logit_diff"],
        argmax_agreement=cl["argmax_agreement"],
    )
    key = jax.random.PRNGKey(0)
    for eps in eps_list:
        rows = mres.setdefault("results", {}).setdefault(f"{args.norm}:{eps:g}", {})
        todo = []
        if "attacks" in args.parts:
            todo += [(a, False) for a in ATTACKS if a in args.attacks]
        if "ensemble" in args.parts:
            todo += [("ensemble (standard)", True)]
        for name, ens in todo:
            print(f"[{mname} {args.norm} eps={eps:g}] {name} ...", flush=True)
            if ens:
                kw = dict(
                    n_iter=b["n_iter"], n_queries=b["n_queries"], n_target_classes=b["n_targets"]
                )
                fn = lambda x, y, k, kw=kw, eps=eps: A.evaluate_ensemble(
                    logits_fn, x, y, k, eps=eps, norm=args.norm, compact=True, **kw
                )
                ref = torch_autoattack(tatk, b, eps, args.norm, reference_budgets=True)
            else:
                att = jax_compact_attack(name, b, eps, args.norm)
                fn = lambda x, y, k, att=att: att(logits_fn, x, y, k)
                ref = torch_attack(name, tatk, b, eps, args.norm)
            rj, cj, sj = run_jax(fn, logits_fn, xj, yj, cl["correct_jax"], key)
            rt, st = run_torch(ref, tatk, x, y, cl["correct_torch"], train_mode)
            rows[name] = dict(
                deqjax=float(rj.mean()),
                torch=float(rt.mean()),
                deqjax_s=sj,
                deqjax_compile_s=cj,
                torch_s=st,
                only_deqjax_broke=int(np.sum(~rj & rt)),
                only_torch_broke=int(np.sum(rj & ~rt)),
            )
            if ens and not args.quick and mname == "convnet":
                shipped = torch_autoattack(tatk, b, eps, args.norm, reference_budgets=False)
                rs, ss = run_torch(shipped, tatk, x, y, cl["correct_torch"], train_mode)
                rows["torchattacks.AutoAttack as shipped (10 iterations)"] = dict(
                    deqjax=float(rj.mean()),
                    torch=float(rs.mean()),
                    deqjax_s=sj,
                    deqjax_compile_s=cj,
                    torch_s=ss,
                )
            print(f"    {rows[name]}", flush=True)
            _save(res, out)
    if "timing" in args.parts:
        timing(mname, res, logits_fn, tatk, x, y, cl, b, args, out, train_mode)


def timing(mname, res, logits_fn, tatk, x, y, cl, b, args, out, train_mode):
    """Before/after wall time of the compacting ensemble (and of APGD-T alone) on the
    first 200 images, with torchattacks for comparison."""
    import jax
    import jax.numpy as jnp

    from deqjax import attacks as A

    n = min(len(x), 64 if args.quick else 200)
    x, y = x[:n], y[:n]
    cj, ct = cl["correct_jax"][:n], cl["correct_torch"][:n]
    xj, yj, key = jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0)
    eps_list = [float(e) for e in args.eps.split(",")] if args.eps else DEFAULT_EPS[mname]
    kw = dict(n_iter=b["n_iter"], n_queries=b["n_queries"], n_target_classes=b["n_targets"])
    for eps in eps_list:
        runs = {}
        for label, attacks in (("standard", "standard"), ("apgd-t", ["apgd-t"])):
            for compact in (False, True):
                fn = lambda x, y, k, a=attacks, c=compact, eps=eps: A.evaluate_ensemble(
                    logits_fn, x, y, k, eps=eps, norm=args.norm, attacks=a, compact=c, **kw
                )
                print(f"[timing {mname} eps={eps:g}] {label} compact={compact}", flush=True)
                r, c_s, s = run_jax(fn, logits_fn, xj, yj, cj, key)
                runs[f"deqjax {label} compact={compact}"] = dict(
                    s=s, compile_s=c_s, robust=float(r.mean())
                )
            if label == "standard":
                for ref_b in (True, False):
                    atk = torch_autoattack(tatk, b, eps, args.norm, reference_budgets=ref_b)
                    r, s = run_torch(atk, tatk, x, y, ct, train_mode)
                    name = "reference budgets" if ref_b else "AutoAttack as shipped"
                    runs[f"torchattacks {name}"] = dict(s=s, robust=float(r.mean()))
            else:
                atk = torch_attack("apgd-t", tatk, b, eps, args.norm)
                r, s = run_torch(atk, tatk, x, y, ct, train_mode)
                runs["torchattacks APGD-T"] = dict(s=s, robust=float(r.mean()))
            print(f"    {runs}", flush=True)
        res["models"][mname].setdefault("timing", {})[f"{args.norm} eps={eps:g}"] = dict(
            n=n, runs=runs
        )
        _save(res, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 images, tiny budgets (smoke run)")
    p.add_argument("--model", default="convnet", choices=MODELS + ("all",))
    p.add_argument("--n", type=int, default=0, help="images (default 500; quick 64)")
    p.add_argument("--eps", default="", help="comma-separated radii (default per model)")
    p.add_argument("--norm", default="linf", choices=("linf", "l2"))
    p.add_argument("--parts", default="attacks,ensemble", help=f"subset of {PARTS}")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"subset of {ATTACKS}")
    p.add_argument("--out", default="", help="default benchmarks/results (quick: /tmp)")
    a = p.parse_args(argv)
    a.parts = a.parts.split(",")
    a.attacks = a.attacks.split(",")
    for part in a.parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {PARTS}")
    for att in a.attacks:
        if att not in ATTACKS:
            p.error(f"unknown attack {att!r}; choose from {ATTACKS}")
    out = a.out or ("/tmp/deqjax_crosscheck_quick" if a.quick else "benchmarks/results")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.threads import configure_threads

    configure_threads(1)
    import torch

    from benchmarks import common

    torch.set_num_threads(1)
    common.steady_state_malloc()
    res = _load(os.path.join(out, "crosscheck.json"))
    res["machine"] = common.machine()
    args = sys.argv[1:] if argv is None else list(argv)
    res.setdefault("commands", []).append(" ".join(["python -m benchmarks.crosscheck", *args]))
    for mname in MODELS if a.model == "all" else (a.model,):
        crosscheck_model(mname, res, a, out)
    _save(res, out)


if __name__ == "__main__":
    main()
