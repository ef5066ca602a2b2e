"""Random restarts as a vmap over independent PRNG keys.

Restart r uses key ``key`` for r = 0 (so one restart reproduces the plain
attack exactly) and ``jax.random.split(key, R − 1)[r − 1]`` for r ≥ 1. All
restarts run in one ``jax.vmap``; per example the restart with the lowest margin
z_y − max_{i≠y} z_i is kept, i.e. a misclassifying restart if any exists, else
the one closest to the decision boundary (Madry et al. 2018; Croce & Hein 2020).
With the same first key, R restarts are therefore never weaker than one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deqjax.attacks._common import check_key, check_positive_int, margin, pick, split_key


def restart_keys(key, n_restarts: int):
    """Keys for ``n_restarts`` restarts (leading axis); the first one is ``key`` itself.
    Works for one key and for per-example keys alike."""
    key = jnp.asarray(key)
    if n_restarts == 1:
        return key[None]
    return jnp.concatenate([key[None], split_key(key, n_restarts - 1)], axis=0)


def select_worst(logits_fn, xs, y, *others):
    """Per example pick, along the leading restart axis of ``xs`` (R, B, ...), the
    restart with the lowest margin. ``others`` are arrays (R, ..., B) (e.g. loss
    traces (R, T, B)) gathered with the same choice."""
    margins = jax.vmap(lambda xa: margin(logits_fn(xa), y))(xs)  # (R, B)
    idx = jnp.argmin(margins, axis=0)  # (B,)
    out = pick(xs, idx)
    picked = tuple(pick(o, idx, axis=o.ndim - 1) for o in others)
    return (out,) + picked if others else out


def run_with_restarts(attack, n_restarts, logits_fn, x, y, key, **kwargs):
    """Run ``attack`` with ``n_restarts`` vmapped keys; keep the per-example worst case.

    ``attack`` returns ``x_adv`` or a tuple ``(x_adv, trace)`` with trace (T, B). A
    ``select_fn`` in ``kwargs`` (the logits that choose the returned point, see
    :func:`deqjax.attacks.pgd`) also chooses the restart.
    """
    n = check_positive_int("restarts", n_restarts)
    key = check_key(key, jnp.shape(x)[0])
    if n == 1:
        return attack(logits_fn, x, y, key, **kwargs)
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    keys = restart_keys(key, n)
    outs = jax.vmap(lambda k: attack(logits_fn, x, y, k, **kwargs))(keys)
    chooser = kwargs.get("select_fn") or logits_fn
    if isinstance(outs, tuple):
        return select_worst(chooser, outs[0], y, *outs[1:])
    return select_worst(chooser, outs, y)


def with_restarts(attack, n_restarts: int):
    """Wrap ``attack(logits_fn, x, y, key, **kw)`` into an attack with ``n_restarts``
    independent random restarts (vmapped), keeping the per-example worst case."""
    check_positive_int("n_restarts", n_restarts)

    def restarted(logits_fn, x, y, key, **kwargs):
        return run_with_restarts(attack, n_restarts, logits_fn, x, y, key, **kwargs)

    restarted.__name__ = f"{getattr(attack, '__name__', 'attack')}_x{n_restarts}"
    restarted.__doc__ = f"{n_restarts} restarts of {getattr(attack, '__name__', 'attack')}."
    return restarted
