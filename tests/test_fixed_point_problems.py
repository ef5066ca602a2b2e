"""optimistix's fixed-point problems (tests/fixed_point_problems.py) × deqjax's forward
solvers: the fixed point is one (small residual, converged), its implicit gradient
matches central finite differences, and — when optimistix is installed — both match
``optx.fixed_point(..., FixedPointIteration)`` with its implicit adjoint."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from deqjax import DEQConfig, SolverConfig, deq_fixed_point
from deqjax.solvers import SOLVERS
from tests.fixed_point_problems import (
    PROBLEM_NAMES,
    loss,
    midpoint_y1,
    problem_dt,
    problem_tol,
)
from tests.fixed_point_problems import make_problem as _make_problem
from tests.helpers import import_or_skip

FD_STEP = 1e-4  # relative (directions are scaled by |leaf|)
FD_DIRECTIONS = 2

# Built once per problem (every test here runs under the x64 fixture, so the cached
# leaves are float64).
make_problem = functools.cache(_make_problem)


def config(method: str, tol: float) -> DEQConfig:
    return DEQConfig(
        forward=SolverConfig(method=method, max_iter=1000, tol=tol, stop_mode="abs"),
        adjoint_tol=1e-12,
        adjoint_max_iter=1000,
    )


def flat(tree) -> np.ndarray:
    """All leaves of a pytree as one numpy vector (numpy, not jnp: eager jnp ops would
    each compile a small kernel per shape, seconds per test)."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def max_abs(tree) -> float:
    return float(np.max(np.abs(flat(tree))))


def numpy_args(p):
    """The problem's args as numpy float64 leaves: every call (base point, perturbed
    points, optimistix) then has the same signature and reuses one compilation."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), p.args)


@functools.cache
def _deq_value_and_grad(name: str, method: str):
    """Jitted ``args -> ((L, (z*, stats, max|f(z*) − z*|)), dL/dargs)`` of one problem."""
    p = make_problem(name)
    cfg = config(method, problem_tol(name))

    def objective(args):
        z, stats = deq_fixed_point(p.f, p.z0, args, cfg)
        res = ravel_pytree(p.f(z, args))[0] - ravel_pytree(z)[0]
        res = jax.lax.stop_gradient(jnp.max(jnp.abs(res)))
        return loss(z), (z, stats, res)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def _directions(args, seed: int):
    """A random direction in args-space, each element scaled by its own magnitude (the
    rates of the Robertson problem span 0.04 to 3e7, its y0 3e-5 to 0.98)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape) * np.where(a == 0, 1.0, np.abs(a)), args
    )


def _shift(args, d, h):
    return jax.tree_util.tree_map(lambda a, v: a + h * v, args, d)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_fixed_point_and_gradient(x64, name, method):
    p = make_problem(name)
    args = numpy_args(p)
    vg = _deq_value_and_grad(name, method)
    (_, (z, stats, res)), grads = vg(args)
    scale = max(max_abs(z), 1e-300)
    assert bool(stats.converged), (name, method, stats)
    assert float(res) <= 10 * problem_tol(name), float(res)
    assert float(stats.abs_residual) <= problem_tol(name)
    # every gradient leaf is finite and the structure is args'
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(p.args)
    assert np.isfinite(flat(grads)).all()
    # (b) directional central differences
    for seed in range(FD_DIRECTIONS):
        d = _directions(args, seed)
        (lp, _), _ = vg(_shift(args, d, FD_STEP))
        (lm, _), _ = vg(_shift(args, d, -FD_STEP))
        fd = (float(lp) - float(lm)) / (2 * FD_STEP)
        ad = float(flat(grads) @ flat(d))
        # FD error: O(h²) truncation + tol/h from the solves' own accuracy
        atol = 1e-6 * max(abs(fd), 1e-3 * scale) + 1e-12 * scale
        assert abs(ad - fd) <= atol, (name, method, seed, ad, fd)


@pytest.mark.parametrize("kind", ["linear", "robertson"])
def test_midpoint_forms_agree(x64, kind):
    """The y-, f- and k-space forms of one implicit-midpoint step give the same y1."""
    y1 = {}
    for space in "yfk":
        other = f"midpoint_{space}_{kind}"
        p = make_problem(other)
        args = numpy_args(p)
        (_, (z, _, _)), _ = _deq_value_and_grad(other, "anderson")(args)
        y1[space] = midpoint_y1(space, z, args[1], problem_dt(other))
    np.testing.assert_allclose(y1["f"], y1["y"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y1["k"], y1["y"], rtol=1e-10, atol=1e-12)


@functools.cache
def _optx_value_and_grad(name: str):
    optx = import_or_skip("optimistix")
    p = make_problem(name)
    tol = problem_tol(name)
    solver = optx.FixedPointIteration(rtol=0.1 * tol, atol=0.1 * tol)

    def objective(args):
        sol = optx.fixed_point(p.f, solver, p.z0, args, max_steps=10_000)
        return loss(sol.value), sol.value

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("name", PROBLEM_NAMES)
def test_matches_optimistix(x64, name, method):
    args = numpy_args(make_problem(name))
    (_, z_ref), g_ref = _optx_value_and_grad(name)(args)
    (_, (z, _, _)), g = _deq_value_and_grad(name, method)(args)
    z_scale, g_scale = max_abs(z_ref), max_abs(g_ref)
    for a, b in zip(jax.tree_util.tree_leaves(z), jax.tree_util.tree_leaves(z_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8 * z_scale + 1e-300)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8 * g_scale + 1e-300)
