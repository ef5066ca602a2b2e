"""AutoAttack-like ensemble evaluation: per-example worst case over attacks.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020. An example counts as robust iff it is
correctly classified clean and no attack of the ensemble flips it:
robust_i = [argmax f(x_i) = y_i] ∧ ⋀_a [argmax f(A_a(x_i)) = y_i].

Presets: ``"standard"`` = APGD-CE, APGD-T (top-9 targets), Square;
``"plus"`` = APGD-CE ×5 restarts, APGD-DLR ×5, APGD-T, Square ×5 (FAB is not
implemented).

**Masking (documented choice):** the attacks run one after another, each from the
clean input, but the batch is *not* shrunk on the host: every attack runs on all
examples and its result is only *used* for examples still robust after the
previous attacks (``jnp.where`` masks). This keeps :func:`evaluate_ensemble`
jit-able (attacks, norm and budgets static) at the price of not saving compute
on already-broken examples; as a by-product each attack's standalone robust
accuracy is reported too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deqjax.attacks import _common as C
from deqjax.attacks.apgd import apgd, apgd_targeted
from deqjax.attacks.fgsm_pgd import fgsm, pgd
from deqjax.attacks.square import square

ATTACK_NAMES = ("fgsm", "pgd", "pgd-dlr", "apgd-ce", "apgd-dlr", "apgd-t", "square")
PRESETS = ("standard", "plus")
GRADIENT_FREE = ("square",)


class EnsembleResult(NamedTuple):
    clean_accuracy: jax.Array  # scalar
    robust_accuracy: jax.Array  # scalar, worst case over all attacks
    per_attack_accuracy: dict  # name -> standalone robust accuracy
    cumulative_accuracy: dict  # name -> robust accuracy after attacks up to it
    robust: jax.Array  # (B,) bool, worst case
    per_attack_robust: dict  # name -> (B,) bool, standalone
    x_adv: jax.Array  # (B, ...) lowest-margin adversarial input


def make_attack(name, *, n_iter=100, n_queries=5000, n_target_classes=9, restarts=1):
    """Attack callable ``(logits_fn, x, y, key, *, eps, norm) -> x_adv`` for a name."""
    if name not in ATTACK_NAMES:
        raise ValueError(
            f"unknown attack name {name!r}; use one of {ATTACK_NAMES} "
            "or pass a (name, callable) pair."
        )
    p = functools.partial
    table = {
        "fgsm": fgsm,
        "pgd": p(pgd, steps=n_iter, restarts=restarts),
        "pgd-dlr": p(pgd, steps=n_iter, restarts=restarts, loss="dlr"),
        "apgd-ce": p(apgd, steps=n_iter, loss="ce", restarts=restarts),
        "apgd-dlr": p(apgd, steps=n_iter, loss="dlr", restarts=restarts),
        "apgd-t": p(
            apgd_targeted, steps=n_iter, n_target_classes=n_target_classes, restarts=restarts
        ),
        "square": p(square, n_queries=n_queries, restarts=restarts),
    }
    return table[name]


def preset(name, *, n_iter=100, n_queries=5000, n_target_classes=9):
    """List of (name, attack) pairs of a preset ("standard" or "plus")."""
    kw = dict(n_iter=n_iter, n_queries=n_queries, n_target_classes=n_target_classes)
    if name == "standard":
        spec = [("apgd-ce", 1), ("apgd-t", 1), ("square", 1)]
    elif name == "plus":
        spec = [("apgd-ce", 5), ("apgd-dlr", 5), ("apgd-t", 1), ("square", 5)]
    else:
        raise ValueError(
            f"unknown ensemble preset {name!r}; use one of {PRESETS} "
            "or a list of attack names / (name, callable) pairs."
        )
    return [(n if r == 1 else f"{n}-x{r}", make_attack(n, restarts=r, **kw)) for n, r in spec]


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
) -> EnsembleResult:
    """Run an ensemble of attacks and return per-attack and worst-case robustness.

    Args:
      logits_fn, x, y, key, eps, norm: as for every attack.
      attacks: "standard", "plus", or a list of names from ``ATTACK_NAMES`` and/or
        ``(name, attack)`` pairs with ``attack(logits_fn, x, y, key, eps=, norm=)``.
      n_iter / n_queries / n_target_classes: budgets used by named attacks/presets.
    """
    x, y, _ = C.validate(logits_fn, x, y, eps, norm)
    resolved = _resolve(
        attacks, n_iter=n_iter, n_queries=n_queries, n_target_classes=n_target_classes
    )
    correct = jnp.argmax(logits_fn(x), -1) == y
    robust = correct
    x_worst = x
    m_worst = C.margin(logits_fn(x), y)
    per_acc, cum_acc, per_rob = {}, {}, {}
    for i, (name, fn) in enumerate(resolved):
        xa = fn(logits_fn, x, y, jax.random.fold_in(key, i), eps=eps, norm=norm)
        if isinstance(xa, tuple):
            xa = xa[0]
        za = logits_fn(xa)
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
