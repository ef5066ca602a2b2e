"""A thin Flax monDEQ classifier: injection ``U x + b`` → DEQ(splitting cell) → head.

The equilibrium layer is deqjax's :class:`~deqjax.models.DEQ` around a cell that is
one forward–backward or Peaceman–Rachford step (:mod:`deqjax.mondeq.splitting`), so
the model has the calling convention of deqjax's DEQ classifiers (``config=``,
``view=`` attack views, ``backward_probe=``, warm starts, solver statistics). The head
reads ``ReLU(state)`` (the PR state's equilibrium; the identity on an FB state).
:meth:`MonDEQClassifier.mondeq_params` gives the :class:`MonDEQParams` of the pure
functions (:func:`deqjax.mondeq.lipschitz_bound`, :func:`deqjax.mondeq.certify`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.deq import DEQConfig
from deqjax.deq_gradients import AttackView
from deqjax.models.deq_layer import DEQ
from deqjax.models.mdeq import DEQClassifierMethods, check_images
from deqjax.mondeq.certify import logit_scale
from deqjax.mondeq.operators import KINDS, MonDEQParams, check_m, features, inject, resolvent
from deqjax.mondeq.splitting import DEFAULT_CONFIG, SPLITTINGS, fb_step, pr_step


def _uniform(fan: int):
    bound = 1.0 / math.sqrt(fan)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def _check_fields(kind, m, splitting, alpha):
    check_m(m)
    if kind not in KINDS:
        raise ValueError(f"unknown monDEQ kind {kind!r}; choose one of {KINDS}.")
    if splitting not in SPLITTINGS:
        raise ValueError(f"unknown splitting {splitting!r}; choose one of {SPLITTINGS}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the step alpha must be finite and > 0, got {alpha!r}.")


class MonotoneCell(nn.Module):
    """One splitting step ``state ← step(state, u)`` on a batch (params ``A``, ``B``)."""

    kind: str = "fc"
    width: int = 100
    m: float = 0.1
    splitting: str = "pr"
    alpha: float = 1.0
    kernel_size: int = 3

    def operator(self, A, B, state_shape) -> MonDEQParams:
        hw = (1, 1) if self.kind == "fc" else tuple(state_shape[:2])
        return MonDEQParams(None, None, A, B, None, None, self.m, self.kind, hw + (1,))

    @nn.compact
    def __call__(self, z, u):
        _check_fields(self.kind, self.m, self.splitting, self.alpha)
        d, k = self.width, self.kernel_size
        shape = (d, d) if self.kind == "fc" else (k, k, d, d)
        fan = d if self.kind == "fc" else k * k * d
        A = self.param("A", _uniform(fan), shape)
        B = self.param("B", _uniform(fan), shape)
        p = self.operator(A, B, z.shape[1:])
        if self.splitting == "fb":
            return jax.vmap(lambda z_i, u_i: fb_step(p, self.alpha, z_i, u_i))(z, u)
        inv = resolvent(p, self.alpha)
        return jax.vmap(lambda s_i, u_i: pr_step(p, self.alpha, inv, s_i, u_i))(z, u)


class MonInjection(nn.Module):
    """``U x + b`` (fc: on the flattened image; conv: ``k×k`` conv, stride, SAME)."""

    kind: str = "fc"
    width: int = 100
    kernel_size: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        c_in, k = x.shape[-1], self.kernel_size
        if self.kind == "fc":
            fan, shape = math.prod(x.shape[1:]), (math.prod(x.shape[1:]), self.width)
        else:
            fan, shape = k * k * c_in, (k, k, c_in, self.width)
        U = self.param("U", _uniform(fan), shape)
        b = self.param("b", _uniform(fan), (self.width,))
        p = MonDEQParams(U, b, None, None, None, None, 1.0, self.kind, x.shape[1:], self.stride)
        return jax.vmap(lambda x_i: inject(p, x_i))(x)


class MonDEQClassifier(DEQClassifierMethods, nn.Module):
    """monDEQ classifier (Winston & Kolter 2020), fully connected or convolutional.

    Returns ``(logits, stats)``. ``normalize``: divide the logits by the traced
    ``σ₁(head)·σ₁(U)/m`` (:func:`deqjax.mondeq.logit_scale`; Lipschitz-margin
    training with the hinge loss). ``deq``: the solver (default: the plain splitting,
    tol 1e-4) and the backward (implicit)."""

    num_classes: int = 10
    kind: str = "fc"
    width: int = 100
    m: float = 0.1
    splitting: str = "pr"
    alpha: float = 1.0
    kernel_size: int = 3
    stride: int = 1
    pool: int = 1
    normalize: bool = False
    deq: DEQConfig = DEFAULT_CONFIG

    def setup(self):
        _check_fields(self.kind, self.m, self.splitting, self.alpha)
        self.injection = MonInjection(self.kind, self.width, self.kernel_size, self.stride)
        cell = MonotoneCell(
            self.kind, self.width, self.m, self.splitting, self.alpha, self.kernel_size
        )
        self.equilibrium = DEQ(cell, self.deq)
        self.head = MonHead(self.num_classes, self.kind, self.pool)

    def mondeq_params(self, params, input_shape) -> MonDEQParams:
        """The :class:`MonDEQParams` of this model's ``params`` (inputs of one example
        shaped ``input_shape``)."""
        return MonDEQParams(
            params["injection"]["U"],
            params["injection"]["b"],
            params["equilibrium"]["cell"]["A"],
            params["equilibrium"]["cell"]["B"],
            params["head"]["W_out"],
            params["head"]["b_out"],
            self.m,
            self.kind,
            tuple(int(s) for s in input_shape),
            self.stride,
            self.pool,
            self.normalize,
        )

    def __call__(
        self,
        x,
        *,
        backward_probe=None,
        return_trajectory: bool = False,
        config: DEQConfig | None = None,
        jacobian_key=None,
        view: AttackView | None = None,
        random_steps=None,
    ):
        check_images(x)
        u = self.injection(x)
        z, stats = self.equilibrium(
            u,
            backward_probe=backward_probe,
            return_trajectory=return_trajectory,
            config=config,
            jacobian_key=jacobian_key,
            view=view,
            random_steps=random_steps,
        )
        return self.classify(z), stats

    def inject(self, x):
        return self.injection(x)

    def classify(self, z):
        logits = self.head(jax.nn.relu(z))
        if not self.normalize:
            return logits
        U = self.injection.variables["params"]["U"]
        W_out = self.head.variables["params"]["W_out"]
        # (conv: logit_scale reads the input size off the state's, as lipschitz_bound does)
        in_shape = (
            (1, 1, 1)
            if self.kind == "fc"
            else (z.shape[1] * self.stride, z.shape[2] * self.stride, U.shape[2])
        )
        p = MonDEQParams(
            U, None, None, None, W_out, None, self.m, self.kind, in_shape, self.stride, self.pool
        )
        return logits / logit_scale(p)

    def warm_forward(self, x, z0, *, config: DEQConfig | None = None, view=None, adjoint_init=None):
        check_images(x)
        self.equilibrium.check_warm_start(config, view)
        z, stats = self.equilibrium(
            self.injection(x), z0=z0, config=config, view=view, adjoint_init=adjoint_init
        )
        return self.classify(z), jax.lax.stop_gradient(z), stats


class MonHead(nn.Module):
    """``features(z)·W_out + b_out`` (conv: ``pool × pool`` average, flattened)."""

    num_classes: int = 10
    kind: str = "fc"
    pool: int = 1

    @nn.compact
    def __call__(self, z):
        p = MonDEQParams(None, None, None, None, None, None, 1.0, self.kind, pool=self.pool)
        feats = jax.vmap(lambda z_i: features(p, z_i))(z)
        n = feats.shape[-1]
        W_out = self.param("W_out", _uniform(n), (n, self.num_classes))
        b_out = self.param("b_out", _uniform(n), (self.num_classes,))
        return feats @ W_out + b_out
