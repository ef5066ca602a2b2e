"""The reference image DEQ (a small single-scale "MDEQ") and its explicit twin.

Cell (the benchmark cell of deqjax; the robustness papers' residual MDEQ cell without weight
norm and dropout):

    f(z, u) = GN(ReLU(z + GN(conv_b(ReLU(GN(conv_a(z))))) + u))

with 3×3 convolutions ``conv_a: width → inner`` and ``conv_b: inner → width`` and
GroupNorm (``groups`` groups). Input injection ``u = conv3×3/stride 2(x)``; head
``GN → global average pool → dense``. Bai, Koltun & Kolter 2020, "Multiscale Deep
Equilibrium Models".

Mixed precision: ``dtype`` (``None`` by default: the input's dtype, i.e. float32 for
float32 images) is the dtype the injection, the cell and the head's normalisation
compute their activations in (``jnp.bfloat16``/``jnp.float16``); parameters stay
float32, the solver iterates the state in float32 (:func:`deqjax.deq.deq_fixed_point`)
and the head's dense layer computes the logits in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.attacks._common import WarmStartLogits
from deqjax.deq import DEQConfig
from deqjax.deq_gradients import AttackView
from deqjax.models.deq_layer import DEQ, attack_gradient
from deqjax.models.layers import FastConv
from deqjax.regulation import RandomSteps


class MDEQCell(nn.Module):
    width: int = 32
    inner: int = 64
    groups: int = 8
    dtype: Any = None  # activations' dtype (None: the inputs'); parameters stay float32

    @nn.compact
    def __call__(self, z, u):
        conv = lambda n, name: FastConv(n, name=name, dtype=self.dtype)
        gn = lambda name: nn.GroupNorm(self.groups, name=name, dtype=self.dtype)
        h = nn.relu(gn("gn_a")(conv(self.inner, "conv_a")(z)))
        h = gn("gn_b")(conv(self.width, "conv_b")(h))
        return gn("gn_out")(nn.relu(z + h + u))


class Injection(nn.Module):
    width: int = 32
    dtype: Any = None  # the output's (the DEQ state's) dtype; None: the input's

    @nn.compact
    def __call__(self, x):
        # nn.Conv's params, fast input-VJP
        return FastConv(self.width, 3, strides=2, name="conv", dtype=self.dtype)(x)


HEADS = ("gap", "pool_flatten")


def pool_features(z, kind: str):
    """Features of a normalised state ``(B, H, W, C)``: global average (``"gap"``) or
    2×2 average pooling then flatten (``"pool_flatten"``)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")
    if kind == "gap":
        return jnp.mean(z, axis=(-3, -2))
    return nn.avg_pool(z, (2, 2), (2, 2), padding="SAME").reshape(z.shape[0], -1)


class Head(nn.Module):
    """``GN → global average pool → dense`` (``"gap"``, the benchmark head) or
    ``GN → 2×2 average pool → flatten → dense`` (``"pool_flatten"``, which keeps
    spatial layout and trains much faster on MNIST-sized inputs). With ``dtype`` the
    normalisation and pooling compute in it and the dense layer in float32: the
    logits are float32."""

    num_classes: int = 10
    groups: int = 8
    kind: str = "gap"
    dtype: Any = None

    @nn.compact
    def __call__(self, z):
        feats = pool_features(nn.GroupNorm(self.groups, name="gn", dtype=self.dtype)(z), self.kind)
        logits_dtype = None if self.dtype is None else jnp.float32
        return nn.Dense(self.num_classes, name="dense", dtype=logits_dtype)(feats)


def check_images(x, channels: int | None = None):
    """Trace-time shape/dtype checks on an image batch ``(B, H, W, C)``."""
    if x.ndim != 4:
        raise ValueError(
            f"expected images of shape (batch, height, width, channels), got {x.shape}; "
            "add a batch axis with x[None] for one image"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"expected float images in [0, 1], got dtype {x.dtype}; divide uint8 images by 255"
        )
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"expected {channels} channel(s), got {x.shape[-1]}")


class DEQClassifierMethods:
    """The calling convention of deqjax's DEQ classifiers, shared by every model whose
    ``setup`` defines ``injection``, ``equilibrium`` (a :class:`DEQ`) and ``head``."""

    def __call__(
        self,
        x,
        *,
        backward_probe=None,
        return_trajectory: bool = False,
        config: DEQConfig | None = None,
        jacobian_key=None,
        view: AttackView | None = None,
        random_steps: RandomSteps | None = None,
        z0=None,
        reset_stale: bool = False,
    ):
        """Returns ``(logits, stats)``; the keyword arguments are those of
        :class:`~deqjax.models.DEQ` (``view``: the gradient path an attack follows;
        ``random_steps``: random intermediate states in training; ``z0``: the solves'
        start, injection-shaped, default zeros; ``reset_stale``: start from zero where
        ``z0`` is worse than zero)."""
        check_images(x)
        z, stats = self.equilibrium(
            self.injection(x),
            z0=z0,
            reset_stale=reset_stale,
            backward_probe=backward_probe,
            return_trajectory=return_trajectory,
            config=config,
            jacobian_key=jacobian_key,
            view=view,
            random_steps=random_steps,
        )
        return self.head(z), stats

    def inject(self, x):
        return self.injection(x)

    def classify(self, z):
        return self.head(z)

    def solve_from(self, u, z0, config: DEQConfig | None = None):
        """The equilibrium state for injection ``u`` started at ``z0`` (``(z, stats)``)."""
        return self.equilibrium(u, z0=z0, config=config)

    def phantom_from(self, u, z, steps: int = 5, damping: float = 0.5):
        return self.equilibrium.damped(u, z, steps, damping)

    def warm_forward(
        self,
        x,
        z0,
        *,
        config: DEQConfig | None = None,
        view: AttackView | None = None,
        adjoint_init=None,
    ):
        """``(logits, z, stats)`` with the solve started at ``z0`` (injection-shaped)
        instead of zeros; ``z`` (no gradient) is the state to start the next solve from.
        ``adjoint_init``: candidate starts of the implicit gradient's adjoint solves
        (:class:`~deqjax.models.deq_layer.DEQ`). Raises unless a warm start keeps the
        output and gradient those of ``z*``
        (:func:`~deqjax.models.deq_layer.check_warm_start`)."""
        check_images(x)
        self.equilibrium.check_warm_start(config, view)
        z, stats = self.equilibrium(
            self.injection(x), z0=z0, config=config, view=view, adjoint_init=adjoint_init
        )
        return self.head(z), jax.lax.stop_gradient(z), stats

    def cold_state(self, x):
        """The zero state the solve starts from (the injection's shape; no FLOPs)."""
        u = jax.eval_shape(self.injection, x)
        return jnp.zeros(u.shape, u.dtype)


class MDEQClassifier(DEQClassifierMethods, nn.Module):
    """Injection → DEQ(MDEQCell) → head. Returns ``(logits, stats)``. ``dtype``
    (e.g. ``jnp.bfloat16``): the activations' and the DEQ state's dtype (module
    docstring, "Mixed precision")."""

    num_classes: int = 10
    width: int = 32
    inner: int = 64
    groups: int = 8
    head_kind: str = "gap"
    deq: DEQConfig = DEQConfig()
    dtype: Any = None

    def setup(self):
        self.injection = Injection(self.width, dtype=self.dtype)
        self.equilibrium = DEQ(
            MDEQCell(self.width, self.inner, self.groups, dtype=self.dtype), self.deq
        )
        self.head = Head(self.num_classes, self.groups, self.head_kind, dtype=self.dtype)


class ExplicitMDEQ(nn.Module):
    """The same cell, weight-tied and unrolled ``depth`` times from z = 0: an explicit
    network of the same size (the DEQ's baseline). Returns ``(logits, None)``."""

    num_classes: int = 10
    width: int = 32
    inner: int = 64
    groups: int = 8
    head_kind: str = "gap"
    depth: int = 6
    dtype: Any = None  # as MDEQClassifier's

    @nn.compact
    def __call__(self, x, **unused):
        check_images(x)
        u = Injection(self.width, name="injection", dtype=self.dtype)(x)
        cell = MDEQCell(self.width, self.inner, self.groups, name="cell", dtype=self.dtype)
        z = jnp.zeros_like(u)
        for _ in range(self.depth):
            z = cell(z, u)
        head = Head(self.num_classes, self.groups, self.head_kind, name="head", dtype=self.dtype)
        return head(z), None


def warm_start_logits(
    module: nn.Module,
    variables,
    *,
    config: DEQConfig | None = None,
    view: AttackView | None = None,
    on_steps=None,
    warm_adjoint: bool = False,
) -> WarmStartLogits:
    """The warm-startable view of a DEQ classifier (any model with
    :class:`DEQClassifierMethods`): a :class:`~deqjax.attacks.WarmStartLogits` whose
    state is the equilibrium ``z*``.

    Called as a function it is the model's cold forward ``module.apply(variables, x,
    config=config, view=view)[0]`` (solve from zeros). PGD, APGD and APGD-T start each
    iterate's solve from the previous iterate's ``z*``; with a tolerance-stopped solver
    a solve then takes the few steps that move ``z*`` by one attack step. The gradient
    is ``view``'s (or ``config.backward``'s) at the warm-started solution: implicit (the
    IFT gradient depends only on ``z*``) or phantom (damped steps from ``z*``) — other
    gradients and defences are refused (:func:`~deqjax.models.deq_layer.check_warm_start`).
    ``on_steps(steps)``, if given, receives every solve's per-example forward step
    counts (``jax.debug.callback``; for measuring).

    ``warm_adjoint`` (implicit gradient only; otherwise ignored): the state is
    ``(z*, u)`` and each gradient's adjoint solve ``u = ∂L/∂z* + Jᵀu`` also starts
    from the previous iterate's adjoint ``u`` where that is the better start
    (:func:`deqjax.deq.deq_fixed_point`'s ``adjoint_init``; attacks that take the
    gradient of one loss thread it through the state's gradient). Off by default: on
    the shipped TRADES DEQ (Anderson adjoint, ≤ 12 steps, tol 1e-3) PGD-20 ran slower
    with it (``python -m benchmarks.warm_start``): consecutive iterates' cotangents
    differ too much for the previous adjoint to repay the two VJPs that pick the start."""
    refusal = warm_start_refusal(module, variables, config=config, view=view)
    if refusal is not None:
        raise ValueError(refusal)
    cfg = config if config is not None else module.deq
    warm_adjoint = warm_adjoint and attack_gradient(cfg, view) == "implicit"

    def forward(x, z0, adjoint_init=None):
        logits, z, stats = module.apply(
            variables,
            x,
            z0,
            config=config,
            view=view,
            adjoint_init=adjoint_init,
            method="warm_forward",
        )
        if on_steps is not None:
            jax.debug.callback(on_steps, stats.steps)
        return logits, z

    tol = float(cfg.forward.tol)
    cold_state = lambda x: module.apply(variables, x, method="cold_state")
    if not warm_adjoint:
        return WarmStartLogits(cold_state, forward, tol)

    def init(x):
        z0 = cold_state(x)
        return z0, jnp.zeros_like(z0)

    def apply(x, state):
        z0, adjoint = state
        logits, z = forward(x, z0, adjoint)
        return logits, (z, adjoint)

    # the adjoint-start's gradient is the solved adjoint: the next state's adjoint
    merge = lambda new_state, state_grad: (new_state[0], state_grad[1])
    return WarmStartLogits(init, apply, tol, merge_gradient=merge)


def warm_start_refusal(
    module: nn.Module, variables, *, config: DEQConfig | None = None, view: AttackView | None = None
) -> str | None:
    """Why :func:`warm_start_logits` would refuse this model, config and view (``None``
    when it accepts them: :func:`~deqjax.models.deq_layer.warm_start_refusal`). A model
    without a ``warm_forward`` method is refused too."""
    if not hasattr(module, "warm_forward"):
        return f"{type(module).__name__} has no warm_forward method (it is not a DEQ classifier)"
    return module.apply(variables, config, view, method=_warm_start_refusal)


def _warm_start_refusal(module, config, view):
    return module.equilibrium.warm_start_refusal(config, view)
