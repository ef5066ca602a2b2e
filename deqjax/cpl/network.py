"""Flax (linen) wrappers for Convex Potential Layer networks.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML. Thin modules over :mod:`deqjax.cpl.layers`. Where each layer's
``σ`` (its operator-norm estimate, step ``2/(σ²+1e-4)``) comes from is chosen per
call by ``sigma=``:

* ``"iterate"`` (default; training): ``n_power_iters`` power iterations from the
  vectors in the collection ``"power_iteration"``; make it mutable in training
  (``apply(..., mutable=["power_iteration"])``, 1 iteration per step). A lower bound:
  right after init or with few iterations the layer need not be 1-Lipschitz.
* ``"upper"``: the stored provable upper bound (Gram iteration, :mod:`.bounds`) — the
  network is 1-Lipschitz by construction.
* ``"power"``: the stored converged power-iteration σ (the conventional network of
  Meunier et al.).

The stored values live in the collection ``"sigma"``, written once per evaluation by
:func:`prepare_sigmas` (no iterations inside the forward call, so attacks are cheap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.cpl.bounds import GRAM_ITERS, conv_norm_bound, dense_norm_bound
from deqjax.cpl.layers import conv_cpl, dense_cpl, sum_pool_lipschitz
from deqjax.cpl.power_iteration import (
    conv_operator,
    converged_power_iteration,
    dense_operator,
    power_iteration,
)

COLLECTION = "power_iteration"
SIGMA_COLLECTION = "sigma"
SIGMA_MODES = ("iterate", "power", "upper")
LAST_LAYERS = ("truncate", "row_normalized")


@dataclasses.dataclass(frozen=True)
class Preparation:
    """The ``sigma=`` of a :func:`prepare_sigmas` pass: each CPL stores its Gram upper
    bound (``"upper"``) and, if ``power``, its power-iteration σ run to convergence
    (``"power"``, with the iterations taken in ``"power_steps"``)."""

    power: bool = True
    power_rtol: float = 1e-7
    max_power_iters: int = 5000
    gram_iters: int = GRAM_ITERS


def _check_sigma_mode(sigma):
    if not isinstance(sigma, Preparation) and sigma not in SIGMA_MODES:
        raise ValueError(
            f"unknown sigma={sigma!r}; use one of {SIGMA_MODES} (or prepare the stored "
            "values with deqjax.cpl.prepare_sigmas)."
        )


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


def _layer_sigma(module, sigma, u, n_power_iters, operator, bound) -> jax.Array:
    """This call's σ (module doc). ``operator()`` gives ``(W, Wᵀ)``; ``bound(iters)``
    the Gram upper bound (float32 numpy scalar, computed eagerly on the host)."""
    _check_sigma_mode(sigma)
    if isinstance(sigma, Preparation):
        upper = jnp.asarray(bound(sigma.gram_iters))
        module.put_variable(SIGMA_COLLECTION, "upper", upper)
        if sigma.power:
            s, _, steps = converged_power_iteration(
                *operator(), u.value, sigma.power_rtol, sigma.max_power_iters
            )
            module.put_variable(SIGMA_COLLECTION, "power", s)
            module.put_variable(SIGMA_COLLECTION, "power_steps", steps)
        return upper
    if sigma == "iterate":
        s, u_new = power_iteration(*operator(), u.value, _n_iters(module, n_power_iters))
        if module.is_mutable_collection(COLLECTION):
            u.value = u_new
        return s
    if not module.has_variable(SIGMA_COLLECTION, sigma):
        raise ValueError(
            f"{module.__class__.__name__} has no stored σ {sigma!r} in the "
            f"'{SIGMA_COLLECTION}' collection: compute it first with "
            "variables = deqjax.cpl.prepare_sigmas(net, variables, x)."
        )
    return module.get_variable(SIGMA_COLLECTION, sigma)


class DenseCPL(nn.Module):
    """Dense CPL ``x ↦ x − 2/(‖W‖²+1e-4) Wᵀ ReLU(Wx+b)`` with ``W: (inner, d)``."""

    inner: int
    power_iters: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, n_power_iters: int | None = None, sigma="iterate"):
        d = x.shape[-1]
        w = self.param("kernel", self.kernel_init, (self.inner, d))
        b = self.param("bias", nn.initializers.zeros, (self.inner,))
        u = _state(self, (d,))
        s = _layer_sigma(
            self,
            sigma,
            u,
            n_power_iters,
            lambda: dense_operator(w, u.value),
            lambda n: dense_norm_bound(w, n),
        )
        return dense_cpl(x, w, b, s)


class ConvCPL(nn.Module):
    """Convolutional CPL on NHWC inputs; ``‖W‖₂`` of the whole conv operator."""

    inner: int
    kernel_size: int = 3
    stride: int = 1
    padding: str = "SAME"
    power_iters: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, n_power_iters: int | None = None, sigma="iterate"):
        if x.ndim != 4:
            raise ValueError(f"ConvCPL input must be NHWC (rank 4), got {x.shape}.")
        k = self.kernel_size
        w = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.inner))
        b = self.param("bias", nn.initializers.zeros, (self.inner,))
        u = _state(self, (1,) + x.shape[1:])
        s = _layer_sigma(
            self,
            sigma,
            u,
            n_power_iters,
            lambda: conv_operator(w, u.value, self.stride, self.padding),
            lambda n: conv_norm_bound(w, x.shape[1:3], self.stride, self.padding, n),
        )
        return conv_cpl(x, w, b, s, self.stride, self.padding)


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
    coordinates; certificate ``(top1−top2)/√2``; needs ``num_classes ≤
    linear_width``) or ``"row_normalized"`` (linear layer with unit-norm rows;
    certificate ``min_j (f_y−f_j)/‖w_y−w_j‖``).

    If the flattened size exceeds ``linear_width`` it is kept (the dense CPLs are
    ``(linear_width, flat)``). Conv CPLs here use stride 1. ``__call__(x,
    n_power_iters=None, sigma="iterate")``: see the module doc for ``sigma``; with
    ``"iterate"``, ``n_power_iters=None`` uses ``power_iters`` (1, for training with
    ``mutable=["power_iteration"]``).
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

    def __post_init__(self):
        if self.last_layer not in LAST_LAYERS:
            raise ValueError(f"unknown last_layer {self.last_layer!r}; use one of {LAST_LAYERS}.")
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (a margin needs two), got {self.num_classes}."
            )
        if self.last_layer == "truncate" and self.num_classes > self.linear_width:
            raise ValueError(
                f"last_layer='truncate' keeps the first num_classes={self.num_classes} of "
                f"linear_width={self.linear_width} features: the rest would be constant-zero "
                "logits. Use linear_width >= num_classes, or last_layer='row_normalized'."
            )
        super().__post_init__()

    def setup(self):
        self.convs = [
            ConvCPL(self.conv_inner, self.kernel_size, 1, self.padding, self.power_iters)
            for _ in range(self.depth)
        ]
        self.denses = [
            DenseCPL(self.linear_width, self.power_iters) for _ in range(self.depth_linear)
        ]
        if self.last_layer == "row_normalized":
            self.last = RowNormalizedDense(self.num_classes)

    def features(self, x, n_power_iters: int | None = None, sigma="iterate"):
        """The 1-Lipschitz feature map (everything before the last layer)."""
        _check_sigma_mode(sigma)
        if x.ndim != 4:
            raise ValueError(f"CPLNet input must be NHWC (rank 4), got {x.shape}.")
        if x.shape[-1] > self.conv_channels:
            raise ValueError(
                f"input has {x.shape[-1]} channels > conv_channels="
                f"{self.conv_channels}; increase conv_channels."
            )
        x = _pad_last(x, self.conv_channels)
        for layer in self.convs:
            x = layer(x, n_power_iters, sigma)
        x = sum_pool_lipschitz(x, self.pool)
        x = _pad_last(x.reshape(x.shape[0], -1), self.linear_width)
        for layer in self.denses:
            x = layer(x, n_power_iters, sigma)
        return x

    def __call__(self, x, n_power_iters: int | None = None, sigma="iterate"):
        h = self.features(x, n_power_iters, sigma)
        if self.last_layer == "truncate":
            return h[:, : self.num_classes]
        return self.last(h)


def prepare_sigmas(
    module: nn.Module,
    variables,
    x,
    *,
    power: bool = True,
    power_rtol: float = 1e-7,
    max_power_iters: int = 5000,
    gram_iters: int = GRAM_ITERS,
) -> dict:
    """``variables`` plus a ``"sigma"`` collection with every CPL's stored σ.

    Runs ``module`` (a :class:`CPLNet`, or any module that passes ``sigma=`` on to
    its CPLs) once on ``x[:1]`` — only the input *shape* matters: each layer's norm
    is that of its operator at its input size. Per layer it stores ``"upper"`` (Gram
    upper bound, :mod:`deqjax.cpl.bounds`) and, if ``power``, ``"power"``: power
    iteration from the stored vector until σ rises by less than ``power_rtol`` in a
    step (at most ``max_power_iters``; ``"power_steps"`` says how many ran). Then call
    the network with ``sigma="upper"`` (1-Lipschitz by construction) or
    ``sigma="power"`` (the conventional network). Runs eagerly (float64 on the host);
    the result is valid for these parameters only — prepare again after changing them.
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError("prepare_sigmas runs eagerly: call it outside jax.jit / vmap / grad.")
    prep = Preparation(power, power_rtol, max_power_iters, gram_iters)
    _, upd = module.apply(variables, jnp.asarray(x)[:1], sigma=prep, mutable=[SIGMA_COLLECTION])
    return {**variables, SIGMA_COLLECTION: upd[SIGMA_COLLECTION]}
