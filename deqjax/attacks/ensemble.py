"""AutoAttack's ensemble evaluation: per-example worst case over attacks.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020. An example counts as robust iff it is
correctly classified clean and no attack of the ensemble flips it:
robust_i = [argmax f(x_i) = y_i] ∧ ⋀_a [argmax f(A_a(x_i)) = y_i].

Presets, matched to the reference's ``AutoAttack(version=...)`` (fra31/auto-attack,
``autoattack/autoattack.py``, ``set_version`` and the attack constructors), for L∞
and L2:

* ``"standard"``: APGD-CE (1 restart), APGD-T (9 targets, 1 restart), FAB-T
  (9 targets, 1 restart), Square (5000 queries, 1 restart); 100 iterations each.
* ``"plus"``: APGD-CE (5 restarts), APGD-DLR (5 restarts), FAB (untargeted,
  5 restarts), Square (5000 queries, **1 restart**: the reference's ``plus`` leaves
  Square's ``n_restarts=1`` from its constructor), APGD-T (9 targets, 1 restart),
  FAB-T (9 targets, 1 restart), in the reference's order.

Square runs with the reference's ``resc_schedule=False`` (p halved at absolute
iterations). Target counts are capped at C − 1 for models with fewer classes.
(torchattacks' ``AutoAttack`` class runs 10 iterations of APGD, APGD-T and FAB by
default, not the reference's 100.)

Two ways to run it, with the **same robust flags** for the same key (every attack
gets per-example keys ``fold_in(fold_in(key, a), i)`` for attack ``a`` and example
``i``, so an example's randomness does not depend on its batch):

* ``compact=False`` (default): every attack runs on every example; its result is only
  *used* where the example is still robust (``jnp.where`` masks). Also gives each
  attack's standalone robust accuracy; ``x_adv`` is the lowest-margin point over the
  attacks that could still use it.
* ``compact=True``: as AutoAttack, each attack (and each target of APGD-T / FAB-T)
  runs only on the examples that survived everything before it. The survivors are
  gathered into buckets of fixed sizes (``bucket_size``, default 64, then 16 for the
  rest: static shapes, nothing recompiles per count) inside ``lax.while_loop``s that
  run as many buckets as there are survivors, so the cost follows the number of
  robust examples. Pure and jit-able.
  Standalone accuracies are not available (empty dicts); ``x_adv`` holds the first
  successful attack's point.

The flags agree because an example is robust iff no (attack, restart, target) run
breaks it, and every such run sees the same per-example inputs and keys either way
(up to the floating-point effect of batch shape on the model's own arithmetic).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.apgd import apgd, apgd_targeted
from deqjax.attacks.fab import fab, fab_targeted
from deqjax.attacks.fgsm_pgd import fgsm, pgd
from deqjax.attacks.square import square

ATTACK_NAMES = (
    "fgsm",
    "pgd",
    "pgd-dlr",
    "apgd-ce",
    "apgd-dlr",
    "apgd-t",
    "fab",
    "fab-t",
    "square",
)
PRESETS = ("standard", "plus")
GRADIENT_FREE = ("square",)
PRESET_ATTACKS = {  # (name, restarts), in the reference's order
    "standard": [("apgd-ce", 1), ("apgd-t", 1), ("fab-t", 1), ("square", 1)],
    "plus": [
        ("apgd-ce", 5),
        ("apgd-dlr", 5),
        ("fab", 5),
        ("square", 1),
        ("apgd-t", 1),
        ("fab-t", 1),
    ],
}


class EnsembleResult(NamedTuple):
    clean_accuracy: jax.Array  # scalar
    robust_accuracy: jax.Array  # scalar, worst case over all attacks
    per_attack_accuracy: dict  # name -> standalone robust accuracy ({} when compact)
    cumulative_accuracy: dict  # name -> robust accuracy after attacks up to it
    robust: jax.Array  # (B,) bool, worst case
    per_attack_robust: dict  # name -> (B,) bool, standalone ({} when compact)
    x_adv: jax.Array  # (B, ...) adversarial input (x where robust)


def make_attack(name, *, n_iter=100, n_queries=5000, n_target_classes=9, restarts=1):
    """Attack callable ``(logits_fn, x, y, key, *, eps, norm) -> x_adv`` for a name.

    ``n_iter``: steps of PGD/APGD/FAB; ``n_queries``: Square's queries (with
    AutoAttack's unrescaled p schedule). The targeted ones (``"apgd-t"``, ``"fab-t"``)
    carry ``n_targets`` and accept ``targets=`` (run a subset of the targets)."""
    if name not in ATTACK_NAMES:
        raise ValueError(
            f"unknown attack name {name!r}; use one of {ATTACK_NAMES} "
            "or pass a (name, callable) pair."
        )
    p = functools.partial
    k = n_target_classes
    table = {
        "fgsm": fgsm,
        "pgd": p(pgd, steps=n_iter, restarts=restarts),
        "pgd-dlr": p(pgd, steps=n_iter, restarts=restarts, loss="dlr"),
        "apgd-ce": p(apgd, steps=n_iter, loss="ce", restarts=restarts),
        "apgd-dlr": p(apgd, steps=n_iter, loss="dlr", restarts=restarts),
        "apgd-t": p(apgd_targeted, steps=n_iter, n_target_classes=k, restarts=restarts),
        "fab": p(fab, steps=n_iter, restarts=restarts),
        "fab-t": p(fab_targeted, steps=n_iter, n_target_classes=k, restarts=restarts),
        "square": p(square, n_queries=n_queries, restarts=restarts, rescale_schedule=False),
    }
    fn = table[name]
    if name in ("apgd-t", "fab-t"):
        fn.n_targets = k
    return fn


def preset(name, *, n_iter=100, n_queries=5000, n_target_classes=9):
    """List of (name, attack) pairs of a preset ("standard" or "plus"; see the module
    docstring for what they match)."""
    if name not in PRESET_ATTACKS:
        raise ValueError(
            f"unknown ensemble preset {name!r}; use one of {PRESETS} "
            "or a list of attack names / (name, callable) pairs."
        )
    kw = dict(n_iter=n_iter, n_queries=n_queries, n_target_classes=n_target_classes)
    return [
        (n if r == 1 else f"{n}-x{r}", make_attack(n, restarts=r, **kw))
        for n, r in PRESET_ATTACKS[name]
    ]


def _resolve(attacks, **kw):
    if isinstance(attacks, str):
        return preset(attacks, **kw)
    out, seen = [], set()
    for a in attacks:
        name, fn = (a, make_attack(a, **kw)) if isinstance(a, str) else a
        if not callable(fn):
            raise ValueError(f"attack {name!r} is not callable; pass (name, callable).")
        base, i = name, 1
        while name in seen:
            i += 1
            name = f"{base}#{i}"
        seen.add(name)
        out.append((name, fn))
    if not out:
        raise ValueError("attacks must name at least one attack.")
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _bucket_sizes(bucket_size, b: int):
    """Bucket sizes, descending, capped at the batch size ``b``."""
    sizes = (bucket_size,) if isinstance(bucket_size, (int, np.integer)) else tuple(bucket_size)
    if not sizes:
        raise ValueError("bucket_size must name at least one size, e.g. (64, 16).")
    return tuple(sorted({min(C.check_positive_int("bucket_size", s), b) for s in sizes})[::-1])


def _compacted(attack, logits_fn, x, y, keys, robust, x_worst, buckets):
    """Run ``attack(x_b, y_b, keys_b)`` on the rows still ``robust`` only (gathered
    first, in index order). Sizes ``buckets`` (descending): the larger ones take whole
    buckets while enough rows remain, the smallest one takes the rest (its last bucket
    filled with other rows, whose results are dropped). Returns (robust, x_worst).
    Under an Explicit mesh the gathers and scatters work on replicated rows and each
    bucket is sharded like the batch when the mesh divides its size."""
    b = x.shape[0]
    like = x  # the batch sharding to restore
    x, y, keys, robust, x_worst = map(C.replicate, (x, y, keys, robust, x_worst))
    order = jnp.argsort(~robust, stable=True)  # robust rows first, in index order
    n = jnp.sum(robust)
    carry, start = (robust, x_worst), jnp.zeros((), n.dtype)
    for level, size in enumerate(buckets):

        def body(i, carry, size=size, start=start):
            rob, xw = carry
            pos = start + i * size + jnp.arange(size)
            idx = order[jnp.minimum(pos, b - 1)]
            rows = (C.shard_rows_like(a[idx], like) for a in (x, y, keys))
            xa = C.replicate(_first(attack(*rows)))
            broke = (pos < n) & (jnp.argmax(logits_fn(xa), -1) != y[idx])
            dest = jnp.where(broke, idx, b)  # out of range: dropped
            return rob.at[dest].set(False, mode="drop"), xw.at[dest].set(xa, mode="drop")

        left = n - start
        last = level == len(buckets) - 1
        count = (left + size - 1) // size if last else left // size
        carry = lax.fori_loop(0, count, body, carry)
        start = start + count * size
    return tuple(C.batch_sharded_like(a, like) for a in carry)


def _attack_survivors(fn, logits_fn, x, y, keys, robust, x_worst, *, eps, norm, buckets):
    """One attack of the compacting ensemble; a targeted one (``fn.n_targets``) runs
    target by target, each on the survivors of the previous targets."""

    def run(xb, yb, kb, **kw):
        return fn(logits_fn, xb, yb, kb, eps=eps, norm=norm, **kw)

    k = getattr(fn, "n_targets", None)
    if k is None:
        return _compacted(run, logits_fn, x, y, keys, robust, x_worst, buckets)

    def stage(j, carry):
        one = lambda xb, yb, kb: run(xb, yb, kb, targets=j[None])
        return _compacted(one, logits_fn, x, y, keys, *carry, buckets)

    return lax.fori_loop(0, k, stage, (robust, x_worst))


def _attack_keys(key, i, b):
    """Per-example keys of attack ``i``: ``fold_in(fold_in(key, i), example)`` from one
    key, ``fold_in(key_example, i)`` from per-example keys."""
    if C.is_batched_key(key):
        return jax.vmap(lambda k: jax.random.fold_in(k, i))(key)
    return C.example_keys(jax.random.fold_in(key, i), b)


def evaluate_ensemble(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    attacks="standard",
    n_iter=100,
    n_queries=5000,
    n_target_classes=9,
    compact=False,
    bucket_size=(64, 16),
) -> EnsembleResult:
    """Run an ensemble of attacks and return the worst-case robustness.

    Args:
      logits_fn, x, y, eps, norm: as for every attack (bf16 / f16 images and models
        too: the margins are compared in float32, ``x_adv`` is in x's dtype).
      key: one PRNG key (attack ``a`` draws example ``i``'s randomness from
        ``fold_in(fold_in(key, a), i)``), or one key per example (``fold_in(key_i, a)``):
        an example's draws then do not depend on its position, so a batch split over
        devices (``jax.shard_map`` with the keys sharded like the batch) gives the
        unsharded result.
      attacks: "standard", "plus", or a list of names from ``ATTACK_NAMES`` and/or
        ``(name, attack)`` pairs with ``attack(logits_fn, x, y, keys, eps=, norm=)``;
        ``keys`` are per-example keys (B, 2) (every attack of this package takes them).
      n_iter / n_queries / n_target_classes: budgets of named attacks/presets
        (targets capped at C − 1).
      compact: run each attack only on the still-robust examples (see the module
        docstring); same robust flags, cost proportional to the survivors.
      bucket_size: rows per bucket when ``compact``: an int, or sizes used largest
        first while enough rows remain, the smallest for the rest (default (64, 16):
        at most 15 wasted rows per stage; raise them on accelerators). Each size
        compiles its own copy of every attack.
    """
    x, y, nc, key = C.validate(logits_fn, x, y, eps, norm, key)
    score = C.with_dtypes(logits_fn, x.dtype, C.compute_dtype(x.dtype))  # margins in f32+
    kcap = max(1, min(n_target_classes, nc - 1))
    resolved = _resolve(attacks, n_iter=n_iter, n_queries=n_queries, n_target_classes=kcap)
    b = x.shape[0]
    if b == 0:  # nothing to attack (the model is not called): accuracies are NaN
        nan, none = jnp.full((), jnp.nan, jnp.float32), jnp.zeros((0,), bool)
        names = [name for name, _ in resolved]
        per = {} if compact else {name: nan for name in names}
        per_rob = {} if compact else {name: none for name in names}
        return EnsembleResult(nan, nan, per, {name: nan for name in names}, none, per_rob, x)
    buckets = _bucket_sizes(bucket_size, b)
    z = score(x)
    correct = jnp.argmax(z, -1) == y
    robust = correct
    x_worst = x
    m_worst = C.margin(z, y)
    per_acc, cum_acc, per_rob = {}, {}, {}
    for i, (name, fn) in enumerate(resolved):
        keys = _attack_keys(key, i, b)
        with C.checks_done():  # x, y, eps were checked above
            if compact:
                robust, x_worst = _attack_survivors(
                    fn, logits_fn, x, y, keys, robust, x_worst, eps=eps, norm=norm, buckets=buckets
                )
                cum_acc[name] = jnp.mean(robust)
                continue
            xa = _first(fn(logits_fn, x, y, keys, eps=eps, norm=norm))
        za = score(xa)
        rob_a = correct & (jnp.argmax(za, -1) == y)
        ma = C.margin(za, y)
        # only examples still robust use this attack's point (lower margin wins)
        use = robust & (ma < m_worst)
        x_worst = C.bwhere(use, xa, x_worst)
        m_worst = jnp.where(use, ma, m_worst)
        robust = robust & rob_a
        per_rob[name] = rob_a
        per_acc[name] = jnp.mean(rob_a)
        cum_acc[name] = jnp.mean(robust)
    return EnsembleResult(
        jnp.mean(correct), jnp.mean(robust), per_acc, cum_acc, robust, per_rob, x_worst
    )
