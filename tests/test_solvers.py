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
    one_jit = jax.jit(one)  # the single solves: one compile (an eager loop recompiles)
    for i in range(2):
        for j in range(3):
            z1, s1 = one_jit(scales[i, j], budgets[i, j])
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
        # (jitted: compile time)
        run = jax.jit(
            lambda z0, differentiable, cfg=cfg: solve(
                lambda z: jnp.tanh(a @ z + b), z0, cfg, differentiable=differentiable
            ),
            static_argnums=1,
        )
        z1, s1 = run(jnp.zeros(12), False)
        z2, s2 = run(jnp.zeros(12), True)
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
    # (jitted: compile time; the single gradients compile once)
    g = jax.jit(jax.grad(lambda s: jnp.sum(jax.vmap(one)(s))))(scales)
    assert bool(jnp.all(jnp.isfinite(g)))
    grad_one = jax.jit(jax.grad(one))
    np.testing.assert_allclose(g, [grad_one(s) for s in scales], rtol=1e-10)


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


# --- bad input: clear errors, and non-finite in => non-finite out ----------------


@pytest.mark.parametrize(
    "field,value",
    [("max_iter", 2.5), ("max_iter", True), ("anderson_m", 3.0), ("broyden_memory", "4")],
)
def test_integer_fields_must_be_ints(field, value):
    with pytest.raises(TypeError, match=f"{field} must be an int"):
        SolverConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tol=float("nan")), "tol"),
        (dict(tol=float("inf")), "tol"),
        (dict(anderson_beta=0.0), "anderson_beta"),
        (dict(anderson_beta=float("nan")), "anderson_beta"),
        (dict(anderson_ridge=float("inf")), "anderson_ridge"),
        (dict(anderson_ridge_mode="scaled"), "anderson_ridge_mode"),
        (dict(broyden_memory=-1), "broyden_memory"),
    ],
)
def test_out_of_range_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverConfig(**kwargs)
    with pytest.raises(TypeError, match="damping must be a real number"):
        SolverConfig(damping=True)


def test_wrong_config_type_is_a_clear_error():
    from deqjax.deq import DEQConfig

    with pytest.raises(TypeError, match="expects a SolverConfig, got DEQConfig"):
        solve(lambda z: z, jnp.zeros(3), DEQConfig())


def test_f_with_another_dtype_or_structure_is_an_error():
    """f's output must have z0's structure, shapes and dtypes (a pair of two
    same-shaped arrays used to be stacked silently into one array)."""
    z0 = jnp.zeros(3, jnp.float32)
    with pytest.raises(TypeError, match="float32.*got float16"):
        solve(lambda z: (0.5 * z + 1).astype(jnp.float16), z0)
    with pytest.raises(TypeError, match="same structure as z0"):
        solve(lambda z: (z, z), z0)
    with pytest.raises(TypeError, match="same structure as z0"):
        solve(lambda z: {"z": z}, z0)
    with pytest.raises(TypeError, match="same structure as z0"):
        solve(lambda zz: zz[0], (z0, z0))
    with pytest.raises(ValueError, match=r"state shape \(2,\)"):
        solve(lambda zz: {"a": zz["a"][:1], "b": zz["b"]}, {"a": jnp.zeros(2), "b": z0})
    with pytest.raises(TypeError, match="complex"):
        solve(lambda z: z, jnp.zeros(3, jnp.complex64))


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("differentiable", [False, True])
def test_non_finite_start_or_map_gives_nan_per_example(method, differentiable, x64):
    """A NaN in z0, or a NaN that f closes over, makes that example's state NaN and
    converged False; the other examples of the vmapped batch are unchanged."""
    a, b, _ = affine_problem(norm=0.5)
    cfg = SolverConfig(method=method, max_iter=50, tol=1e-5)
    bad_b = b.at[3].set(jnp.nan)
    bs = jnp.stack([b, bad_b, b])
    z0s = jnp.zeros((3, 12)).at[2, 0].set(jnp.inf)
    run = lambda z0, b: solve(lambda z: jnp.tanh(a @ z + b), z0, cfg, differentiable=differentiable)
    zs, st = jax.vmap(run)(z0s, bs)
    z_ref, st_ref = run(jnp.zeros(12), b)
    np.testing.assert_allclose(zs[0], z_ref, rtol=1e-12, atol=1e-14)
    assert bool(st.converged[0]) and int(st.steps[0]) == int(st_ref.steps)
    for i in (1, 2):
        assert bool(jnp.all(jnp.isnan(zs[i]))), i
        assert not bool(st.converged[i]) and bool(jnp.isnan(st.abs_residual[i]))
    assert int(st.steps[2]) == 0  # a non-finite start is never iterated


@pytest.mark.parametrize("method", SOLVERS)
def test_iterates_turning_non_finite_midway_give_nan_not_a_stale_best(method):
    """f(z) − z = 1 + 0.1 √(1 − z) > 0: no fixed point, and every solver walks up out
    of f's domain z ≤ 1 (NaN there). The solve must not return its best finite iterate
    as if it were an answer."""
    f = lambda z: z + 1.0 + 0.1 * jnp.sqrt(1.0 - z)
    cfg = SolverConfig(method=method, max_iter=40, tol=1e-6, stop_mode="abs")
    z, st = solve(f, jnp.zeros(2), cfg, return_trajectory=True)
    assert bool(jnp.all(jnp.isnan(z))) and not bool(st.converged)
    assert 1 < int(st.steps) < 40  # it stopped where f went non-finite
    assert bool(jnp.all(jnp.isnan(st.trajectory[int(st.steps) :])))


def test_solver_breakdown_falls_back_to_a_plain_step(x64):
    """Unregularised Anderson on an affine map reaches the exact fixed point; the next
    Gram system is singular. That breakdown is the solver's, not f's: the step falls
    back to z <- f(z) and every iterate stays finite (it was NaN before)."""
    f = lambda z: 0.5 * z + 1.0
    cfg = SolverConfig(method="anderson", max_iter=10, tol=0.0, anderson_ridge=0.0)
    z, st = solve(f, jnp.zeros(3), cfg, return_trajectory=True)
    assert bool(jnp.all(jnp.isfinite(st.trajectory)))
    np.testing.assert_allclose(z, 2.0 * jnp.ones(3), rtol=1e-15)


# --- Anderson's regulariser relative to the problem ------------------------------


@pytest.mark.parametrize("tol", [1e-6, 1e-10, 1e-13])
def test_relative_anderson_ridge_is_not_slower_than_plain_iteration(tol, x64):
    """The absolute ridge 1e-4 dominates the Gram matrix once ‖G‖² ≪ 1e-4: Anderson
    then takes MORE steps than plain iteration (98 vs 50 at tol 1e-13). Relative to
    the mean squared residual it stays as fast as unregularised Anderson."""
    a, b, z_star = affine_problem()
    steps = {}
    for name, kw in {
        "plain": dict(method="fixed_point"),
        "absolute": dict(anderson_ridge_mode="absolute"),
        "relative": dict(),
        "ridge0": dict(anderson_ridge=0.0),
    }.items():
        cfg = SolverConfig(max_iter=500, tol=tol, stop_mode="abs", **kw)
        z, st = solve(lambda z: a @ z + b, jnp.zeros(12), cfg)
        assert bool(st.converged), name
        steps[name] = int(st.steps)
    assert steps["relative"] <= steps["plain"], steps
    assert steps["relative"] <= steps["ridge0"] + 2, steps
    assert steps["absolute"] > steps["plain"], steps  # the defect this fixes


def test_anderson_ridge_zero_is_the_same_in_both_modes(x64):
    a, b, _ = affine_problem()
    runs = [
        solve(
            lambda z: jnp.tanh(a @ z + b),
            jnp.zeros(12),
            SolverConfig(max_iter=30, tol=0.0, anderson_ridge=0.0, anderson_ridge_mode=mode),
            return_trajectory=True,
        )[1].trajectory
        for mode in ("relative", "absolute")
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


# --- Broyden's inverse-Jacobian estimate (SHINE) --------------------------------


def test_broyden_factors_satisfy_the_secant_condition(x64):
    """The returned factors are Broyden's final H: H Δg = Δz for its last update
    (Δz, Δg) = (z_n − z_{n−1}, g(z_n) − g(z_{n−1})), and H ≈ (J − I)⁻¹ on an affine map
    along the directions the solve explored."""
    from deqjax.solvers import apply_inverse_jacobian

    a, b, _ = affine_problem()
    f = lambda z: a @ z + b
    cfg = SolverConfig(method="broyden", max_iter=6, tol=0.0)
    _, st = solve(f, jnp.zeros(12), cfg, return_trajectory=True, return_inverse_jacobian=True)
    assert st.inverse_jacobian[0].shape == (6, 12)
    # the loop evaluates z_0 … z_5 (trajectory rows hold z_1 … z_6); its last update
    # used the pair (z_4, z_5)
    z4, z5 = st.trajectory[3], st.trajectory[4]
    dz, dg = z5 - z4, (f(z5) - z5) - (f(z4) - z4)
    np.testing.assert_allclose(apply_inverse_jacobian(st.inverse_jacobian, dg), dz, rtol=1e-9)
    with pytest.raises(ValueError, match="Broyden"):
        solve(f, jnp.zeros(12), SolverConfig(), return_inverse_jacobian=True)
