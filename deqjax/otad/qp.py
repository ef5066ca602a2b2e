"""Concave QP over the probability simplex, with an implicit-differentiation VJP.

Solves ``max_{lam in simplex} D(lam) = <p, lam> - 1/2 lam^T Q lam`` (Q PSD),
the dual of the OTAD test-time problem (see :mod:`deqjax.otad.cip`; Gai, Wang
& Zhang, arXiv:2408.00329). K is tiny (the number of neighbours, ~10), so:

* forward: accelerated projected gradient (FISTA, Beck & Teboulle 2009) with
  gradient-based adaptive restart (O'Donoghue & Candes 2015), step 1/lambda_max(Q),
  followed by a few exact active-set "polish" steps that solve the KKT system on
  the support and are kept only if primal and dual feasible;
* backward: implicit differentiation of the KKT conditions on the support S
  ``p_j - (Q lam)_j - nu = 0 (j in S), lam_j = 0 (j not in S), sum(lam) = 1``,
  a (K+1) x (K+1) linear system (``jax.custom_vjp``). Exact wherever the support
  is locally constant (strict complementarity) and the KKT matrix nonsingular.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deqjax.solvers import vary_over, varying_axes


def projection_simplex(v):
    """Euclidean projection of v (K,) onto {lam >= 0, sum lam = 1}.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008):
    ``lam = max(v - theta, 0)`` with theta chosen so the result sums to one.
    """
    K = v.shape[-1]
    s = jnp.sort(v)[::-1]
    css = jnp.cumsum(s) - 1.0
    ind = jnp.arange(1, K + 1, dtype=v.dtype)
    rho = jnp.sum(s - css / ind > 0)
    theta = css[rho - 1] / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _kkt_tol(p, Q):
    eps = jnp.finfo(p.dtype).eps
    return 1e3 * eps * (1.0 + jnp.max(jnp.abs(p)) + jnp.max(jnp.abs(Q)))


def _kkt_solve(p, Q, S):
    """Stationary point of D on the face {lam_j = 0, j not in S} of the simplex."""
    K = p.shape[0]
    Sf = S.astype(p.dtype)
    M = jnp.zeros((K + 1, K + 1), p.dtype)
    M = M.at[:K, :K].set(jnp.where(S[:, None], Q, jnp.eye(K, dtype=p.dtype)))
    M = M.at[:K, K].set(Sf)
    M = M.at[K, :K].set(Sf)
    sol = jnp.linalg.solve(M, jnp.concatenate([p * Sf, jnp.ones((1,), p.dtype)]))
    return sol[:K] * Sf, sol[K]


def _solve(p, Q, maxiter: int, polish_rounds: int):
    K = p.shape[0]
    lmax = jnp.linalg.eigvalsh(Q)[-1]
    step = 1.0 / jnp.maximum(lmax, jnp.finfo(p.dtype).tiny ** 0.5)

    def fista(_, state):
        lam, y, t = state
        new = projection_simplex(y + step * (p - Q @ y))
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        y_new = new + ((t - 1.0) / t_new) * (new - lam)
        restart = jnp.dot(y - new, new - lam) > 0
        return (new, jnp.where(restart, new, y_new), jnp.where(restart, 1.0, t_new))

    # under shard_map, constant-initialised carries vary like the data (check_vma)
    axes = varying_axes(p) | varying_axes(Q)
    lam0 = jnp.full((K,), 1.0 / K, p.dtype)
    init = vary_over((lam0, lam0, jnp.ones((), p.dtype)), axes)
    lam, _, _ = jax.lax.fori_loop(0, maxiter, fista, init)
    tol = _kkt_tol(p, Q)

    def polish(_, state):
        lam, S = state
        cand, nu = _kkt_solve(p, Q, S)
        grad = p - Q @ cand
        ok = (
            jnp.all(jnp.isfinite(cand))
            & jnp.all(cand >= -tol)
            & jnp.all(jnp.where(S, True, grad <= nu + tol))
        )
        lam = jnp.where(ok, jnp.maximum(cand, 0.0), lam)
        S_new = (S & (cand > 0)) | (~S & (grad > nu + tol))
        S_new = jnp.where(jnp.any(S_new), S_new, S)
        return lam, jnp.where(ok, S, S_new)

    lam, _ = jax.lax.fori_loop(0, polish_rounds, polish, vary_over((lam, lam > 0), axes))
    return lam


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def simplex_qp(p, Q, maxiter: int = 500, polish_rounds: int = 3):
    """argmax over the simplex of ``<p, lam> - 1/2 lam^T Q lam`` (Q symmetric PSD).

    Args:
      p: (K,) linear term. Q: (K, K) symmetric positive semi-definite.
      maxiter: FISTA iterations before polishing. polish_rounds: active-set steps.
    Returns: lam (K,) on the simplex. Differentiable in (p, Q) by implicit
    differentiation of the KKT conditions (see module docstring).
    """
    return _solve(p, Q, maxiter, polish_rounds)


def _fwd(p, Q, maxiter, polish_rounds):
    lam = _solve(p, Q, maxiter, polish_rounds)
    return lam, (p, Q, lam)


def _bwd(maxiter, polish_rounds, res, lam_bar):
    p, Q, lam = res
    K = p.shape[0]
    S = lam > 0
    Sf = S.astype(p.dtype)
    # Jacobian of F(lam, nu) = [S*(p - Q lam - nu) + (1-S)*lam ; sum(lam) - 1].
    M = jnp.zeros((K + 1, K + 1), p.dtype)
    M = M.at[:K, :K].set(jnp.where(S[:, None], -Q, jnp.eye(K, dtype=p.dtype)))
    M = M.at[:K, K].set(-Sf)
    M = M.at[K, :K].set(1.0)
    rhs = jnp.concatenate([lam_bar, jnp.zeros((1,), p.dtype)])
    w = jnp.linalg.lstsq(M.T, rhs)[0][:K] * Sf
    # d lam = -M^{-1} F_theta d theta  =>  theta_bar = -w^T F_theta.
    return _like_primal(-w, p), _like_primal(jnp.outer(w, lam), Q)


def _like_primal(ct, primal):
    """Under ``shard_map``: a cotangent that varies over mesh axes its primal input does
    not vary over is summed over them (the transpose of the implicit cast to varying)."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal), key=str))
    return jax.lax.psum(ct, extra) if extra else ct


simplex_qp.defvjp(_fwd, _bwd)
