"""Square attack: score-based random search, no gradients.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020.

Minimises the margin loss L(x) = z_y − max_{i≠y} z_i by random search. Per
example and per iteration a random s×s window (all channels) gets a new
perturbation and the candidate is accepted iff it lowers L (per-example
acceptance, implemented with masks inside a ``lax.scan``; only ``logits_fn``
forward passes are used, never ``jax.grad``).

* Side length s = round(√(p·H·W)) clipped to [1, min(H, W) − 1] with the
  paper's schedule p(i): p_init halved at i ∈ {10, 50, 200, 500, 1000, 2000,
  4000, 6000, 8000}·N/10000 (N = number of queries; ``rescale_schedule=False``:
  at those absolute iterations, as AutoAttack runs it); p_init = 0.8 as AutoAttack.
* L∞: init with vertical stripes ±eps; the window gets a random vertex
  ±eps per channel (the paper's update, minus its "must differ" resampling).
* L2 **(simplified, documented choice)**: init δ = eps·g/‖g‖₂ (g Gaussian); the
  update adds to the window a per-channel random-sign block of L2 norm
  eps·s/√(HW) (≈ eps·√p) and rescales δ onto the eps-sphere, instead of the
  paper's mass-moving pseudo-Gaussian squares.
* An example stops moving once misclassified (as the reference attacks only the
  examples not yet fooled), so its result does not depend on the rest of its batch;
  once every example of the batch is misclassified the remaining queries are skipped.
* Inputs of rank 2 (B, D) are treated as 1-D signals (windows of length
  round(p·D)); rank 3 (B, H, W) as one-channel images; rank 4 is (B, H, W, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.restarts import run_with_restarts

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(n_queries: int, p_init: float = 0.8, rescale: bool = True) -> np.ndarray:
    """The paper's piecewise-constant fraction p(i), i = 0 … n_queries−1: halved at the
    iterations ``_HALVINGS`` counted on a 10,000-query scale (``rescale=True``, the
    reference's ``resc_schedule=True``) or at those absolute iterations
    (``rescale=False``, as AutoAttack runs Square)."""
    i = np.arange(n_queries) / n_queries * 10000 if rescale else np.arange(n_queries)
    halvings = (i[:, None] > np.asarray(_HALVINGS)[None, :]).sum(1)
    return p_init / 2.0**halvings


def _as_image(x):
    if x.ndim == 4:
        return x, False
    if x.ndim == 3:
        return x[..., None], False
    if x.ndim == 2:
        return x[:, :, None, None], True  # 1-D signal: (B, D, 1, 1)
    raise ValueError(f"square attack supports x of rank 2, 3 or 4, got shape {x.shape}.")


def _sizes(n_queries, p_init, h, w, one_d, rescale):
    p = p_schedule(n_queries, p_init, rescale)
    if one_d:
        s = np.clip(np.round(p * h), 1, max(h - 1, 1))
        return s.astype(np.int32), np.ones_like(s, np.int32)
    s = np.clip(np.round(np.sqrt(p * h * w)), 1, max(min(h, w) - 1, 1)).astype(np.int32)
    return s, s


def _window(key, b, h, w, sh, sw):
    kh, kw = C.split_key(key, 2)
    vh = C.draw(lambda k, s: jax.random.randint(k, s, 0, h - sh + 1), kh, (b, 1, 1, 1))
    vw = C.draw(lambda k, s: jax.random.randint(k, s, 0, w - sw + 1), kw, (b, 1, 1, 1))
    ih = lax.broadcasted_iota(jnp.int32, (1, h, w, 1), 1)
    iw = lax.broadcasted_iota(jnp.int32, (1, h, w, 1), 2)
    return (ih >= vh) & (ih < vh + sh) & (iw >= vw) & (iw < vw + sw)


def _square_single(
    logits_fn, x, y, key, *, eps, norm, n_queries, p_init, rescale_schedule, return_trace
):
    n_queries = C.check_positive_int("n_queries", n_queries)
    if not (0.0 < p_init <= 1.0):
        raise ValueError(f"p_init must be in (0, 1], got {p_init}.")
    xi, one_d = _as_image(x)
    b, h, w, c = xi.shape
    # (logits, next solver state) of a candidate; a WarmStartLogits starts each query's
    # solve from the current point's solution (one window away), a plain one ignores it
    fn = lambda xx, st: C.logits_and_state(logits_fn, jnp.reshape(xx, x.shape), st)
    sh, sw = _sizes(n_queries, p_init, h, w, one_d, rescale_schedule)
    rademacher = lambda k, s: jax.random.rademacher(k, s, xi.dtype)

    k0, kloop = C.split_key(key, 2)
    if norm == "linf":
        stripes = C.draw(rademacher, k0, (b, 1, w, c)) * eps
        d0 = (
            jnp.broadcast_to(stripes, xi.shape)
            if not one_d
            else C.draw(rademacher, k0, xi.shape) * eps
        )
    else:
        g = C.draw(lambda k, s: jax.random.normal(k, s, xi.dtype), k0, xi.shape)
        d0 = eps * g / jnp.maximum(C._bnorm(g), C._TINY)
    xb = C.to_storage(jnp.clip(xi + d0, 0.0, 1.0), xi, eps, norm)
    zb, sb = fn(xb, C.initial_state(logits_fn, x))
    mb = C.margin(zb, y)

    def query(carry, inp):
        xb, mb, sb = carry
        kk, s_h, s_w = inp
        kw_, kv = C.split_key(kk, 2)
        mask = _window(kw_, b, h, w, s_h, s_w)
        signs = C.draw(rademacher, kv, (b, 1, 1, c))
        delta = xb - xi
        if norm == "linf":
            dn = jnp.where(mask, eps * signs, delta)
        else:
            size = (s_h * s_w).astype(xi.dtype)
            step = eps * jnp.sqrt(size / (h * w)) / jnp.sqrt(size * c)  # per-entry
            dn = delta + jnp.where(mask, step * signs, 0.0)
            dn = dn * eps / jnp.maximum(C._bnorm(dn), C._TINY)
        xn = C.to_storage(jnp.clip(xi + dn, 0.0, 1.0), xi, eps, norm)
        zn, sn = fn(xn, sb)
        mn = C.margin(zn, y)
        acc = (mn < mb) & (mb >= 0)  # a broken example stays where it broke
        mb = jnp.where(acc, mn, mb)
        sb = jax.tree.map(lambda a, b: C.bwhere(acc, a, b), sn, sb)
        return (C.bwhere(acc, xn, xb), mb, sb), mb

    def body(carry, inp):
        # once every example of the batch is misclassified, skip the remaining queries
        # (a cond; under vmap both branches run): the flags cannot change any more
        return lax.cond(jnp.any(carry[1] >= 0), query, lambda c, _: (c, c[1]), carry, inp)

    keys = C.split_key(kloop, n_queries)
    (xb, mb_end, _), trace = C.scan(body, (xb, mb, sb), (keys, jnp.asarray(sh), jnp.asarray(sw)))
    x_adv = C.project(jnp.reshape(xb, x.shape), x, eps, norm)  # guard against round-off
    if return_trace:
        return x_adv, -jnp.concatenate([mb[None], trace], axis=0)
    return x_adv


@C.attack_api()
def square(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    n_queries=1000,
    p_init=0.8,
    rescale_schedule=True,
    restarts=1,
    return_trace=False,
):
    """Square attack (Andriushchenko et al. 2020), gradient-free.

    ``n_queries`` forward passes (static) after the initialisation; ``restarts``
    independent vmapped runs, per-example worst case kept. With ``return_trace``
    also returns the attack objective −margin per query, shape (n_queries+1, B).
    ``rescale_schedule``: see :func:`p_schedule` (AutoAttack runs Square with False).
    """
    return run_with_restarts(
        _square_single,
        restarts,
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        norm=norm,
        n_queries=n_queries,
        p_init=p_init,
        rescale_schedule=rescale_schedule,
        return_trace=return_trace,
    )
