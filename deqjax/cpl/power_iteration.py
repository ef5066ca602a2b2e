"""Spectral norm of a linear operator by power iteration with a persistent vector.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML, estimate ``‖W‖₂`` of each CPL by power iteration on ``WᵀW`` with a
vector carried across training steps (1 iteration per step, many at evaluation),
as in spectral normalisation (Miyato et al. 2018). Here the vector ``u`` is an
explicit state: it is passed in, updated under ``stop_gradient`` and returned, and
``σ = ‖W u‖`` with ``‖u‖ = 1`` is differentiable with respect to ``W``
(``∂σ/∂W = v uᵀ`` at convergence, the gradient of the true spectral norm).

``σ`` is a *lower* bound on ``‖W‖₂`` at every iteration; provable upper bounds (for
certificates) are in :mod:`deqjax.cpl.bounds`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.cpl.layers import check_conv_args, conv, conv_transpose

_TINY = 1e-12


def _norm(v: jax.Array) -> jax.Array:
    """‖v‖ with gradient 0 (not NaN) at v = 0 (a zero weight gives σ = 0)."""
    sq = jnp.sum(v * v)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _normalize(v: jax.Array, fallback: jax.Array) -> jax.Array:
    """``v/‖v‖``, or ``fallback`` where ``v`` is (numerically) zero.

    ``WᵀW u = 0`` happens for a zero weight (e.g. zero init): keeping the previous
    vector instead of storing 0 keeps the state usable once W moves (a zero state
    would stay zero and give σ = 0, i.e. a step of 2e4, forever).
    """
    n = jnp.linalg.norm(v.ravel())
    return jnp.where(n > _TINY, v / jnp.where(n > _TINY, n, 1.0), fallback)


def _unit_start(u: jax.Array) -> jax.Array:
    """The state normalised; a zero state (old checkpoints) restarts from a fixed vector."""
    flat = jnp.ones(u.shape, u.dtype) + 0.5 * jnp.cos(jnp.arange(u.size, dtype=u.dtype)).reshape(
        u.shape
    )
    return _normalize(u, flat / jnp.linalg.norm(flat.ravel()))


def power_iteration(
    op: Callable[[jax.Array], jax.Array],
    op_T: Callable[[jax.Array], jax.Array],
    u: jax.Array,
    n_iters: int,
) -> tuple[jax.Array, jax.Array]:
    """Estimate ``‖op‖₂`` by ``n_iters`` steps of ``u ← opᵀ(op(u)) / ‖·‖``.

    Args:
      op, op_T: the linear map ``W`` and its exact adjoint ``Wᵀ``.
      u: the persistent vector (any shape accepted by ``op``); need not be unit.
      n_iters: number of iterations (≥ 0; 0 just re-evaluates σ at ``u``).

    Returns:
      ``(sigma, u_new)``: ``σ = ‖W û‖`` with ``û = stop_gradient(u_new)`` unit
      norm — a lower bound on ``‖W‖₂`` that converges to it — and ``u_new``.
    """
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be a non-negative int, got {n_iters!r}.")
    u = _unit_start(lax.stop_gradient(u))

    def body(_, u):
        return _normalize(lax.stop_gradient(op_T(op(u))), u)

    u = lax.stop_gradient(lax.fori_loop(0, n_iters, body, u))
    sigma = _norm(op(u))
    return sigma, u


def converged_power_iteration(
    op: Callable[[jax.Array], jax.Array],
    op_T: Callable[[jax.Array], jax.Array],
    u: jax.Array,
    rtol: float = 1e-7,
    max_iters: int = 5000,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Power iteration until ``σ`` rises by less than ``rtol`` (relative) in a step.

    ``σ_k = ‖W u_k‖`` is non-decreasing for power iteration on ``WᵀW``; it stops at
    the first step that raises it by at most ``rtol·σ`` or after ``max_iters``.
    Still a *lower* bound on ``‖W‖₂`` (slow when the top singular values cluster).
    Returns ``(sigma, u, steps)``; not differentiable (evaluation only).
    """
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}.")
    u = _unit_start(lax.stop_gradient(u))

    def cond(carry):
        _, sigma, prev, k = carry
        return (k < max_iters) & ((k < 2) | (sigma - prev > rtol * sigma))

    def body(carry):
        u, sigma, _, k = carry
        v = op(u)
        return _normalize(op_T(v), u), _norm(v), sigma, k + 1

    zero = jnp.zeros((), u.dtype)
    u, _, _, k = lax.while_loop(cond, body, (u, zero, zero, jnp.zeros((), jnp.int32)))
    return _norm(op(u)), u, k


def dense_operator(weight: jax.Array, u: jax.Array):
    """``(W, Wᵀ)`` of a ``(inner, d)`` matrix as functions, after checking the state ``u``."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix (inner, d), got {weight.shape}.")
    if u.shape != (weight.shape[1],):
        raise ValueError(
            f"power-iteration state has shape {u.shape} but the weight {weight.shape}"
            f" needs ({weight.shape[1]},); re-initialise the 'power_iteration' state."
        )
    return (lambda v: weight @ v), (lambda w: weight.T @ w)


def conv_operator(kernel: jax.Array, u: jax.Array, stride: int = 1, padding: str = "SAME"):
    """``(W, Wᵀ)`` of the conv at the input size of the state ``u`` (shape ``(1, H, W, C)``)."""
    if u.ndim != 4 or u.shape[0] != 1:
        raise ValueError(
            f"conv power-iteration state must have shape (1, H, W, C), got {u.shape};"
            " re-initialise the 'power_iteration' state."
        )
    check_conv_args(u, kernel)
    shape = u.shape
    return (
        lambda v: conv(v, kernel.astype(v.dtype), stride, padding),
        lambda w: conv_transpose(w, kernel.astype(w.dtype), shape, stride, padding),
    )


def dense_spectral_norm(
    weight: jax.Array, u: jax.Array, n_iters: int
) -> tuple[jax.Array, jax.Array]:
    """``‖W‖₂`` of a ``(inner, d)`` matrix by power iteration; ``u`` has shape ``(d,)``."""
    return power_iteration(*dense_operator(weight, u), u, n_iters)


def conv_spectral_norm(
    kernel: jax.Array, u: jax.Array, n_iters: int, stride: int = 1, padding: str = "SAME"
) -> tuple[jax.Array, jax.Array]:
    """Spectral norm of the whole conv operator at the input size of ``u``.

    ``u`` has shape ``(1, H, W, C)`` — one input of the layer — so ``σ`` is the
    norm of the convolution at that size, stride and padding (not of the kernel
    matrix; Meunier et al. 2022, Sec. 4).
    """
    return power_iteration(*conv_operator(kernel, u, stride, padding), u, n_iters)
