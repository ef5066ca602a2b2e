"""Fixed-point test problems modelled on optimistix's ``fixed_point_fn_init_args``
(``tests/helpers.py`` of patrick-kidger/optimistix), written afresh for deqjax.

Each problem is ``Problem(name, f, z0, args)`` with ``f(z, args) -> z`` for ONE state
that may be a pytree; the array leaves of ``args`` are the parameters the gradient
tests differentiate. Problems are built by :func:`make_problem` *after* float64 is
switched on (the ``x64`` fixture), so every leaf is float64.

Differences from optimistix's versions, on purpose:

* ``heat_cn`` is a true Crank–Nicolson step of ``∂y/∂t = κ (1 − y) Δy`` with the
  three-point Laplacian (optimistix's ``_laplacian`` returns its input, which turns its
  problem into a pointwise scalar equation); the time step is ``dx²/4`` so the step's
  fixed-point map is a contraction (factor about ½).
* The implicit-midpoint problems start from a non-zero ``y0`` (optimistix's start at
  ``y0 = 0``, where the linear and the Robertson problems have the trivial fixed point
  ``0`` and zero gradients), use the midpoint's ``½`` in the f- and k-space forms, and
  give the Robertson step ``dt = 1e-4`` from the classic ``y0 = (1, 0, 0)``-like state
  (optimistix's ``dt = 1e-8`` barely moves it). The three forms of the same step give
  the same ``y1`` (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


class Problem(NamedTuple):
    name: str
    f: Callable[[Any, Any], Any]
    z0: Any
    args: Any


def _ones_tree(value: float = 0.5):
    """The 28-unknown pytree state optimistix uses (a dict leaf and a vector)."""
    return ({"a": value * jnp.ones((3, 2, 4))}, value * jnp.ones(4))


def _tree_map(fn, tree):
    return jax.tree_util.tree_map(fn, tree)


# --- elementwise smoke tests ----------------------------------------------------------


def cos_map(z, c):
    """z = cos(c z) leafwise; c = 1 gives the Dottie number 0.739…"""
    return _tree_map(lambda x: jnp.cos(c * x), z)


def exp_map(z, c):
    """z = exp(−c z) leafwise; c = 1 gives the omega constant 0.567…"""
    return _tree_map(lambda x: jnp.exp(-c * x), z)


# --- a small softplus MLP -------------------------------------------------------------


def mlp_map(z, params):
    """z = 0.1 · MLP(z): one softplus hidden layer of width 8 on the flattened state."""
    w1, b1, w2, b2 = params
    flat, unravel = ravel_pytree(z)
    hidden = jax.nn.softplus(w1 @ flat + b1)
    return unravel(0.1 * (w2 @ hidden + b2))


def _mlp_params(size: int, width: int = 8, seed: int = 42):
    rng = np.random.default_rng(seed)
    lim1, lim2 = 1 / np.sqrt(size), 1 / np.sqrt(width)
    return (
        jnp.asarray(rng.uniform(-lim1, lim1, (width, size))),
        jnp.asarray(rng.uniform(-lim1, lim1, width)),
        jnp.asarray(rng.uniform(-lim2, lim2, (size, width))),
        jnp.asarray(rng.uniform(-lim2, lim2, size)),
    )


# --- Crank–Nicolson step of a nonlinear heat equation ---------------------------------

_HEAT_N = 100
_HEAT_DX = 2.0 / (_HEAT_N - 1)
_HEAT_DT = _HEAT_DX**2 / 4


def _laplacian(y):
    """Three-point Laplacian, zero at the two (fixed, Dirichlet) boundary points."""
    inner = (y[2:] - 2 * y[1:-1] + y[:-2]) / _HEAT_DX**2
    return jnp.zeros_like(y).at[1:-1].set(inner)


def _heat_rhs(y, kappa):
    return kappa * (1 - y) * _laplacian(y)


def heat_cn_map(y, args):
    """y1 = y0 + dt/2 (F(y0) + F(y1)), F(y) = κ (1 − y) Δy: one Crank–Nicolson step."""
    kappa, y0 = args["kappa"], args["y0"]
    return y0 + 0.5 * _HEAT_DT * (_heat_rhs(y0, kappa) + _heat_rhs(y, kappa))


# --- implicit midpoint step, in y-, f- and k-space ------------------------------------
# One step y1 = y0 + dt · F((y0 + y1)/2) of an autonomous ODE y' = F(y):
#   y-space:  z = y1,                 z = y0 + dt F((y0 + z)/2)
#   f-space:  z = F(midpoint),        z = F(y0 + dt/2 · z)         y1 = y0 + dt z
#   k-space:  z = dt F(midpoint),     z = dt F(y0 + z/2)           y1 = y0 + z

_LINEAR_DT = 1 / 16
_ROBERTSON_DT = 1e-4


def _flat(fn):
    """Lift ``fn(flat_z, args)`` to a pytree state."""

    def lifted(z, args):
        flat, unravel = ravel_pytree(z)
        return unravel(fn(flat, args))

    return lifted


def _midpoint_maps(rhs, dt):
    """The y-, f- and k-space maps of the implicit midpoint step of ``y' = rhs(y, p)``;
    ``args = (p, y0_flat)``."""

    def y_space(z, args):
        p, y0 = args
        return y0 + dt * rhs(0.5 * (y0 + z), p)

    def f_space(z, args):
        p, y0 = args
        return rhs(y0 + 0.5 * dt * z, p)

    def k_space(z, args):
        p, y0 = args
        return dt * rhs(y0 + 0.5 * z, p)

    return {"y": _flat(y_space), "f": _flat(f_space), "k": _flat(k_space)}


def _linear_rhs(y, matrix):
    return matrix @ y


def robertson_rhs(y, rates):
    """Robertson's stiff chemical kinetics (k1, k2, k3 = 0.04, 3e7, 1e4)."""
    k1, k2, k3 = rates
    f0 = -k1 * y[0] + k3 * y[1] * y[2]
    f2 = k2 * y[1] ** 2
    f1 = -f0 - f2
    return jnp.stack([f0, f1, f2])


LINEAR_MIDPOINT = _midpoint_maps(_linear_rhs, _LINEAR_DT)
ROBERTSON_MIDPOINT = _midpoint_maps(robertson_rhs, _ROBERTSON_DT)


def midpoint_y1(space: str, z_star, y0_flat, dt: float):
    """The step's ``y1`` from the fixed point of the ``space`` form."""
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(z_star)])
    return {"y": flat, "f": y0_flat + dt * flat, "k": y0_flat + flat}[space]


# --- the suite ------------------------------------------------------------------------

PROBLEM_NAMES = (
    "cos",
    "exp",
    "mlp",
    "heat_cn",
    "midpoint_y_linear",
    "midpoint_f_linear",
    "midpoint_k_linear",
    "midpoint_y_robertson",
    "midpoint_f_robertson",
    "midpoint_k_robertson",
)


def _robertson_state(values):
    """Robertson's 3 unknowns as optimistix's pytree: a 2-vector and a scalar leaf."""
    v = jnp.asarray(values)
    return (v[:2], {"b": v[2]})


def make_problem(name: str) -> Problem:
    """Build problem ``name`` (call with float64 enabled)."""
    if name == "cos":
        return Problem(name, cos_map, _ones_tree(), jnp.asarray(1.0))
    if name == "exp":
        return Problem(name, exp_map, _ones_tree(), jnp.asarray(1.0))
    if name == "mlp":
        return Problem(name, mlp_map, _ones_tree(), _mlp_params(28))
    if name == "heat_cn":
        x = jnp.linspace(-1.0, 1.0, _HEAT_N)
        args = {"kappa": jnp.asarray(1.0), "y0": x**2}
        return Problem(name, heat_cn_map, jnp.zeros(_HEAT_N), args)
    if name.endswith("_linear"):
        space = name.split("_")[1]
        rng = np.random.default_rng(19)
        matrix = jnp.asarray(rng.standard_normal((28, 28)))
        y0 = jnp.asarray(rng.uniform(0.5, 1.5, 28))
        return Problem(name, LINEAR_MIDPOINT[space], _ones_tree(), (matrix, y0))
    if name.endswith("_robertson"):
        space = name.split("_")[1]
        rates = (jnp.asarray(0.04), jnp.asarray(3e7), jnp.asarray(1e4))
        y0 = jnp.asarray([0.98, 3e-5, 0.02])
        # y-space starts from y0 (the previous step), f/k-space from 0; a start far from
        # the solution (optimistix's ones) makes the stiff k2 term expansive at dt=1e-4.
        start = y0 if space == "y" else jnp.zeros(3)
        return Problem(name, ROBERTSON_MIDPOINT[space], _robertson_state(start), (rates, y0))
    raise ValueError(f"unknown problem {name!r}")


def problem_dt(name: str) -> float:
    return _ROBERTSON_DT if name.endswith("_robertson") else _LINEAR_DT


def problem_tol(name: str) -> float:
    """Absolute forward tolerance: 1e-12, scaled down for the k-space Robertson step,
    whose fixed point (dt · F ≈ 3e-6) is far below 1."""
    return 1e-17 if name == "midpoint_k_robertson" else 1e-12


def loss(z):
    """The scalar the gradient checks and the benchmark differentiate: a nonlinear
    function of every leaf of the (pytree) fixed point."""
    return sum(jnp.sum(jnp.sin(x) + 0.5 * x**2) for x in jax.tree_util.tree_leaves(z))
