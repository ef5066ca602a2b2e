"""Operator splitting for the monDEQ equilibrium, as fixed-point cells of :mod:`deqjax.deq`.

The equilibrium ``z* = ReLU(W z* + U x + b)`` is the zero of ``F + G`` with
``F(z) = (I − W) z − (U x + b)`` (m-strongly monotone, Lipschitz with ``L = ‖I − W‖₂``)
and ``G = ∂(indicator of z ≥ 0)``, whose resolvent is ReLU for every step ``α``
(Winston & Kolter 2020, Sec. 4). Both splittings are iterations of a map, so they are
written as cells ``f(state, u)`` and solved by :func:`deqjax.deq.deq_fixed_point`
(``fixed_point`` solver, damping 1: the plain splitting; ``anderson`` accelerates it),
which also gives the implicit backward and every attack view.

* Forward–backward (``"fb"``): ``z ← ReLU((1 − α) z + α (W z + U x + b))``. Converges
  (a contraction, factor ``√(1 − 2αm + α²L²)``) for ``0 < α < 2m/L²``.
* Peaceman–Rachford (``"pr"``): on the auxiliary state ``s`` with ``z = ReLU(s)``,
  ``s ← 2 R(2 ReLU(s) − s + α(U x + b)) − (2 ReLU(s) − s)``, ``R = (I + α(I − W))⁻¹``;
  the equilibrium is ``ReLU(s*)``. Converges for every ``α > 0`` (the reflected
  resolvent of an m-strongly monotone Lipschitz operator is a contraction).

The same ``z*`` has the same implicit gradient whichever splitting and ``α`` found it:
the cells differ, their fixed points do not (``tests/test_mondeq.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl.bounds import gram_iteration_bound
from deqjax.deq import DEQConfig, deq_fixed_point
from deqjax.mondeq.operators import (
    MonDEQParams,
    apply_resolvent,
    apply_w,
    check_params,
    inject,
    resolvent,
    w_symbol,
)
from deqjax.solvers import SolverConfig

SPLITTINGS = ("fb", "pr")

# the splitting alone (no acceleration), as in the authors' code: alpha 1, tol 1e-5,
# max_iter 50 there; our solver's relative residual with tol 1e-4
DEFAULT_CONFIG = DEQConfig(
    forward=SolverConfig(method="fixed_point", max_iter=100, tol=1e-4, stop_mode="rel"),
    backward="implicit",
)


def _is_concrete(tree) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def monotone_part_norm_bound(p: MonDEQParams) -> float:
    """A provable upper bound on ``L = ‖I − W‖₂`` (Gram iteration, float64 on the host):
    of the matrix (fc) or of every frequency's block of the circular operator (conv)."""
    if p.kind == "fc":
        a, b = np.asarray(p.A, np.float64), np.asarray(p.B, np.float64)
        op = p.m * np.eye(a.shape[0]) + a.T @ a - b + b.T
        return float(gram_iteration_bound(op))
    s = w_symbol(p, xp=np)
    op = np.eye(s.shape[-1]) - s
    return float(gram_iteration_bound(op.reshape(-1, *op.shape[-2:])).max())


def fb_max_step(p: MonDEQParams) -> float:
    """``2m/L̂²`` with ``L̂ ≥ ‖I − W‖₂`` (:func:`monotone_part_norm_bound`): every forward–
    backward step ``α`` below it converges (a sufficient condition)."""
    check_params(p, full=False)
    return 2.0 * p.m / monotone_part_norm_bound(p) ** 2


def check_step(p: MonDEQParams, splitting: str, alpha) -> float:
    """Raise a ValueError for an unknown splitting or a step outside its convergence
    condition (forward–backward: checked when the parameters are concrete; under a
    trace the condition cannot be evaluated on the host and is not checked)."""
    if splitting not in SPLITTINGS:
        raise ValueError(f"unknown splitting {splitting!r}; choose one of {SPLITTINGS}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"the step alpha must be a Python number, got {alpha!r}.")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the step alpha must be finite and > 0, got {alpha}.")
    if splitting == "fb" and _is_concrete((p.A, p.B)):
        bound = fb_max_step(p)
        if alpha >= bound:
            raise ValueError(
                f"forward–backward step alpha = {alpha:g} is outside its convergence "
                f"condition alpha < 2m/‖I − W‖² (here < {bound:.4g}, from a Gram upper bound "
                "on ‖I − W‖); take a smaller alpha or splitting='pr' (any alpha > 0)."
            )
    return alpha


def fb_step(p: MonDEQParams, alpha, z, u):
    """One forward–backward step for one example."""
    return jax.nn.relu((1 - alpha) * z + alpha * (apply_w(p, z) + u))


def pr_step(p: MonDEQParams, alpha, inv, s, u):
    """One Peaceman–Rachford step on the auxiliary state ``s`` (``inv`` =
    :func:`~deqjax.mondeq.operators.resolvent`)."""
    s_half = 2 * jax.nn.relu(s) - s
    z_half = apply_resolvent(p, inv, s_half + alpha * u)
    return 2 * z_half - s_half


def make_cell(p: MonDEQParams, splitting: str, alpha: float):
    """``(f, to_z)``: the cell ``f(state, (A, B, u))`` of one example and the map from
    its fixed point to ``z*`` (identity for FB, ReLU for PR). The resolvent of PR is
    computed here, once, from ``p``; it is closed over (and differentiated) by
    :func:`deqjax.deq.deq_fixed_point`."""
    if splitting == "fb":

        def f(z, args):
            a, b, u = args
            return fb_step(p.replace(A=a, B=b), alpha, z, u)

        return f, lambda z: z
    inv = resolvent(p, alpha)

    def f(s, args):
        a, b, u = args
        return pr_step(p.replace(A=a, B=b), alpha, inv, s, u)

    return f, jax.nn.relu


def equilibrium(
    p: MonDEQParams,
    x: jax.Array,
    *,
    splitting: str = "pr",
    alpha: float = 1.0,
    config: DEQConfig = DEFAULT_CONFIG,
    backward_probe=None,
):
    """``(z*, stats)`` for a batch ``x`` of shape ``(batch,) + input_shape``.

    Differentiable in ``p`` and ``x`` by ``config.backward`` (``"implicit"``: the
    implicit function theorem through :func:`deqjax.deq.deq_fixed_point`; its adjoint
    solver ``"fixed_point"`` is the splitting's own adjoint iteration
    ``u = v + J_fᵀ u``, ``"dense"`` an LU solve, ``"auto"`` dense up to 128 unknowns).
    """
    check_params(p)
    alpha = check_step(p, splitting, alpha)
    if x.shape[1:] != tuple(p.input_shape):
        raise ValueError(
            f"x must have shape (batch,) + {tuple(p.input_shape)}, got {tuple(x.shape)}."
        )
    f, to_z = make_cell(p, splitting, alpha)
    probes = jnp.zeros((x.shape[0], 2), x.dtype) if backward_probe is None else backward_probe

    def one(x_i, probe_i):
        u = inject(p, x_i)
        kw = {} if backward_probe is None else {"backward_probe": probe_i}
        s, stats = deq_fixed_point(f, jnp.zeros_like(u), (p.A, p.B, u), config, **kw)
        return to_z(s), stats

    return jax.vmap(one)(x, probes)


def residual(p: MonDEQParams, z: jax.Array, x: jax.Array) -> jax.Array:
    """``‖z − ReLU(W z + U x + b)‖₂`` per example (batch)."""
    one = lambda z_i, x_i: jnp.linalg.norm(  # noqa: E731
        z_i - jax.nn.relu(apply_w(p, z_i) + inject(p, x_i))
    )
    return jax.vmap(one)(z, x)
