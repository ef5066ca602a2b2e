"""LyaDEQ: a Lyapunov-stable DEQ image classifier (Flax wrappers).

Chu, Wei, Liu, Zhao & Miyatake 2024, "Lyapunov-Stable Deep Equilibrium Models"
(AAAI; docs/methods/lyadeq.md), with the stable projection of Manek & Kolter 2019. Given a base
cell ``f(z, u)`` (here :class:`~deqjax.models.mdeq.MDEQCell`, the same cell and
injection as the plain DEQ so the comparison is fair), the residual dynamics
``F(z; u) = f(z, u) − z`` are projected with a learned Lyapunov function ``V``
(:mod:`deqjax.lyapunov`): ``F̂ = F − ∇V · ReLU(∇Vᵀ F + α V) / ‖∇V‖²``.

**A LyaDEQ is a finite-time system** (docs/methods/lyadeq.md): ``z₀ = 0``,
``z_{k+1} = z_k + h · F̂(z_k; u)`` for ``k = 0 … K − 1``, output ``z_K``, then an
orthogonal fully connected layer (:mod:`deqjax.orthogonal`) and the classifier. K
(``steps``) and h (``step_size``) are hyperparameters of the model, the same in
training and at test time. It runs on the unchanged :class:`~deqjax.models.DEQ` layer
as K damped fixed-point steps ``z ← (1 − h) z + h (z + F̂(z))`` with no tolerance
(:func:`finite_time_config`), so every attack view of the DEQ layer applies; its
states ``z_1 … z_K`` are the solver trajectory. Gradients:

* ``"unroll"`` (default): backpropagation through the K steps, the exact gradient;
* ``"phantom"``: backpropagation through the last ``phantom_steps`` (p) steps only,
  from ``stop_gradient(z_{K−p})`` — the value is still ``z_K`` (implemented with the
  DEQ layer's intermediate-state estimator at ``z_{K−p}`` with p steps of size h);
* ``"implicit"``: refused — there is no equilibrium to differentiate. (The earlier
  root formulation was not well posed: for α > 0 ``F̂`` has no root, for α = 0 a solve
  from ``z₀ = 0`` stalls on spurious roots, and at a base root the projection is
  inactive so the implicit gradient never reaches ``V``; see docs/methods/lyadeq.md.)

Solver statistics of a LyaDEQ: ``steps`` = K, the residual ``‖h F̂(z_{K−1})‖`` is
information only, and ``converged`` means "the K steps gave a finite output" (there is
no tolerance to reach: the output is ``z_K`` by definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.deq import DEQConfig
from deqjax.deq_gradients import AttackView
from deqjax.lyapunov import (
    StabilityReport,
    icnn_apply,
    icnn_init,
    lyapunov_along,
    lyapunov_value,
    project_dynamics,
    stability_check,
)
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

LYADEQ_BACKWARDS = ("unroll", "phantom")


def finite_time_config(
    steps: int, step_size: float = 1.0, backward: str = "unroll", phantom_steps: int = 3
) -> DEQConfig:
    """The DEQ-layer settings that compute the finite-time LyaDEQ: K = ``steps``
    damped fixed-point steps of damping h = ``step_size`` on the cell ``z + F̂(z)``
    (i.e. ``z ← z + h F̂(z)``), tolerance 0 (exactly K steps, no early stop), returning
    the last state ``z_K``. ``backward`` is passed on (``"implicit"`` is refused by the
    layer); ``phantom_steps`` is p of the ``"phantom"`` backward (1 ≤ p < K)."""
    if int(steps) < 1:
        raise ValueError(f"a LyaDEQ needs steps K >= 1, got {steps}")
    if not 0 < step_size <= 1:
        raise ValueError(
            f"the LyaDEQ step size h must be in (0, 1] (an Euler step z + h·F̂(z)), got {step_size}"
        )
    if backward == "phantom" and not 1 <= int(phantom_steps) < int(steps):
        raise ValueError(
            f"the phantom backward differentiates the last p of the K = {steps} steps: "
            f"need 1 <= phantom_steps < K, got {phantom_steps} (backward='unroll' is all K)"
        )
    forward = SolverConfig(
        "fixed_point",
        max_iter=int(steps),
        tol=0.0,
        stop_mode="abs",
        damping=float(step_size),
        return_state="last",
    )
    return DEQConfig(
        forward=forward,
        backward=backward,
        phantom_steps=int(phantom_steps),
        phantom_damping=float(step_size),
    )


class LyapunovCell(nn.Module):
    """Batched cell ``(z, u) ↦ z + F̂(z; u)`` around ``base_cell`` (any batched
    ``cell(z, u)``). The ICNN acts on each example's flattened state; ``V`` and ``∇V``
    are vmapped over the batch. Parameters: ``base_cell`` and ``icnn``.

    ``has_equilibrium = False``: iterated K times it defines a finite-time system, and
    the DEQ layer refuses its implicit gradient."""

    base_cell: nn.Module
    icnn_widths: Sequence[int] = (64,)
    alpha: float = 0.0
    eta: float = 0.01
    d: float = 1.0
    activation: str = "softplus"
    has_equilibrium = False

    @nn.compact
    def __call__(self, z, u, correction: bool = False):
        """``z + F̂(z; u)``; with ``correction=True`` instead the relative size of the
        projection's correction ``‖F − F̂‖ / ‖F‖`` per example (0: inactive)."""
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
            F = fz_i - z_i
            F_hat = project_dynamics(F, grad_v, v, self.alpha)
            if correction:
                return jnp.linalg.norm(F - F_hat) / (jnp.linalg.norm(F) + 1e-12)
            return z_i + F_hat

        return jax.vmap(one)(z, f_z)


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
    """Injection → K steps of ``z ← z + h F̂(z)`` from 0 (the DEQ layer on
    :class:`LyapunovCell` (:class:`~deqjax.models.mdeq.MDEQCell`), see the module
    docstring) → LyaHead. Returns ``(logits, stats)`` with the calling convention of
    :class:`~deqjax.models.mdeq.MDEQClassifier` (attack views pass through to the DEQ
    layer). ``orth_features=0`` keeps the pooled feature size (square orthogonal layer).

    ``steps`` (K), ``step_size`` (h), ``backward`` (``"unroll"`` | ``"phantom"``) and
    ``phantom_steps`` (p) define :attr:`deq`. A ``config`` passed at call time may change
    the backward (and p), never the forward: its solver must be the model's K steps
    (``fixed_point``, ``max_iter`` K, ``tol`` 0, ``damping`` h), or it is an error."""

    num_classes: int = 10
    width: int = 32
    inner: int = 64
    groups: int = 8
    head_kind: str = "pool_flatten"
    icnn_widths: Sequence[int] = (64,)
    alpha: float = 0.1
    eta: float = 0.01
    d: float = 1.0
    orthogonal: bool = True
    orthogonal_kind: str = "householder"
    orth_features: int = 128
    steps: int = 10
    step_size: float = 1.0
    backward: str = "unroll"
    phantom_steps: int = 3

    @property
    def deq(self) -> DEQConfig:
        """The finite-time model as DEQ-layer settings (:func:`finite_time_config`)."""
        return finite_time_config(self.steps, self.step_size, self.backward, self.phantom_steps)

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

    def finite_time(self, config: DEQConfig | None) -> DEQConfig:
        """:attr:`deq` with the backward settings of ``config`` (checked: its forward
        must be the model's K steps of size h)."""
        if config is None:
            return self.deq
        fw, own = config.forward, self.deq.forward
        got = (fw.method, int(fw.max_iter), float(fw.tol), float(fw.damping))
        want = (own.method, own.max_iter, 0.0, own.damping)
        if got != want:
            raise ValueError(
                f"a LyaDEQ is the finite-time system of K = {self.steps} steps of size "
                f"h = {self.step_size}: a call-time config may change its "
                f"backward, not its forward; got (method, max_iter, tol, damping) = {got}, "
                f"need {want}"
            )
        return finite_time_config(self.steps, self.step_size, config.backward, config.phantom_steps)

    def __call__(self, x, *, config: DEQConfig | None = None, **kw):
        cfg = self.finite_time(config)
        if cfg.backward == "phantom" and kw.get("view") is None and kw.get("random_steps") is None:
            # the gradient of the last p steps, value z_K: from z_{K−p} = trajectory[K−p−1]
            p = cfg.phantom_steps
            kw["view"] = AttackView(
                "intermediate",
                state_index=self.steps - p - 1,
                steps=p,
                damping=self.step_size,
            )
        logits, stats = DEQClassifierMethods.__call__(self, x, config=cfg, **kw)
        finite = (stats.steps == self.steps) & jnp.all(jnp.isfinite(logits), axis=-1)
        return logits, stats._replace(converged=finite)

    def solve_from(self, u, z0, config: DEQConfig | None = None):
        """The K-step state for injection ``u`` started at ``z0`` (``(z_K, stats)``)."""
        return self.equilibrium(u, z0=z0, config=self.finite_time(config))


class LyaDEQStability(NamedTuple):
    """Discrete stability of a LyaDEQ on a batch (leading axis B on every field).

    v_values: ``V(z_k)``, ``k = 0 … K``, along the model's own trajectory from z₀ = 0
    ``(B, K + 1)``; v_increases: ``V(z_{k+1}) > V(z_k)`` ``(B, K)`` (the first step is an
    increase by construction, ``V(0) = 0``); corrections: the projection's relative
    correction ``‖F − F̂‖ / ‖F‖`` at ``z_0 … z_{K−1}`` ``(B, K)`` (0: inactive);
    icnn_active: ``g(z_k) − g(0) > 0`` at ``z_1 … z_K`` ``(B, K)`` (where it is not, the
    ReHU term of V and its gradient are 0: V is ``η‖z‖²`` there); spread: the
    :class:`~deqjax.lyapunov.StabilityReport` of ``z_K`` over perturbed starts;
    changed_prediction: whether the class predicted from ``z_K(δ_j)`` differs from the
    one from ``z_K(0)`` ``(B, n_perturb)``."""

    v_values: jax.Array
    v_increases: jax.Array
    corrections: jax.Array
    icnn_active: jax.Array
    spread: StabilityReport
    changed_prediction: jax.Array


def lyadeq_stability_check(
    model: nn.Module,
    variables,
    x,
    key,
    n_perturb: int = 16,
    scale: float = 0.1,
) -> LyaDEQStability:
    """Discrete stability of a :class:`LyaDEQClassifier` on every image of ``x``
    (:class:`LyaDEQStability`): ``V`` along the K steps from ``z₀ = 0``, and ``z_K`` from
    ``n_perturb`` starts ``z₀ = δ_j`` (``scale · N(0, I)``, one key per image), vmapped."""
    check_images(x)
    config = model.deq.forward
    bound = model.bind(variables)
    u = bound.inject(x)
    f = bound.equilibrium.cell_function()
    cell = bound.equilibrium.cell.clone(parent=None)
    cell_params = variables["params"]["equilibrium"]["cell"]
    keys = jax.random.split(key, x.shape[0])

    def one(u_i, k):
        args = (cell_params, u_i)
        z0 = jnp.zeros_like(u_i)
        run = lambda s: solve(lambda z: f(z, args), s, config)[0]
        _, stats = solve(lambda z: f(z, args), z0, config, return_trajectory=True)
        states = jnp.concatenate([z0[None], stats.trajectory])
        icnn = jax.tree.map(lambda p: p.astype(u_i.dtype), cell_params["icnn"])
        values, increases = lyapunov_along(icnn, states, model.eta, model.d)
        g0 = icnn_apply(icnn, z0)
        active = jax.vmap(lambda z: icnn_apply(icnn, z) - g0 > 0)(states[1:])
        us = jnp.broadcast_to(u_i, states[:-1].shape)
        corr = cell.apply({"params": cell_params}, states[:-1], us, True)
        return values, increases, corr, active, stability_check(run, z0, k, n_perturb, scale)

    values, increases, corr, active, spread = jax.vmap(one)(u, keys)
    label = jnp.argmax(bound.classify(spread.reference), -1)
    finals = spread.finals.reshape((-1,) + spread.finals.shape[2:])
    labels = jnp.argmax(bound.classify(finals), -1).reshape(spread.finals.shape[:2])
    return LyaDEQStability(values, increases, corr, active, spread, labels != label[:, None])
