"""Fixed-point solvers: analytic fixed points, budgets, per-example stopping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.solvers import SOLVERS, SolverConfig, solve


def affine_problem(n=12, norm=0.8, seed=0):
    a = jax.random.normal(jax.random.PRNGKey(seed), (n, n))
    a = norm * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(seed + 1), (n,))
    z_star = jnp.linalg.solve(jnp.eye(n) - a, b)
    return a, b, z_star


@pytest.mark.parametrize("method", SOLVERS)
def test_affine_fixed_point_matches_analytic(method, x64):
    a, b, z_star = affine_problem()
    cfg = SolverConfig(method=method, max_iter=200, tol=1e-10, stop_mode="abs")
    z, st = jax.jit(lambda z0: solve(lambda z: a @ z + b, z0, cfg))(jnp.zeros(12))
    np.testing.assert_allclose(z, z_star, atol=1e-8)
    assert bool(st.converged) and int(st.steps) < 200
    assert float(st.abs_residual) < 1e-10
    # The reported residual is the true residual of the returned point.
    np.testing.assert_allclose(st.abs_residual, jnp.linalg.norm(a @ z + b - z), rtol=1e-6)


@pytest.mark.parametrize("method", SOLVERS)
def test_matrix_shaped_state(method, x64):
    a, b, z_star = affine_problem(n=12)
    cfg = SolverConfig(method=method, max_iter=200, tol=1e-10)
    z, _ = solve(lambda z: (a @ z.reshape(-1) + b).reshape(3, 4), jnp.zeros((3, 4)), cfg)
    np.testing.assert_allclose(z.reshape(-1), z_star, atol=1e-7)


@pytest.mark.parametrize("method", SOLVERS)
def test_tol_zero_runs_exactly_max_iter(method):
    a, b, _ = affine_problem()
    cfg = SolverConfig(method=method, max_iter=7, tol=0.0)
    z, st = solve(lambda z: a @ z + b, jnp.zeros(12), cfg, return_trajectory=True)
    assert int(st.steps) == 7
    assert st.trajectory.shape == (7, 12)
    assert not bool(st.converged)


def test_trajectory_is_the_iteration(x64):
    a, b, _ = affine_problem()
    cfg = SolverConfig(method="fixed_point", max_iter=5, tol=0.0)
    _, st = solve(lambda z: a @ z + b, jnp.zeros(12), cfg, return_trajectory=True)
    z = jnp.zeros(12)
    for k in range(5):
        z = a @ z + b
        np.testing.assert_allclose(st.trajectory[k], z, rtol=1e-12)


def test_damping(x64):
    a, b, z_star = affine_problem()
    cfg = SolverConfig(method="fixed_point", max_iter=1, tol=0.0, damping=0.5)
    _, st = solve(lambda z: a @ z + b, jnp.ones(12), cfg, return_trajectory=True)
    np.testing.assert_allclose(st.trajectory[0], 0.5 * jnp.ones(12) + 0.5 * (a @ jnp.ones(12) + b))


@pytest.mark.parametrize("method", SOLVERS)
def test_per_example_stopping_under_vmap(method, x64):
    """A slow example does not change a fast one's answer or step count."""
    a, b, _ = affine_problem(norm=0.9)
    scales = jnp.array([0.05, 1.0])
    cfg = SolverConfig(method=method, max_iter=300, tol=1e-9, stop_mode="abs")
    f = lambda s: lambda z: s * (a @ z) + b
    zs, st = jax.vmap(lambda s: solve(f(s), jnp.zeros(12), cfg))(scales)
    z_fast, st_fast = solve(f(scales[0]), jnp.zeros(12), cfg)
    assert int(st.steps[0]) == int(st_fast.steps) < int(st.steps[1])
    np.testing.assert_allclose(zs[0], z_fast, rtol=1e-12, atol=1e-14)
    assert bool(jnp.all(st.converged))


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("return_state", ["best", "last"])
def test_nested_vmap_matches_single_solves(method, return_state, x64):
    """Under two vmaps (restarts × batch, the loop runs until the slowest of all 6
    stops) every example's state, steps, residuals and trajectory equal its own solve;
    a per-example traced step budget freezes that example early."""
    a, b, _ = affine_problem(norm=0.9)
    scales = jnp.array([[0.05, 1.0, 0.5], [0.9, 0.2, 0.7]])
    budgets = jnp.array([[40, 300, 3], [300, 7, 300]])
    cfg = SolverConfig(
        method=method, max_iter=300, tol=1e-9, stop_mode="abs", return_state=return_state
    )
    f = lambda s: lambda z: jnp.tanh(s * (a @ z) + b)
    one = lambda s, n: solve(f(s), jnp.zeros(12), cfg, num_steps=n, return_trajectory=True)
    zs, st = jax.jit(jax.vmap(jax.vmap(one)))(scales, budgets)
    for i in range(2):
        for j in range(3):
            z1, s1 = one(scales[i, j], budgets[i, j])
            assert int(st.steps[i, j]) == int(s1.steps) <= int(budgets[i, j])
            np.testing.assert_allclose(zs[i, j], z1, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(
                st.abs_residual[i, j], s1.abs_residual, rtol=1e-12, atol=1e-15
            )
            np.testing.assert_allclose(st.trajectory[i, j], s1.trajectory, rtol=1e-12, atol=1e-14)
            assert bool(st.converged[i, j]) == bool(s1.converged)
    assert int(st.steps[0, 2]) == 3 and int(st.steps[1, 1]) == 7  # the budgets bit


@pytest.mark.parametrize("method", SOLVERS)
def test_map_without_fixed_point_reports_not_converged(method, x64):
    # f(z) - z = 1 + 0.1 sin(z) > 0: no fixed point exists, no solver may claim one.
    # (Absolute residual: a solver that runs off to |z| -> inf makes the relative one small.)
    f = lambda z: z + 1.0 + 0.1 * jnp.sin(z)
    # (float64 and a short budget: far enough out, z + 1 == z in floating point.)
    cfg = SolverConfig(method=method, max_iter=10, tol=1e-6, stop_mode="abs")
    _, st = solve(f, jnp.ones(2), cfg)
    assert not bool(st.converged)
    assert int(st.steps) == 10
    assert float(st.abs_residual) >= 0.9 * jnp.sqrt(2.0)


def test_expanding_map_reports_not_converged():
    f = lambda z: 1.5 * z + 1.0  # fixed point -2 is repelling for the plain iteration
    _, st = solve(f, jnp.ones(3), SolverConfig(method="fixed_point", max_iter=25, tol=1e-6))
    assert not bool(st.converged) and float(st.rel_residual) > 0.1


def test_unroll_mode_matches_while_loop(x64):
    a, b, _ = affine_problem()
    for method in SOLVERS:
        cfg = SolverConfig(method=method, max_iter=50, tol=1e-8)
        z1, s1 = solve(lambda z: jnp.tanh(a @ z + b), jnp.zeros(12), cfg)
        z2, s2 = solve(lambda z: jnp.tanh(a @ z + b), jnp.zeros(12), cfg, differentiable=True)
        np.testing.assert_allclose(z1, z2, atol=1e-12)
        assert int(s1.steps) == int(s2.steps)


@pytest.mark.parametrize("method", SOLVERS)
def test_unrolled_gradient_under_vmap_with_early_stops(method, x64):
    """Examples that stop at different steps (6 vs 16) get the gradients of their own
    unrolled solves — finite even with Anderson's ridge 0, where a stopped example's
    repeated iterates would make its least-squares system singular."""
    a, b, _ = affine_problem(norm=0.9)
    cfg = SolverConfig(method=method, max_iter=60, tol=1e-8, stop_mode="abs", anderson_ridge=0.0)
    one = lambda s: jnp.sum(
        solve(lambda z: jnp.tanh(s * (a @ z) + b), jnp.zeros(12), cfg, differentiable=True)[0]
    )
    scales = jnp.array([0.05, 1.0])
    g = jax.grad(lambda s: jnp.sum(jax.vmap(one)(s)))(scales)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, [jax.grad(one)(s) for s in scales], rtol=1e-10)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown solver"):
        SolverConfig(method="newton")
    with pytest.raises(ValueError, match="tol"):
        SolverConfig(tol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        SolverConfig(max_iter=0)
    with pytest.raises(ValueError, match="float"):
        solve(lambda z: z, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="state shape"):
        solve(lambda z: jnp.zeros(4), jnp.zeros(3))


def test_num_steps_budget_and_last_state(x64):
    a, b, _ = affine_problem()
    cfg = SolverConfig(method="fixed_point", max_iter=10, tol=0.0, return_state="last")
    z, st = jax.jit(lambda n: solve(lambda z: a @ z + b, jnp.zeros(12), cfg, num_steps=n))(3)
    ref = jnp.zeros(12)
    for _ in range(3):
        ref = a @ ref + b
    assert int(st.steps) == 3
    np.testing.assert_allclose(z, ref, rtol=1e-12)
