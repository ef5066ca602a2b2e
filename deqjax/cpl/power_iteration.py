"""Spectral norm of a linear operator by power iteration with a persistent vector.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML, estimate ``‖W‖₂`` of each CPL by power iteration on ``WᵀW`` with a
vector carried across training steps (1 iteration per step, many at evaluation),
as in spectral normalisation (Miyato et al. 2018). Here the vector ``u`` is an
explicit state: it is passed in, updated under ``stop_gradient`` and returned, and
``σ = ‖W u‖`` with ``‖u‖ = 1`` is differentiable with respect to ``W``
(``∂σ/∂W = v uᵀ`` at convergence, the gradient of the true spectral norm).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.cpl.layers import check_conv_args, conv, conv_transpose

_TINY = 1e-12


def _normalize(u: jax.Array) -> jax.Array:
    return u / jnp.maximum(jnp.linalg.norm(u.ravel()), _TINY)


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
    u = _normalize(lax.stop_gradient(u))

    def body(_, u):
        return _normalize(lax.stop_gradient(op_T(op(u))))

    u = lax.stop_gradient(lax.fori_loop(0, n_iters, body, u))
    sigma = jnp.linalg.norm(op(u).ravel())
    return sigma, u


def dense_spectral_norm(
    weight: jax.Array, u: jax.Array, n_iters: int
) -> tuple[jax.Array, jax.Array]:
    """``‖W‖₂`` of a ``(inner, d)`` matrix by power iteration; ``u`` has shape ``(d,)``."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix (inner, d), got {weight.shape}.")
    if u.shape != (weight.shape[1],):
        raise ValueError(
            f"power-iteration state has shape {u.shape} but the weight {weight.shape}"
            f" needs ({weight.shape[1]},); re-initialise the 'power_iteration' state."
        )
    return power_iteration(lambda v: weight @ v, lambda w: weight.T @ w, u, n_iters)


def conv_spectral_norm(
    kernel: jax.Array, u: jax.Array, n_iters: int, stride: int = 1, padding: str = "SAME"
) -> tuple[jax.Array, jax.Array]:
    """Spectral norm of the whole conv operator at the input size of ``u``.

    ``u`` has shape ``(1, H, W, C)`` — one input of the layer — so ``σ`` is the
    norm of the convolution at that size, stride and padding (not of the kernel
    matrix; Meunier et al. 2022, Sec. 4).
    """
    if u.ndim != 4 or u.shape[0] != 1:
        raise ValueError(
            f"conv power-iteration state must have shape (1, H, W, C), got {u.shape};"
            " re-initialise the 'power_iteration' state."
        )
    check_conv_args(u, kernel)
    shape = u.shape
    return power_iteration(
        lambda v: conv(v, kernel.astype(v.dtype), stride, padding),
        lambda w: conv_transpose(w, kernel.astype(w.dtype), shape, stride, padding),
        u,
        n_iters,
    )
