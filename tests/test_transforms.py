"""deq_fixed_point under every JAX transformation: forward mode (jvp, jacfwd) against
finite differences and exact Jacobians, forward/reverse consistency in every backward
mode, and jax.shard_map with its default check_vma=True on 2 forced CPU devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.deq import DEQConfig, deq_fixed_point
from deqjax.solvers import SOLVERS, SolverConfig
from tests.helpers import run_forced_device_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6


def problem(rho=0.7):
    a = jax.random.normal(jax.random.PRNGKey(0), (N, N))
    a = rho * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(1), (N,))
    return a, b


def tanh_cell(z, args):
    return jnp.tanh(args[0] @ z + args[1])


def affine_cell(z, args):
    return args[0] @ z + args[1]


def config(method, adjoint="anderson", backward="implicit"):
    return DEQConfig(
        forward=SolverConfig(method=method, max_iter=300, tol=1e-13, stop_mode="abs"),
        backward=backward,
        adjoint_solver=adjoint,
        adjoint_tol=1e-13,
        adjoint_max_iter=300,
    )


@pytest.mark.parametrize("method", SOLVERS)
def test_jacfwd_and_jvp_equal_the_exact_jacobian_of_an_affine_map(method, x64):
    """z* = (I − A)⁻¹ b: dz*/db = (I − A)⁻¹, and along dA, dz* = (I − A)⁻¹ dA z*."""
    a, b = problem()
    cfg = config(method)
    inv = jnp.linalg.inv(jnp.eye(N) - a)
    z_of = lambda a, b: deq_fixed_point(affine_cell, jnp.zeros(N), (a, b), cfg)[0]
    # (the transforms jitted throughout this module: an eager call compiles every
    # primitive, the solver's loops included, on its own, ~3x the compile time)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(z_of, argnums=1))(a, b), inv, atol=1e-10)
    da = jax.random.normal(jax.random.PRNGKey(7), (N, N))
    z, dz = jax.jit(lambda a, da: jax.jvp(lambda a: z_of(a, b), (a,), (da,)))(a, da)
    np.testing.assert_allclose(dz, inv @ (da @ z), atol=1e-10)


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("adjoint", ["anderson", "gmres"])
def test_jacfwd_matches_central_differences(method, adjoint, x64):
    a, b = problem()
    cfg = config(method, adjoint)
    z_of_b = lambda b: deq_fixed_point(tanh_cell, jnp.zeros(N), (a, b), cfg)[0]
    jac = jax.jit(jax.jacfwd(z_of_b))(b)
    h = 1e-6
    z_jit = jax.jit(z_of_b)  # 2N evaluations, one compile
    fd = jnp.stack([(z_jit(b + h * e) - z_jit(b - h * e)) / (2 * h) for e in jnp.eye(N)], 1)
    np.testing.assert_allclose(jac, fd, atol=1e-8)
    np.testing.assert_allclose(jax.jit(jax.jacrev(z_of_b))(b), jac, atol=1e-11)


@pytest.mark.parametrize("method", SOLVERS)
def test_grad_without_probe_equals_the_probe_paths_implicit_gradient(method, x64):
    """The custom_jvp path (no probe) transposes into the same adjoint solve as the
    custom_vjp path (probe): equal gradients, under vmap and jit."""
    a, b = problem()
    bs = b + jax.random.normal(jax.random.PRNGKey(3), (4, N))
    cfg = config(method)

    def loss(a, bs, probe):
        p = jnp.zeros((4, 2)) if probe else None
        zs = jax.vmap(
            lambda b, p: deq_fixed_point(tanh_cell, jnp.zeros(N), (a, b), cfg, backward_probe=p)[0]
        )(bs, p)
        return jnp.sum(jnp.sin(zs) * jnp.arange(1.0, N + 1))

    g_jvp = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(a, bs, False)
    g_vjp = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(a, bs, True)
    for x, y in zip(g_jvp, g_vjp):
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unroll"])
def test_forward_and_reverse_mode_agree_in_every_mode(backward, x64):
    """⟨J ȧ, w⟩ = ⟨ȧ, Jᵀ w⟩ for the derivative each mode defines (phantom and unroll by
    plain autodiff, implicit by the tangent and adjoint solves)."""
    a, b = problem()
    z_of = lambda a, b: deq_fixed_point(
        tanh_cell, jnp.zeros(N), (a, b), config("anderson", backward=backward)
    )[0]
    da, db = (
        jax.random.normal(jax.random.PRNGKey(4), (N, N)),
        jax.random.normal(jax.random.PRNGKey(5), (N,)),
    )
    w = jax.random.normal(jax.random.PRNGKey(6), (N,))
    _, dz = jax.jit(lambda a, b: jax.jvp(z_of, (a, b), (da, db)))(a, b)
    ga, gb = jax.jit(jax.grad(lambda a, b: jnp.dot(w, z_of(a, b)), argnums=(0, 1)))(a, b)
    np.testing.assert_allclose(jnp.dot(w, dz), jnp.sum(ga * da) + jnp.dot(gb, db), rtol=1e-10)


def test_forward_mode_with_integer_leaves_in_args(x64):
    """Integer leaves of args (float0 tangents) are constants of the linear maps."""
    a, b = problem()
    cell = lambda z, p: jnp.tanh(p[0] @ z + p[1] * p[2])
    z_of_b = lambda b: deq_fixed_point(
        cell, jnp.zeros(N), (a, b, jnp.asarray(2)), config("anderson")
    )[0]
    ref = lambda b: deq_fixed_point(tanh_cell, jnp.zeros(N), (a, 2 * b), config("anderson"))[0]
    jac = jax.jit(jax.jacfwd(z_of_b))(b)
    np.testing.assert_allclose(jac, jax.jit(jax.jacfwd(ref))(b), atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.jacrev(z_of_b))(b), jac, atol=1e-12)


def test_forward_mode_through_a_cell_with_custom_vjp_pieces(x64):
    """The tangent uses only f's VJP (transposed), so a cell built from custom_vjp
    functions (e.g. deqjax.conv2d, whose jvp JAX refuses) still has forward mode."""

    @jax.custom_vjp
    def matvec(a, z):
        return a @ z

    matvec.defvjp(lambda a, z: (a @ z, (a, z)), lambda r, ct: (jnp.outer(ct, r[1]), r[0].T @ ct))
    a, b = problem()
    cell = lambda z, p: jnp.tanh(matvec(p[0], z) + p[1])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda z: cell(z, (a, b)), (b,), (b,))
    z_of_b = lambda b: deq_fixed_point(cell, jnp.zeros(N), (a, b), config("anderson"))[0]
    ref = lambda b: deq_fixed_point(tanh_cell, jnp.zeros(N), (a, b), config("anderson"))[0]
    np.testing.assert_allclose(
        jax.jit(jax.jacfwd(z_of_b))(b), jax.jit(jax.jacfwd(ref))(b), atol=1e-12
    )


@pytest.mark.slow
def test_shard_map_with_default_check_vma_equals_unsharded():
    """Every solver and backward mode inside jax.shard_map (check_vma=True, 2 forced
    CPU devices, the batch sharded): value, gradients, per-example steps and the
    forward-mode Jacobian equal the unsharded computation (tests/_shard_worker.py)."""
    res = run_forced_device_worker("_shard_worker.py", 2, *SOLVERS)
    assert set(res) == set(SOLVERS)
    for method, r in res.items():
        assert r["devices"] == 2 and r["steps_equal"], (method, r)
        assert r["loss"] < 1e-12 and r["grad_a"] < 1e-12 and r["grad_b"] < 1e-12, (method, r)
        assert r["grad_scale"] > 1.0  # a non-trivial gradient was compared
    assert res["anderson"]["jacfwd"] < 1e-12 < res["anderson"]["jac_scale"]
    assert "phantom" in res["anderson"]["modes"] and "shine_probe" in res["broyden"]["modes"]


def test_krylov_adjoint_inside_shard_map_is_a_clear_error():
    """jaxopt's Krylov solvers (jax.scipy) cannot type-check under check_vma=True: a
    clear error names the fix, instead of a while_loop type mismatch."""
    from deqjax.deq import _solve_adjoint

    cfg = DEQConfig(adjoint_solver="gmres")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
    P = jax.sharding.PartitionSpec

    def run(v):
        return _solve_adjoint(lambda u: 0.5 * u, v, cfg)[0]

    with pytest.raises(ValueError, match="check_vma"):
        jax.shard_map(run, mesh=mesh, in_specs=P("x"), out_specs=P("x"))(jnp.ones(4))
