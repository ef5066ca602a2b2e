"""LyaDEQ: a Lyapunov-stable DEQ image classifier (Flax wrappers).

Chu, Wei, Liu, Zhao & Miyatake 2024, "Lyapunov-Stable Deep Equilibrium Models"
(AAAI; SPEC §2), with the stable projection of Manek & Kolter 2019. Given a base
cell ``f(z, u)`` (here :class:`~deqjax.models.mdeq.MDEQCell`, the same cell and
injection as the plain DEQ so the comparison is fair), the residual dynamics
``F(z; u) = f(z, u) − z`` are projected with a learned Lyapunov function ``V``
(:mod:`deqjax.lyapunov`) and the LyaDEQ equilibrium is the root of ``F̂(·; u)``, i.e.
a fixed point of

    z ↦ z + F̂(z; u) = f(z, u) − ∇V(z) · ReLU(∇V(z)ᵀ F(z; u) + α V(z)) / ‖∇V(z)‖²,

found and differentiated by the unchanged :class:`~deqjax.models.DEQ` layer (the
ICNN's parameters are Flax params of the cell, so the implicit gradient reaches them).
The classifier adds an orthogonal fully connected layer (:mod:`deqjax.orthogonal`)
between the pooled equilibrium and the final dense layer.

Two regimes (maths, see :mod:`deqjax.lyapunov`):

* α = 0 (default): the roots of ``F̂`` are the base cell's fixed points, now Lyapunov
  stable. The projection changes the solver's path, not the equilibrium, so the
  implicit backward differentiates the base cell at ``z*`` (``LyapunovCell.implicit_map``;
  ``F̂`` itself is not differentiable at its roots). The ICNN then gets no implicit
  gradient — correctly: V does not move the equilibrium — and is trained only through
  phantom/unrolled gradients.
* α > 0: ``∇Vᵀ F̂ ≤ −αV < 0`` away from 0, so ``F̂`` has no root except possibly 0 and
  the model's output is the state the solver reaches within its budget (what the
  authors' finite-step solver returns: the states "crowd" towards the origin). It has
  no implicit gradient: train and attack it with ``phantom``/``unroll``/intermediate
  gradients (the DEQ layer raises if ``implicit`` is asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.deq import DEQConfig
from deqjax.lyapunov import icnn_init, lyapunov_value, project_dynamics, stability_check
from deqjax.models.deq_layer import DEQ
from deqjax.models.mdeq import (
    DEQClassifierMethods,
    Injection,
    MDEQCell,
    check_images,
    pool_features,
)
from deqjax.orthogonal import OrthogonalDense
from deqjax.solvers import SolverConfig, solve


class LyapunovCell(nn.Module):
    """Batched cell ``(z, u) ↦ z + F̂(z; u)`` around ``base_cell`` (any batched
    ``cell(z, u)``). The ICNN acts on each example's flattened state; ``V`` and ``∇V``
    are vmapped over the batch. Parameters: ``base_cell`` and ``icnn``."""

    base_cell: nn.Module
    icnn_widths: Sequence[int] = (64,)
    alpha: float = 0.0
    eta: float = 0.01
    d: float = 1.0
    activation: str = "softplus"

    @nn.compact
    def __call__(self, z, u):
        if z.ndim < 2:
            raise ValueError(f"LyapunovCell takes a batch of states (B, ...), got shape {z.shape}")
        dim = int(z[0].size)
        icnn = self.param("icnn", lambda key: icnn_init(key, dim, self.icnn_widths))
        icnn = jax.tree.map(lambda p: p.astype(z.dtype), icnn)
        f_z = self.base_cell(z, u)
        if f_z.shape != z.shape:
            raise ValueError(
                f"the base cell must map the state shape {z.shape} to itself, got {f_z.shape}"
            )

        def one(z_i, fz_i):
            v, grad_v = jax.value_and_grad(
                lambda s: lyapunov_value(icnn, s, self.eta, self.d, self.activation)
            )(z_i)
            return z_i + project_dynamics(fz_i - z_i, grad_v, v, self.alpha)

        return jax.vmap(one)(z, f_z)

    @property
    def has_equilibrium(self) -> bool:
        """α = 0: the roots of ``F̂`` are those of ``F`` (the base cell's fixed points).
        α > 0: ``F̂`` has no root except possibly ``z = 0`` (see the module docstring)."""
        return float(self.alpha) == 0.0

    def implicit_map(self, z, u):
        """The base cell: at α = 0 the LyaDEQ equilibrium is a fixed point of it, and
        its Jacobian there is the one the implicit function theorem needs. (``F̂``'s own
        Jacobian is one-sided at a root — the ReLU sits exactly at its kink — and the
        side where the projection is active is rank-deficient.)"""
        return self.base_cell(z, u)


class LyaHead(nn.Module):
    """``GN → pool (gap | 2×2 avg + flatten) → [OrthogonalDense(orth_features)] → dense``.
    With ``orthogonal=False`` it is :class:`~deqjax.models.mdeq.Head`'s computation."""

    num_classes: int = 10
    groups: int = 8
    kind: str = "pool_flatten"
    orthogonal: bool = True
    orthogonal_kind: str = "householder"
    orth_features: int = 128

    @nn.compact
    def __call__(self, z):
        feats = pool_features(nn.GroupNorm(self.groups, name="gn")(z), self.kind)
        if self.orthogonal:
            feats = OrthogonalDense(
                self.orth_features or feats.shape[-1], self.orthogonal_kind, name="orthogonal"
            )(feats)
        return nn.Dense(self.num_classes, name="dense")(feats)


class LyaDEQClassifier(DEQClassifierMethods, nn.Module):
    """Injection → DEQ(LyapunovCell(MDEQCell)) → LyaHead. Returns ``(logits, stats)``;
    same call signature as :class:`~deqjax.models.mdeq.MDEQClassifier` (attack views
    and defences pass through to the DEQ layer). ``orth_features=0`` keeps the pooled
    feature size (square orthogonal layer)."""

    num_classes: int = 10
    width: int = 32
    inner: int = 64
    groups: int = 8
    head_kind: str = "pool_flatten"
    icnn_widths: Sequence[int] = (64,)
    alpha: float = 0.0
    eta: float = 0.01
    d: float = 1.0
    orthogonal: bool = True
    orthogonal_kind: str = "householder"
    orth_features: int = 128
    deq: DEQConfig = DEQConfig()

    def setup(self):
        self.injection = Injection(self.width)
        cell = LyapunovCell(
            MDEQCell(self.width, self.inner, self.groups),
            tuple(self.icnn_widths),
            self.alpha,
            self.eta,
            self.d,
        )
        self.equilibrium = DEQ(cell, self.deq)
        self.head = LyaHead(
            self.num_classes,
            self.groups,
            self.head_kind,
            self.orthogonal,
            self.orthogonal_kind,
            self.orth_features,
        )


def lyadeq_stability_check(
    model: nn.Module,
    variables,
    x,
    key,
    n_perturb: int = 16,
    scale: float = 0.1,
    config: SolverConfig | None = None,
):
    """:func:`deqjax.lyapunov.stability_check` for every image of the batch ``x``
    on a :class:`LyaDEQClassifier` (or any model with ``inject`` and an ``equilibrium``
    DEQ). Each ``z*`` is solved from zeros with ``config`` (default: the model's
    forward solver), then re-solved from ``n_perturb`` perturbed starts. Returns
    ``(z_star, report)`` with a leading batch axis on every field."""
    check_images(x)
    config = config or model.deq.forward
    bound = model.bind(variables)
    u = bound.inject(x)
    f = bound.equilibrium.cell_function()
    params = variables["params"]["equilibrium"]["cell"]
    keys = jax.random.split(key, x.shape[0])

    def one(u_i, k):
        args = (params, u_i)
        z_star, _ = solve(lambda z: f(z, args), jnp.zeros_like(u_i), config)
        return z_star, stability_check(f, z_star, args, k, n_perturb, scale, config)

    return jax.vmap(one)(u, keys)
