"""Robustness evaluation: the per-example worst case over attacks AND gradient paths.

A model is given as ``views``: a mapping from a view name to a logits function that
attacks follow, and ``score``, the model's own logits function (default: the first
view). A view usually computes the model's logits and differs only in its gradient
(for DEQs: implicit, phantom, intermediate states, …, see :mod:`deqjax.deq_gradients`;
for an explicit network there is one view); for a defended model it may be another
model altogether (a transfer attack, see :func:`deqjax.bpda.adaptive_views`). For each
ε, every gradient attack runs through every view, gradient-free attacks run once, every
output is scored by ``score``, and an example is robust only if it is classified
correctly clean and under all of them (docs/concepts/evaluation.md). Sanity flags come with
every evaluation.

Scale: each chunk of ``batch_size`` examples is split over the devices of a mesh
(``NamedSharding`` on the batch axis; all devices of all processes by default) and
the attacks run under ``jax.jit`` on the sharded chunk. A short last chunk is padded
to a multiple of the device count with copies of its last example, then discarded.
Every view of one attack at one ε gets the same key (the same random starts), so views
are compared on equal terms. Chunks, and the key of each (attack, ε), do not depend on
the device count, and the
random draws of the attacks are the same for any sharding (and for the padded rows'
neighbours: draws are prefix-stable), so the report is the same on 1 or N devices
(up to floating-point reduction order inside the model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deqjax import attacks as A
from deqjax.attacks import _common as C

GRADIENT_ATTACKS = ("fgsm", "pgd", "pgd-dlr", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")
GRADIENT_FREE_ATTACKS = ("square",)
# attacks whose returned point another model can choose (``select_fn``)
SELECTING_ATTACKS = ("pgd", "pgd-dlr", "apgd-ce", "apgd-dlr", "apgd-t")


def _attack_fn(name: str, n_iter: int, n_queries: int, restarts: int, n_target_classes: int):
    if name == "fgsm":
        return A.fgsm
    if name == "pgd":
        return functools.partial(A.pgd, steps=n_iter, restarts=restarts, return_trace=True)
    if name == "pgd-dlr":
        return functools.partial(A.pgd, steps=n_iter, restarts=restarts, loss="dlr")
    if name in ("apgd-ce", "apgd-dlr"):
        return functools.partial(A.apgd, steps=n_iter, loss=name.split("-")[1], restarts=restarts)
    if name == "apgd-t":
        return functools.partial(
            A.apgd_targeted, steps=n_iter, restarts=restarts, n_target_classes=n_target_classes
        )
    if name == "fab":
        return functools.partial(A.fab, steps=n_iter, restarts=restarts)
    if name == "fab-t":
        return functools.partial(
            A.fab_targeted, steps=n_iter, restarts=restarts, n_target_classes=n_target_classes
        )
    if name == "square":
        return functools.partial(A.square, n_queries=n_queries, restarts=restarts)
    raise ValueError(
        f"unknown attack {name!r}; choose from {GRADIENT_ATTACKS + GRADIENT_FREE_ATTACKS}"
    )


def evaluate_robustness(
    views: Mapping[str, Callable],
    x,
    y,
    key,
    *,
    eps_list: Sequence[float],
    norm: str = "linf",
    attacks: Sequence[str] = ("pgd", "apgd-ce", "square"),
    n_iter: int = 20,
    n_queries: int = 300,
    restarts: int = 1,
    n_target_classes: int = 9,
    batch_size: int = 100,
    progress=None,
    mesh: jax.sharding.Mesh | None = None,
    score: Callable | None = None,
) -> dict:
    """Clean and robust accuracy per attack, per gradient view, and the worst case.

    Args:
      views: ``{gradient name: logits_fn}`` (the attacked views; gradient-free attacks
        run once, through the first).
      x, y: examples in [0, 1] and their labels (host arrays).
      eps_list: radii; ``norm``: ``"linf"`` or ``"l2"``.
      attacks: names from :data:`GRADIENT_ATTACKS` and :data:`GRADIENT_FREE_ATTACKS`.
      progress: optional callable ``progress(description, done, total)`` told what
        runs next (``done`` of ``total`` attack runs finished).
      mesh: devices to split each chunk over (its first axis); default all devices.
      score: the model's logits function that scores clean inputs and every attack's
        output (a defended model's own forward); default the first view.

    Returns a JSON-ready dict: ``clean_accuracy``, ``nonfinite_logits`` (count),
    ``robust_accuracy[eps][attack/view]``, ``worst_case[eps]``, ``sanity`` flags and
    explanations.
    """
    if not views:
        raise ValueError("views must hold at least one logits function")
    for a in attacks:
        _attack_fn(a, 1, 1, 1, 1)  # validates the name
    for e in eps_list:
        C.check_eps(float(e))
    C.check_norm(norm)
    x, y = np.asarray(x), np.asarray(y)
    names = list(views)
    score = views[names[0]] if score is None else score
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    axis = mesh.axis_names[0]
    n_dev = int(mesh.shape[axis])
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    chunk = max(1, min(int(batch_size), len(x)))
    size = -(-chunk // n_dev) * n_dev
    score_jit = jax.jit(score, out_shardings=rep)

    def to_global(a):
        rows = batch_sh.addressable_devices_indices_map((size,) + a.shape[1:])
        lo = min(ix[0].start or 0 for ix in rows.values())
        hi = max(size if ix[0].stop is None else ix[0].stop for ix in rows.values())
        return jax.make_array_from_process_local_data(batch_sh, a[lo:hi], a.shape)

    def batched(fn):
        """``fn(x_chunk, y_chunk, n_real)`` over sharded, padded chunks; outputs concatenated."""
        outs = []
        for i in range(0, len(x), chunk):
            m = len(x[i : i + chunk])
            take = i + np.minimum(np.arange(size), m - 1)
            outs.append(fn(to_global(x[take]), to_global(y[take]), m))
        return jax.tree.map(lambda *a: np.concatenate([np.atleast_1d(v) for v in a]), *outs)

    logits = batched(lambda xb, yb, m: np.asarray(score_jit(xb))[:m])
    finite = np.all(np.isfinite(logits), axis=1)
    correct = (np.argmax(logits, -1) == y) & finite
    report = {
        "n_examples": int(len(x)),
        "norm": norm,
        "eps": [float(e) for e in eps_list],
        "views": names,
        "attacks": list(attacks),
        "clean_accuracy": float(correct.mean()),
        "nonfinite_logits": int((~finite).sum()),
        "robust_accuracy": {},
        "worst_case": {},
    }

    grad_stats = {}
    for v in names:
        stats_fn = jax.jit(functools.partial(A.input_gradient_stats, views[v]), out_shardings=rep)

        def health(xb, yb, m, fn=stats_fn):
            d = fn(xb, yb)
            return {"zero": np.asarray(d["zero"])[:m], "nonfinite": np.asarray(d["nonfinite"])[:m]}

        st = batched(health)
        grad_stats[v] = {
            "frac_zero": float(st["zero"].mean()),
            "frac_nonfinite": float(st["nonfinite"].mean()),
        }

    def compile_attack(fn, view):
        @functools.partial(jax.jit, out_shardings=rep)
        def run(xb, yb, eps_arr, k):
            out = fn(view, xb, yb, k, eps=eps_arr, norm=norm)
            x_adv, trace = out if isinstance(out, tuple) else (out, jnp.zeros((1, yb.shape[0])))
            z = score(x_adv)
            ok = (jnp.argmax(z, -1) == yb) & jnp.all(jnp.isfinite(z), -1)
            return ok, trace

        return run

    # One compiled function per (attack, view), reused for every ε (ε and key are traced).
    runs = {}
    for a in attacks:
        fn = _attack_fn(a, n_iter, n_queries, restarts, n_target_classes)
        for v in names if a in GRADIENT_ATTACKS else names[:1]:
            attack = fn
            select = getattr(views[v], "select", None)  # a guided view (deqjax.bpda.guided)
            if select is not None and a in SELECTING_ATTACKS:
                attack = functools.partial(fn, select_fn=select)
            runs[f"{a}/{v}" if a in GRADIENT_ATTACKS else a] = (a, compile_attack(attack, views[v]))

    curve, traces = [], {}
    total = len(eps_list) * len(runs)
    for i, eps in enumerate(eps_list):
        robust = correct.copy()
        per = {}
        for j, (label, (a, run)) in enumerate(runs.items()):
            if progress:
                progress(f"eps={eps:g} {label}", i * len(runs) + j, total)
            # every view of one attack gets the same key (same random starts): the
            # views are compared on equal terms, not on their draws
            k = jax.random.fold_in(jax.random.fold_in(key, i), list(attacks).index(a))

            def unpadded(xb, yb, m, run=run, eps=eps, k=k):
                ok, trace = run(xb, yb, jnp.float32(eps), k)
                return np.asarray(ok)[:m], np.asarray(trace)[:, :m]

            ok, trace = batched(unpadded)
            ok = ok & correct
            per[label] = float(ok.mean())
            robust &= ok
            if a == "pgd" and i == len(eps_list) - 1:
                traces[label] = trace
        report["robust_accuracy"][str(float(eps))] = per
        report["worst_case"][str(float(eps))] = float(robust.mean())
        curve.append((float(eps), float(robust.mean())))

    flags, why = {}, {}
    for eps in eps_list:
        per = report["robust_accuracy"][str(float(eps))]
        r = A.sanity_flags(per_attack=per)
        for k in r.flags:
            flags[k] = flags.get(k, False) or r.flags[k]
            why.setdefault(k, []).append(f"eps={eps:g}: {r.explanations[k]}")
    r = A.sanity_flags(eps_curve=curve, loss_traces=traces or None)
    flags.update(r.flags)
    why.update({k: [v] for k, v in r.explanations.items()})
    for v, st in grad_stats.items():
        r = A.sanity_flags(grad_stats=st)
        for k in r.flags:
            flags[k] = flags.get(k, False) or r.flags[k]
            why.setdefault(k, []).append(f"{v}: {r.explanations[k]}")
    flags["nonfinite_logits"] = report["nonfinite_logits"] > 0
    why["nonfinite_logits"] = [
        f"{report['nonfinite_logits']} examples have non-finite logits "
        "(counted as errors, not averaged in)"
    ]
    report["sanity"] = {
        "flags": flags,
        "explanations": {k: "; ".join(v) for k, v in why.items()},
        "unreliable": bool(any(flags.values())),
    }
    report["gradient_stats"] = grad_stats
    return report
