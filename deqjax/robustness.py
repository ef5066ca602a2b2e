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
from deqjax.attacks.sanity import is_adaptive_view, is_transfer_view

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


# FAB's projections need the forward solve this exact to give a warm start the cold
# attack's result (measured: tests/test_warm_start.py, deqjax.attacks.WarmStartLogits)
FAB_WARM_START_MAX_TOL = 1e-4


def _view_for(attack: str, view):
    """The view ``attack`` runs through: a warm-startable view as given, except for FAB
    when the view's forward tolerance is unknown or looser than
    :data:`FAB_WARM_START_MAX_TOL` (then its cold forward: the same model)."""
    if attack in ("fab", "fab-t") and isinstance(view, C.WarmStartLogits):
        if view.tol is None or view.tol > FAB_WARM_START_MAX_TOL:
            return lambda x: view(x)
    return view


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate_robustness` when ``stop()`` said so after an attack run:
    the finished runs are in its ``store``; the same call resumes from them."""


def _bucket_caps(compact: bool, chunk: int, buckets) -> tuple[int, ...]:
    """Real rows per bucket, descending: one size when not compacting; else ``buckets``
    (default ``(chunk, ⌈chunk/4⌉)``), capped at ``chunk``."""
    if not compact:
        return (chunk,)
    if buckets is None:
        buckets = (chunk, -(-chunk // 4))
    sizes = sorted({min(int(s), chunk) for s in buckets}, reverse=True)
    if not sizes or sizes[-1] < 1:
        raise ValueError(f"bucket sizes must be positive, got {buckets!r}")
    return tuple(sizes)


def _run_order(runs: dict, compact: bool) -> list[str]:
    """Labels in the order they run. Compacting, every gradient attack through the
    non-transfer views first, then through the transfer views, then the gradient-free
    attacks: what a later group breaks is what every earlier one left (the flags)."""
    labels = list(runs)
    if not compact:
        return labels
    grad = [lab for lab in labels if runs[lab][0] in GRADIENT_ATTACKS]
    transfer = [lab for lab in grad if is_transfer_view(lab)]
    rest = [lab for lab in grad if lab not in transfer]
    return rest + transfer + [lab for lab in labels if lab not in grad]


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
    compact: bool = False,
    buckets: Sequence[int] | None = None,
    store=None,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Clean and robust accuracy per attack, per gradient view, and the worst case.

    Args:
      views: ``{gradient name: logits_fn}`` (the attacked views; gradient-free attacks
        run once, through the first). A :class:`~deqjax.attacks.WarmStartLogits` view
        is attacked with warm-started solves (FAB only when its ``tol`` ≤
        :data:`FAB_WARM_START_MAX_TOL`, else cold).
      x, y: examples in [0, 1] and their labels (host arrays).
      key: one PRNG key; attack ``a`` at the ``i``-th ε gives example ``j`` the key
        ``fold_in(fold_in(fold_in(key, i), a), j)`` — the same for every view, chunk and
        bucket it is attacked in.
      eps_list: radii; ``norm``: ``"linf"`` or ``"l2"``.
      attacks: names from :data:`GRADIENT_ATTACKS` and :data:`GRADIENT_FREE_ATTACKS`.
      progress: optional callable ``progress(description, done, total)`` told what
        runs next (``done`` of ``total`` attack runs finished).
      mesh: devices to split each chunk over (its first axis); default all devices.
      score: the model's logits function that scores clean inputs and every attack's
        output (a defended model's own forward); default the first view.
      compact: attack, at each ε, only the examples that every earlier attack run (attack
        × view) at that ε left robust, gathered into buckets of ``buckets`` real rows
        (default ``(batch_size, ⌈batch_size/4⌉)``: the larger while enough remain, the
        smaller for the rest; each size compiles once). The worst case is the same as
        without; ``robust_accuracy[eps][label]`` is then cumulative (robust after this
        and every earlier run at that ε), not the run's standalone accuracy.
      store: optional ``load(name) -> dict | None`` / ``save(name, arrays)``: each
        finished (ε, attack run) is saved, and one already saved is not run again
        (resuming an interrupted evaluation of the same settings).
      stop: optional ``stop() -> bool`` asked after each run; True raises
        :class:`EvaluationStopped` (the runs so far are in ``store``).

    Returns a JSON-ready dict: ``clean_accuracy``, ``nonfinite_logits`` (count),
    ``robust_accuracy[eps][attack/view]``, ``worst_case[eps]`` (an example broken at a
    smaller ε counts as broken at every larger one: the point lies in both balls),
    ``attacked[eps][label]`` (examples each run attacked) and ``new_breaks[eps][label]``
    (examples it broke that every earlier run at that ε left), the per-example
    ``outcomes`` (packed bits, :mod:`deqjax.stats`), ``sanity`` flags and explanations.
    """
    from deqjax import stats

    if not views:
        raise ValueError("views must hold at least one logits function")
    for a in attacks:
        _attack_fn(a, 1, 1, 1, 1)  # validates the name
    for e in eps_list:
        C.check_eps(float(e))
    C.check_norm(norm)
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    names = list(views)
    score = views[names[0]] if score is None else score
    if mesh is None:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    axis = mesh.axis_names[0]
    n_dev = int(mesh.shape[axis])
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    chunk = max(1, min(int(batch_size), n))
    caps = _bucket_caps(compact, chunk, buckets)
    padded = {c: -(-c // n_dev) * n_dev for c in caps}
    score_jit = jax.jit(score, out_shardings=rep)
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)

    def to_global(a):
        size = a.shape[0]
        rows = batch_sh.addressable_devices_indices_map(a.shape)
        lo = min(ix[0].start or 0 for ix in rows.values())
        hi = max(size if ix[0].stop is None else ix[0].stop for ix in rows.values())
        return jax.make_array_from_process_local_data(batch_sh, a[lo:hi], a.shape)

    def batched(fn, idx=None, extra=None):
        """``fn(x_chunk, y_chunk, [extra_chunk,] n_real)`` over sharded, padded buckets of
        the rows ``idx`` (default all, in order); outputs concatenated."""
        idx = np.arange(n) if idx is None else np.asarray(idx)
        outs, start = [], 0
        while start < len(idx):
            left = len(idx) - start
            cap = next((c for c in caps if c <= left), caps[-1])
            m = min(cap, left)
            take = idx[start + np.minimum(np.arange(padded[cap]), m - 1)]
            args = [to_global(x[take]), to_global(y[take])]
            if extra is not None:
                args.append(to_global(extra[take]))
            outs.append(fn(*args, m))
            start += m
        if not outs:
            return None
        return jax.tree.map(lambda *a: np.concatenate([np.atleast_1d(v) for v in a], -1), *outs)

    logits = batched(lambda xb, yb, m: np.asarray(score_jit(xb))[:m].T).T
    finite = np.all(np.isfinite(logits), axis=1)
    correct = (np.argmax(logits, -1) == y) & finite
    report = {
        "n_examples": int(n),
        "norm": norm,
        "eps": [float(e) for e in eps_list],
        "views": names,
        "attacks": list(attacks),
        "compact": bool(compact),
        "clean_accuracy": float(correct.mean()),
        "nonfinite_logits": int((~finite).sum()),
        "robust_accuracy": {},
        "worst_case": {},
        "attacked": {},
        "new_breaks": {},
        "outcomes": {
            "encoding": stats.BITS_ENCODING,
            "images": stats.examples_fingerprint(x, y),
            "clean": stats.pack_bits(correct),
            "robust_accuracy": {},
            "worst_case": {},
        },
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
        def run(xb, yb, keys, eps_arr):
            out = fn(view, xb, yb, keys, eps=eps_arr, norm=norm)
            x_adv, trace = out if isinstance(out, tuple) else (out, jnp.zeros((1, yb.shape[0])))
            z = score(x_adv)
            ok = (jnp.argmax(z, -1) == yb) & jnp.all(jnp.isfinite(z), -1)
            return ok, trace

        return run

    # One compiled function per (attack, view), reused for every ε (ε and keys are traced).
    runs = {}
    for a in attacks:
        fn = _attack_fn(a, n_iter, n_queries, restarts, n_target_classes)
        for v in names if a in GRADIENT_ATTACKS else names[:1]:
            attack = fn
            select = getattr(views[v], "select", None)  # a guided view (deqjax.bpda.guided)
            if select is not None and a in SELECTING_ATTACKS:
                attack = functools.partial(fn, select_fn=select)
            runs[f"{a}/{v}" if a in GRADIENT_ATTACKS else a] = (
                a,
                compile_attack(attack, _view_for(a, views[v])),
            )
    order = _run_order(runs, compact)

    own, traces, compact_checks = {}, {}, {}
    total = len(eps_list) * len(order)
    for i, eps in enumerate(eps_list):
        e = str(float(eps))
        alive = correct.copy()  # robust to every run so far at this ε
        per, attacked, new, bits = {}, {}, {}, {}
        for j, label in enumerate(order):
            a, run = runs[label]
            if progress:
                progress(f"eps={eps:g} {label}", i * len(order) + j, total)
            name = f"eps{i}_{label}"
            saved = store.load(name) if store is not None else None
            if saved is None:
                idx = np.flatnonzero(alive) if compact else np.arange(n)
                # every view of one attack gets the same keys (same random starts): the
                # views are compared on equal terms, not on their draws
                k = jax.random.fold_in(jax.random.fold_in(key, i), list(attacks).index(a))
                ex_keys = np.asarray(C.example_keys(k, n))

                def unpadded(xb, yb, kb, m, run=run, eps=eps):
                    ok, trace = run(xb, yb, kb, jnp.float32(eps))
                    return np.asarray(ok)[:m], np.asarray(trace)[:, :m]

                out = batched(unpadded, idx, ex_keys)
                ok_rows, trace = out if out is not None else (np.zeros(0, bool), None)
                ok = np.ones(n, bool)
                ok[idx] = ok_rows
                saved = {"attacked": np.isin(np.arange(n), idx), "ok": ok}
                if trace is not None:
                    saved["trace"] = trace
                if store is not None:
                    store.save(name, saved)
            ok = np.asarray(saved["ok"], bool) & correct
            broke = alive & ~ok
            new[label] = int(broke.sum())
            attacked[label] = int(np.sum(saved["attacked"]))
            before = int(alive.sum())
            alive &= ok
            if compact:
                per[label] = float(alive.mean())
                bits[label] = stats.pack_bits(alive)
                compact_checks.setdefault(e, []).append((label, before, new[label]))
            else:
                per[label] = float(ok.mean())
                bits[label] = stats.pack_bits(ok)
            if a == "pgd" and i == len(eps_list) - 1 and "trace" in saved:
                traces[label] = np.asarray(saved["trace"])
            if stop is not None and stop():
                raise EvaluationStopped(f"stopped after {i * len(order) + j + 1} of {total} runs")
        own[float(eps)] = alive
        report["robust_accuracy"][e] = {lab: per[lab] for lab in runs}
        report["attacked"][e] = {lab: attacked[lab] for lab in runs}
        report["new_breaks"][e] = {lab: new[lab] for lab in runs}
        report["outcomes"]["robust_accuracy"][e] = {lab: bits[lab] for lab in runs}

    # a point inside a smaller ball is inside every larger one
    for eps in eps_list:
        worst = np.logical_and.reduce([r for e2, r in own.items() if e2 <= float(eps)])
        report["worst_case"][str(float(eps))] = float(worst.mean())
        report["outcomes"]["worst_case"][str(float(eps))] = stats.pack_bits(worst)
    # the attacks' own curve (no smaller-ε points): does an attack fail at larger ε?
    curve = [(e2, float(r.mean())) for e2, r in own.items()]

    flags, why = {}, {}
    for eps in eps_list:
        e = str(float(eps))
        if compact:
            r = _compact_flags(compact_checks[e], runs)
        else:
            r = A.sanity_flags(per_attack=report["robust_accuracy"][e])
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


def _compact_flags(checks, runs, alpha: float = 0.002) -> A.SanityReport:
    """The per-attack flags of a compacted ε, from what each group of runs broke among
    the examples every earlier run left (AutoAttack's check: the gradient-free attack,
    run last, should not lower the robust accuracy by more than a fraction ``alpha``).
    ``checks``: ``[(label, robust before it, new breaks)]`` in run order."""
    flags, why = {}, {}
    free = [(lab, b, k) for lab, b, k in checks if runs[lab][0] in GRADIENT_FREE_ATTACKS]
    if free and len(free) < len(checks):
        before, broke = free[0][1], sum(k for _, _, k in free)
        flags["gradient_free_beats_gradient"] = broke > alpha * before
        why["gradient_free_beats_gradient"] = (
            f"the gradient-free attack broke {broke} of the {before} examples every gradient "
            "attack and view left"
            + ("; gradients are likely masked/obfuscated" if broke > alpha * before else "; ok")
        )
    grad = [(lab, b, k) for lab, b, k in checks if runs[lab][0] in GRADIENT_ATTACKS]
    transfer = [(lab, b, k) for lab, b, k in grad if is_transfer_view(lab)]
    adaptive = [c for c in grad if is_adaptive_view(c[0])]
    if adaptive and transfer:
        before, broke = transfer[0][1], sum(k for _, _, k in transfer)
        flags["adaptive_weaker_than_transfer"] = broke > 0
        why["adaptive_weaker_than_transfer"] = (
            f"the transfer attacks broke {broke} of the {before} examples every adaptive "
            "attack/view left"
            + (
                "; the adaptive attacks' gradients through the defence are poor: strengthen "
                "them (more steps, BPDA over more views, EOT)"
                if broke
                else "; ok"
            )
        )
    return A.SanityReport(flags, why)
