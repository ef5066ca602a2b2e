"""Neural CIP (CIP-net): a network that predicts the CIP feature g.

Gai, Wang & Zhang, arXiv:2408.00329 (OTAD-NN): solving the CIP at test time
is replaced by a network trained (MSE) to map (test embedding x, neighbours
x_j, features z_j) to the solver's g; the result is differentiable end to end,
so full white-box attacks apply to it.

Architecture (choice, mirrors the dual solution ``g = sum_j lam_j w_j`` with
``w_j = z_j + s (x - x_j)``): a shared encoder of each neighbour's
``[x - x_j, z_j]``, mean pooling, a score per neighbour from
``[h_j, mean h]``, softmax weights ``alpha`` (a learned stand-in for the dual
weights lam), and ``g = sum_j alpha_j (z_j + s (x - x_j)) + Dense(mean h)``
with a learned slope ``s`` (only when d_z = d) and a zero-initialised correction.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class NeuralCIP(nn.Module):
    """Predict g from x (..., d), xs (..., K, d), zs (..., K, d_z) -> (..., d_z)."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x, xs, zs):
        if (
            xs.ndim < 2
            or x.shape != xs.shape[:-2] + xs.shape[-1:]
            or zs.shape[:-1] != xs.shape[:-1]
        ):
            raise ValueError(
                f"need x (..., d), xs (..., K, d), zs (..., K, d_z); got "
                f"{x.shape}, {xs.shape}, {zs.shape}"
            )
        dx = x[..., None, :] - xs
        h = nn.relu(nn.Dense(self.hidden)(jnp.concatenate([dx, zs], axis=-1)))
        h = nn.relu(nn.Dense(self.hidden)(h))
        pooled = jnp.mean(h, axis=-2, keepdims=True)
        both = jnp.concatenate([h, jnp.broadcast_to(pooled, h.shape)], axis=-1)
        score = nn.Dense(1)(nn.relu(nn.Dense(self.hidden)(both)))[..., 0]
        alpha = nn.softmax(score, axis=-1)
        w = zs
        if zs.shape[-1] == xs.shape[-1]:
            s = self.param("slope", nn.initializers.zeros, ())
            w = zs + s * dx
        g = jnp.einsum("...k,...kd->...d", alpha, w)
        corr = nn.Dense(zs.shape[-1], kernel_init=nn.initializers.zeros)(pooled[..., 0, :])
        return g + corr


def neural_cip_loss(pred, target):
    """MSE ``mean (pred - target)^2`` between predicted and CIP-solver features."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    return jnp.mean((pred - target) ** 2)
