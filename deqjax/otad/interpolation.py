"""Potentials of the OTAD convex integration problem: the interpolation LP.

OTAD (Gai, Wang & Zhang, "OTAD: An Optimal Transport-Induced Robust Model for
Agnostic Adversarial Attack", arXiv:2408.00329) interpolates the feature map
``T`` of an OT-regularised network on the K nearest training points by the
gradient of an l-strongly convex, L-smooth potential. A data set
``{(x_j, z_j = T(x_j), u_j)}`` is interpolable by such a potential iff
(Taylor, Hendrickx & Glineur 2017, "Smooth strongly convex interpolation and
exact worst-case performance of first-order methods", Thm. 4), for all i != j,

    u_i >= u_j + <z_j, x_i - x_j>
               + c [ (1/L)|z_i - z_j|^2 + l |x_i - x_j|^2
                     - (2l/L) <z_i - z_j, x_i - x_j> ],   c = 1 / (2 (1 - l/L)).

The authors choose the potentials by the LP ``min max_j u_j  s.t. u >= 0`` and
the conditions above.

Exact solver (why Bellman-Ford). Every condition is a *difference constraint*
``u_i - u_j >= a_ij``. With ``u >= 0`` (an edge of weight 0 from a virtual
source) the feasible set is closed under the componentwise minimum, so it has
a least element u*, and u* is given by longest-path lengths from the source:
``u*_i = max(0, max_j u*_j + a_ij)``. Since every feasible u satisfies
``u >= u*`` componentwise, u* also minimises ``max_j u_j``: it is an optimal
solution of the LP (the one with every u_j minimal). Bellman-Ford reaches it in
K - 1 vectorised relaxations (a longest path has at most K - 1 edges), each a
(K, K) ``max`` in jnp, so the solve is exact, O(K^3), jit/vmap-able and
differentiable almost everywhere. The system is infeasible iff the constraint
graph has a positive cycle, detected by one more relaxation still increasing u.

Infeasibility (T is not the gradient of such a potential on these points) is
handled as in the paper: L is relaxed upward (``L * factor**r``, r = 0..n_relax),
all candidates are solved in parallel (vmap) and the first feasible one is kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deqjax.solvers import vary_over, varying_axes


class Potentials(NamedTuple):
    """Result of :func:`interpolate_potentials` (per neighbour set).

    u: (K,) least potentials of the LP at ``L_used``.
    L_used: the smoothness constant actually used (>= the requested L).
    relaxed: True when L had to be increased.
    feasible: True when the LP at ``L_used`` is feasible; False means every
      candidate L failed (then ``u`` is the last Bellman-Ford iterate and the
      interpolation guarantees do not hold).
    """

    u: jax.Array
    L_used: jax.Array
    relaxed: jax.Array
    feasible: jax.Array


def check_strong_convexity_smoothness(l, L) -> None:
    """Validate ``0 <= l < L`` (an l-strongly convex, L-smooth potential).

    ``l`` selects the form of the conditions (``l = 0`` or not), so it must be a
    concrete number: a traced ``l`` (e.g. a positional argument of ``jax.jit``) raises
    — pass it as a static argument (``jax.jit(f, static_argnames="l")``). ``L`` may be
    traced (the relaxation vmaps over it): invalid traced values are not raised but
    flagged, see :func:`smoothness_is_valid`; concrete invalid ones raise.
    """
    if isinstance(l, jax.core.Tracer):
        raise TypeError(
            "the strong-convexity modulus l must be a concrete number (it selects the form "
            "of the interpolation conditions), got a traced value; under jax.jit pass it "
            "as a static argument, e.g. jax.jit(convex_integration, static_argnames='l')."
        )
    l_ = float(l)
    if not np.isfinite(l_) or l_ < 0:
        raise ValueError(f"need a finite l >= 0 (strong-convexity modulus); got l={l_}.")
    if isinstance(L, jax.core.Tracer):
        return
    L_ = float(L)
    if not (np.isfinite(L_) and L_ > l_):
        raise ValueError(
            f"need 0 <= l < L for an l-strongly convex, L-smooth potential; got "
            f"l={l_}, L={L_}. Pick a finite smoothness L larger than the modulus l."
        )


def smoothness_is_valid(l, L) -> jax.Array:
    """``L`` finite and ``> l`` (a traced-safe bool; results for an invalid traced ``L``
    are NaN with ``feasible=False``)."""
    L = jnp.asarray(L)
    return jnp.isfinite(L) & (L > l)


def check_neighbours(xs, zs) -> None:
    """Shape check for neighbour embeddings xs (K, d) and features zs (K, d_z)."""
    if xs.ndim != 2 or zs.ndim != 2 or xs.shape[0] != zs.shape[0]:
        raise ValueError(
            f"neighbours must be xs (K, d) and zs (K, d_z) with the same K; got "
            f"xs {xs.shape}, zs {zs.shape}. Flatten the embeddings per point."
        )
    if xs.shape[0] < 1:
        raise ValueError("need at least one neighbour (K >= 1)")


def interpolation_margins(xs, zs, l=0.0, L=2.0):
    """Matrix ``a`` of the difference constraints ``u_i - u_j >= a[i, j]``.

    ``a[i, j] = <z_j, x_i - x_j> + c[(1/L)|z_i - z_j|^2 + l|x_i - x_j|^2
    - (2l/L)<z_i - z_j, x_i - x_j>]`` (Taylor et al. 2017), ``-inf`` on the
    diagonal (no constraint for i = j). For l > 0 the features must live in the
    same space as the embeddings (d_z = d).
    """
    check_neighbours(xs, zs)
    check_strong_convexity_smoothness(l, L)
    if l != 0 and xs.shape[1] != zs.shape[1]:
        raise ValueError(
            f"l > 0 needs features and embeddings of the same dimension; got "
            f"d={xs.shape[1]}, d_z={zs.shape[1]}"
        )
    c = 1.0 / (2.0 * (1.0 - l / L))
    dx = xs[:, None, :] - xs[None, :, :]  # x_i - x_j
    dz = zs[:, None, :] - zs[None, :, :]  # z_i - z_j
    lin = jnp.einsum("jd,ijd->ij", zs, dx)
    quad = jnp.sum(dz * dz, -1) / L
    if l != 0:
        quad = quad + l * jnp.sum(dx * dx, -1) - (2 * l / L) * jnp.sum(dz * dx, -1)
    a = lin + c * quad
    eye = jnp.eye(xs.shape[0], dtype=bool)
    return jnp.where(eye, -jnp.inf, a)


def _feasibility_tol(a):
    finite = jnp.where(jnp.isfinite(a), jnp.abs(a), 0.0)
    eps = jnp.finfo(a.dtype).eps
    return 100.0 * a.shape[0] * eps * (1.0 + jnp.max(finite))


def least_potentials(a):
    """Least solution of ``u_i - u_j >= a[i, j]``, ``u >= 0`` by Bellman-Ford.

    Returns ``(u, feasible)``: ``u`` (K,) the longest-path potentials after
    K - 1 relaxations and ``feasible`` (bool) False iff one more relaxation still
    raises some ``u_i`` by more than a round-off tolerance (a positive cycle).
    """
    K = a.shape[0]

    def relax(u):
        return jnp.maximum(0.0, jnp.max(u[None, :] + a, axis=1))

    u0 = vary_over(jnp.zeros(K, a.dtype), varying_axes(a))  # shard_map: vary like a
    u = jax.lax.fori_loop(0, K, lambda _, u: relax(u), u0)
    feasible = jnp.all(relax(u) - u <= _feasibility_tol(a))
    return u, feasible


def solve_potentials(xs, zs, l=0.0, L=2.0):
    """Optimal LP potentials for one neighbour set at fixed (l, L).

    Returns ``(u, feasible)``; see :func:`least_potentials`.
    """
    return least_potentials(interpolation_margins(xs, zs, l, L))


def interpolate_potentials(
    xs, zs, l=0.0, L=2.0, *, n_relax: int = 5, factor: float = 2.0
) -> Potentials:
    """LP potentials with L relaxed upward until the LP is feasible (OTAD).

    Candidates ``L_r = L * factor**r``, r = 0..n_relax, are solved in parallel
    and the smallest feasible one is used. See :class:`Potentials`. ``l`` must be
    concrete (static under jit); a traced ``L`` that is not finite and ``> l`` gives
    ``u = NaN`` and ``feasible = False`` (a concrete one raises).
    """
    if n_relax < 0 or factor <= 1.0:
        raise ValueError(f"need n_relax >= 0 and factor > 1; got {n_relax}, {factor}")
    check_strong_convexity_smoothness(l, L)
    dtype = jnp.result_type(xs.dtype, zs.dtype, jnp.float32)
    Ls = L * factor ** jnp.arange(n_relax + 1, dtype=dtype)
    check_neighbours(xs, zs)
    us, feas = jax.vmap(lambda Lr: solve_potentials(xs, zs, l, Lr))(Ls)
    r = jnp.where(jnp.any(feas), jnp.argmax(feas), n_relax)
    valid = smoothness_is_valid(l, L)  # False only for a traced invalid L
    u = jnp.where(valid, us[r], jnp.nan)
    return Potentials(u=u, L_used=Ls[r], relaxed=r > 0, feasible=feas[r] & valid)
