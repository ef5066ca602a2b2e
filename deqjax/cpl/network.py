"""Flax (linen) wrappers for Convex Potential Layer networks.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML. Thin modules over :mod:`deqjax.cpl.layers`. The power-iteration
vectors live in the variable collection ``"power_iteration"``: make it mutable in
training (``apply(..., mutable=["power_iteration"])``, 1 iteration per step) and run
many iterations at evaluation (``n_power_iters=100``); when the collection is not
mutable the refined vector is used for this call but not stored.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.cpl.layers import conv_cpl, dense_cpl, sum_pool_lipschitz
from deqjax.cpl.power_iteration import conv_spectral_norm, dense_spectral_norm

COLLECTION = "power_iteration"
LAST_LAYERS = ("truncate", "row_normalized")


def _unit_normal(module: nn.Module, shape) -> jax.Array:
    u = jax.random.normal(module.make_rng("params"), shape)
    return u / jnp.linalg.norm(u.ravel())


def _state(module: nn.Module, shape, name: str = "u"):
    if not module.is_initializing() and not module.has_variable(COLLECTION, name):
        raise ValueError(
            f"{module.__class__.__name__} has no '{COLLECTION}' variable: pass the "
            f"'{COLLECTION}' collection returned by init() to apply()."
        )
    var = module.variable(COLLECTION, name, _unit_normal, module, shape)
    if var.value.shape != tuple(shape):
        raise ValueError(
            f"'{COLLECTION}' state of {module.__class__.__name__} has shape "
            f"{var.value.shape} but this input needs {tuple(shape)}; the spectral norm"
            " depends on the input size, so re-run init() with the new input shape."
        )
    return var


def _n_iters(module, n_power_iters: int | None) -> int:
    n = module.power_iters if n_power_iters is None else n_power_iters
    if module.is_initializing():
        n = max(n, 1)
    return n


class DenseCPL(nn.Module):
    """Dense CPL ``x ↦ x − 2/(‖W‖²+1e-4) Wᵀ ReLU(Wx+b)`` with ``W: (inner, d)``."""

    inner: int
    power_iters: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, n_power_iters: int | None = None):
        d = x.shape[-1]
        w = self.param("kernel", self.kernel_init, (self.inner, d))
        b = self.param("bias", nn.initializers.zeros, (self.inner,))
        u = _state(self, (d,))
        sigma, u_new = dense_spectral_norm(w, u.value, _n_iters(self, n_power_iters))
        if self.is_mutable_collection(COLLECTION):
            u.value = u_new
        return dense_cpl(x, w, b, sigma)


class ConvCPL(nn.Module):
    """Convolutional CPL on NHWC inputs; ``‖W‖₂`` of the whole conv operator."""

    inner: int
    kernel_size: int = 3
    stride: int = 1
    padding: str = "SAME"
    power_iters: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, n_power_iters: int | None = None):
        if x.ndim != 4:
            raise ValueError(f"ConvCPL input must be NHWC (rank 4), got {x.shape}.")
        k = self.kernel_size
        w = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.inner))
        b = self.param("bias", nn.initializers.zeros, (self.inner,))
        u = _state(self, (1,) + x.shape[1:])
        sigma, u_new = conv_spectral_norm(
            w, u.value, _n_iters(self, n_power_iters), self.stride, self.padding
        )
        if self.is_mutable_collection(COLLECTION):
            u.value = u_new
        return conv_cpl(x, w, b, sigma, self.stride, self.padding)


class RowNormalizedDense(nn.Module):
    """Linear layer ``h ↦ Ŵ h + b`` whose rows ``ŵ_j = w_j/‖w_j‖`` have unit norm."""

    features: int

    @nn.compact
    def __call__(self, h):
        w = self.param("kernel", nn.initializers.lecun_normal(), (self.features, h.shape[-1]))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return h @ row_normalize(w).T + b


def row_normalize(w: jax.Array) -> jax.Array:
    """Scale each row of ``w`` to unit ℓ2 norm."""
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def last_layer_weight(variables) -> jax.Array:
    """Row-normalised last weight ``Ŵ`` of a ``last_layer="row_normalized"`` CPLNet."""
    return row_normalize(variables["params"]["last"]["kernel"])


def _pad_last(x, size):
    extra = size - x.shape[-1]
    if extra < 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class CPLNet(nn.Module):
    """1-Lipschitz (ℓ2) CPL network of Meunier et al. (2022), Sec. 5.

    zero-pad channels to ``conv_channels`` → ``depth`` ConvCPLs (inner channels
    ``conv_inner``) → sum-pool/``pool`` (1-Lipschitz) → flatten → zero-pad features
    to ``linear_width`` (if fewer) → ``depth_linear`` DenseCPLs (inner width
    ``linear_width``) → last layer: ``"truncate"`` (first ``num_classes``
    coordinates; certificate ``(top1−top2)/√2``) or ``"row_normalized"`` (linear
    layer with unit-norm rows; certificate ``min_j (f_y−f_j)/‖w_y−w_j‖``).

    If the flattened size exceeds ``linear_width`` it is kept (the dense CPLs are
    ``(linear_width, flat)``). Conv CPLs here use stride 1. ``__call__(x,
    n_power_iters=None)``: ``None`` uses ``power_iters`` (1, for training with
    ``mutable=["power_iteration"]``); pass e.g. 100 at evaluation.
    """

    depth: int
    depth_linear: int
    conv_channels: int
    conv_inner: int
    linear_width: int
    num_classes: int
    last_layer: str = "truncate"
    kernel_size: int = 3
    pool: int = 4
    padding: str = "SAME"
    power_iters: int = 1

    def setup(self):
        if self.last_layer not in LAST_LAYERS:
            raise ValueError(f"unknown last_layer {self.last_layer!r}; use one of {LAST_LAYERS}.")
        self.convs = [
            ConvCPL(self.conv_inner, self.kernel_size, 1, self.padding, self.power_iters)
            for _ in range(self.depth)
        ]
        self.denses = [
            DenseCPL(self.linear_width, self.power_iters) for _ in range(self.depth_linear)
        ]
        if self.last_layer == "row_normalized":
            self.last = RowNormalizedDense(self.num_classes)

    def features(self, x, n_power_iters: int | None = None):
        """The 1-Lipschitz feature map (everything before the last layer)."""
        if x.ndim != 4:
            raise ValueError(f"CPLNet input must be NHWC (rank 4), got {x.shape}.")
        if x.shape[-1] > self.conv_channels:
            raise ValueError(
                f"input has {x.shape[-1]} channels > conv_channels="
                f"{self.conv_channels}; increase conv_channels."
            )
        x = _pad_last(x, self.conv_channels)
        for layer in self.convs:
            x = layer(x, n_power_iters)
        x = sum_pool_lipschitz(x, self.pool)
        x = _pad_last(x.reshape(x.shape[0], -1), self.linear_width)
        for layer in self.denses:
            x = layer(x, n_power_iters)
        return x

    def __call__(self, x, n_power_iters: int | None = None):
        h = self.features(x, n_power_iters)
        if self.last_layer == "truncate":
            return _pad_last(h, self.num_classes)[:, : self.num_classes]
        return self.last(h)
