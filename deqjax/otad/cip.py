"""OTAD test-time convex integration problem (CIP): the new feature at x.

Gai, Wang & Zhang, "OTAD: An Optimal Transport-Induced Robust Model for
Agnostic Adversarial Attack", arXiv:2408.00329. Given the K neighbours
``(x_j, z_j)`` of a test embedding ``x`` and their LP potentials ``u_j``
(:mod:`deqjax.otad.interpolation`), the new feature is

    g(x) = argmin_g max_j q_j(g).

Two forms of ``q_j`` are offered (``form=``):

* ``"authors"`` (l = 0 only), the test-time problem of the OTAD paper
  (docs/methods/otad.md):
  ``q_j(g) = u_j - <g - z_j, x - x_j> + |g - z_j|^2 / (2L)``.
* ``"envelope"`` (any 0 <= l < L): the Taylor-Hendrickx-Glineur condition
  "the new point (x, f, g) lies above neighbour j" (the lower smooth strongly
  convex extension of Paty, d'Aspremont & Cuturi 2020, "Regularity as
  regularization: smooth and strongly convex Brenier potentials in OT"):
  ``q_j(g) = u_j + <z_j, x - x_j> + c[(1/L)|g - z_j|^2 + l|x - x_j|^2
  - (2l/L)<g - z_j, x - x_j>]``, ``c = 1/(2(1 - l/L))``.

Common form and dual. Completing the square, both are
``q_j(g) = beta_j + (a/2) |g - w_j|^2`` with one curvature a for all j:

* authors: ``a = 1/L``, ``w_j = z_j + L(x - x_j)``, ``beta_j = u_j - (L/2)|x - x_j|^2``;
* envelope: ``a = 2c/L = 1/(L - l)``, ``w_j = z_j + l(x - x_j)``,
  ``beta_j = u_j + <z_j, x - x_j> + (l/2)|x - x_j|^2``.

Epigraph form ``min t s.t. q_j(g) <= t``; with multipliers lam in the simplex,
``min_g sum_j lam_j q_j(g)`` is attained at ``g(lam) = sum_j lam_j w_j`` (for
the authors' form ``sum_j lam_j (z_j + L(x - x_j))``) and gives the concave dual

    D(lam) = <beta, lam> + (a/2) (sum_j lam_j |w_j|^2 - |sum_j lam_j w_j|^2)
           = <beta + (a/2)|w_j - m|^2, lam> - (a/2) lam^T G lam,

with ``G = (W - m)(W - m)^T`` for any centre m (the lam-weighted variance of
the w_j is translation invariant; the mean is used, for conditioning). Strong
duality holds (convex QCQP, Slater), the primal minimiser is unique
(strongly convex objective) and equals ``g(lam*)``; the optimal value is the
potential at x. The K-dimensional dual is solved by :func:`simplex_qp`.

What is guaranteed (proved here, checked in tests/test_otad.py), for a fixed
neighbour set whose potentials u satisfy the LP at L:

* envelope form: f(x) = min_g max_j q_j(g) = max_lam D(lam) is a supremum of
  functions of x whose gradient is g(lam); for l = 0 its conjugate is
  ``|y|^2/(2L)`` plus a convex piecewise-linear function, so f is convex and
  L-smooth and ``g(x) = grad f(x)``. Hence (i) exact interpolation
  ``g(x_j) = z_j`` (at x = x_j the j-th piece alone forces g = z_j, and the LP
  constraints make the other pieces <= u_j); (ii) ``|g(x) - g(y)| <= L|x - y|``
  and ``<g(x) - g(y), x - y> >= |g(x) - g(y)|^2 / L`` for all x, y, in
  particular ``|g(x) - z_j| <= L |x - x_j|``. For l > 0 the same holds for
  ``f - l|.|^2/2`` with ``L - l``, so g is also l-strongly monotone.
* authors' form: ``g(x) = L x + sum_j lam_j*(x) (z_j - L x_j)``, i.e. ``L x``
  plus a point of conv{z_j - L x_j}; so ``|g(x) - z_j| <= L|x - x_j|
  + max_{i,k} |(z_i - L x_i) - (z_k - L x_k)|``. Neither ``g(x_j) = z_j`` nor an
  L-Lipschitz bound holds in general (the tests exhibit counterexamples), so the
  authors' claim that the CIP map is locally L-Lipschitz and interpolates T is
  true for the envelope form, not for the form as written.

With L relaxed by the LP (``L_used > L``) every statement holds with L_used.
The neighbour set itself changes with x (k-NN), so globally the map is only
piecewise so.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deqjax.otad.interpolation import (
    check_neighbours,
    check_strong_convexity_smoothness,
    interpolate_potentials,
    smoothness_is_valid,
)
from deqjax.otad.qp import simplex_qp

FORMS = ("authors", "envelope")


class CIPResult(NamedTuple):
    """g: (d_z,) new feature. value: optimal value (potential at x).
    lam: (K,) dual weights. L_used / relaxed / feasible: see Potentials."""

    g: jax.Array
    value: jax.Array
    lam: jax.Array
    L_used: jax.Array
    relaxed: jax.Array
    feasible: jax.Array


def cip_pieces(x, xs, zs, u, l=0.0, L=2.0, form: str = "authors"):
    """``(beta, W, a)`` with ``q_j(g) = beta_j + (a/2)|g - W_j|^2`` (module doc)."""
    check_neighbours(xs, zs)
    check_strong_convexity_smoothness(l, L)
    if x.shape != xs.shape[1:]:
        raise ValueError(
            f"test embedding x must have shape {xs.shape[1:]} (one row of xs); got {x.shape}"
        )
    if u.shape != xs.shape[:1]:
        raise ValueError(f"potentials u must have shape ({xs.shape[0]},); got {u.shape}")
    dx = x[None, :] - xs
    sq = jnp.sum(dx * dx, axis=-1)
    if form == "authors":
        if l != 0:
            raise NotImplementedError(
                "the authors' test-time problem is stated for l = 0 only; use "
                "form='envelope', which is the general l > 0 condition of Taylor et al."
            )
        if zs.shape[1] != xs.shape[1]:
            raise ValueError(
                "form='authors' needs features and embeddings of the same "
                f"dimension; got d={xs.shape[1]}, d_z={zs.shape[1]}"
            )
        return u - 0.5 * L * sq, zs + L * dx, 1.0 / L
    if form == "envelope":
        if l != 0 and zs.shape[1] != xs.shape[1]:
            raise ValueError("l > 0 needs features and embeddings of the same dimension")
        beta = u + jnp.sum(zs * dx, axis=-1) + 0.5 * l * sq
        return beta, zs + l * dx if l != 0 else zs, 1.0 / (L - l)
    raise ValueError(f"unknown CIP form {form!r}; choose one of {FORMS}")


def cip_objective(g, x, xs, zs, u, l=0.0, L=2.0, form: str = "authors"):
    """Primal objective ``max_j q_j(g)`` (for checks and brute-force references)."""
    beta, W, a = cip_pieces(x, xs, zs, u, l, L, form)
    return jnp.max(beta + 0.5 * a * jnp.sum((g[None, :] - W) ** 2, axis=-1))


def cip_dual(beta, W, a, *, maxiter: int = 500):
    """Solve the dual QP; returns ``(g, value, lam)`` (module doc)."""
    Wc = W - jnp.mean(W, axis=0, keepdims=True)
    p = beta + 0.5 * a * jnp.sum(Wc * Wc, axis=-1)
    Q = a * (Wc @ Wc.T)
    lam = simplex_qp(p, Q, maxiter)
    value = jnp.dot(p, lam) - 0.5 * jnp.dot(lam, Q @ lam)
    return lam @ W, value, lam


def cip_feature(x, xs, zs, u, l=0.0, L=2.0, form: str = "authors", *, maxiter: int = 500):
    """New feature ``g(x)`` for given potentials u (fixed L). Returns (g, value, lam);
    all NaN for a traced ``L`` that is not finite and ``> l``."""
    g, value, lam = cip_dual(*cip_pieces(x, xs, zs, u, l, L, form), maxiter=maxiter)
    valid = smoothness_is_valid(l, L)
    return tuple(jnp.where(valid, a, jnp.nan) for a in (g, value, lam))


def convex_integration(
    x,
    xs,
    zs,
    l=0.0,
    L=2.0,
    form: str = "authors",
    *,
    n_relax: int = 5,
    factor: float = 2.0,
    maxiter: int = 500,
) -> CIPResult:
    """Full OTAD CIP for one test embedding: LP potentials (L relaxed upward if
    infeasible, see :func:`interpolate_potentials`) then the test-time problem at
    ``L_used``. Differentiable in x, xs, zs; vmap over test points for batches.

    ``l`` is static: under ``jax.jit`` pass it with ``static_argnames="l"`` (a traced
    ``l`` raises; it selects the form of the problem). ``L`` may be traced; concrete
    invalid values (``L <= l``, non-finite) raise, traced ones give NaN results with
    ``feasible=False``."""
    pot = interpolate_potentials(xs, zs, l, L, n_relax=n_relax, factor=factor)
    g, value, lam = cip_feature(x, xs, zs, pot.u, l, pot.L_used, form, maxiter=maxiter)
    return CIPResult(g, value, lam, pot.L_used, pot.relaxed, pot.feasible)
