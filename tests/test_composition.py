"""deq_fixed_point off the first-order path: closures, derivatives of every order,
pytree states with aux outputs, strict dtype promotion, mixed precision and the dense
adjoint. Each test fails on an implementation without the feature (negative controls
where a silent wrong answer is the failure mode)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import DEQConfig, SolverConfig, deq_fixed_point
from deqjax.deq import DENSE_ADJOINT_MAX_SIZE, adjoint_method
from deqjax.models import DEQ
from deqjax.solvers import SOLVERS, solve

N = 6
BACKWARDS = ["implicit", "implicit_probe", "phantom", "unroll", "shine_refine"]


@pytest.fixture(autouse=True)
def strict_promotion():
    """The whole module runs under strict dtype promotion (as optimistix's tests do):
    no solver relies on implicit int32/int64 or float32/float64 promotion."""
    with jax.numpy_dtype_promotion("strict"):
        yield


def problem(rho=0.7, n=N):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    a = rho * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    return a, b


def config(backward="implicit", method="anderson", adjoint="auto", tol=1e-13):
    method = "broyden" if backward.startswith("shine") else method
    return DEQConfig(
        forward=SolverConfig(method=method, max_iter=400, tol=tol, stop_mode="abs"),
        backward=backward.removesuffix("_probe"),
        adjoint_solver=adjoint,
        adjoint_tol=tol,
        adjoint_max_iter=400,
        phantom_steps=200,
        phantom_damping=1.0,
    )


def fixed_point(f, args, backward, z0=None, **config_kw):
    """deq_fixed_point in a backward mode of BACKWARDS (``*_probe``: with a probe)."""
    probe = jnp.zeros(2) if backward.endswith("_probe") else None
    z0 = jnp.zeros(N) if z0 is None else z0
    return deq_fixed_point(f, z0, args, config(backward, **config_kw), backward_probe=probe)


# --- 1. closures -------------------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
def test_closed_over_parameters_get_the_gradient_of_args(backward, x64):
    """A cell that closes over W and x gets the same gradients as one that takes them
    in args, in every backward mode (before: exactly 0 for the closure)."""
    a, b = problem()
    passed = lambda W, x: jnp.sum(
        fixed_point(lambda z, p: jnp.tanh(p[0] @ z + p[1]), (W, x), backward)[0] ** 2
    )
    closed = lambda W, x: jnp.sum(
        fixed_point(lambda z, _: jnp.tanh(W @ z + x), (), backward)[0] ** 2
    )
    g_passed = jax.jit(jax.grad(passed, argnums=(0, 1)))(a, b)
    g_closed = jax.jit(jax.grad(closed, argnums=(0, 1)))(a, b)
    assert float(jnp.linalg.norm(g_passed[0])) > 0.1
    for x, y in zip(g_closed, g_passed):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_closure_negative_control(x64, monkeypatch):
    """Without closure conversion the closed-over input gets a zero gradient: the
    test above would fail on such an implementation."""
    a, b = problem()
    closed = lambda x: jnp.sum(
        deq_fixed_point(lambda z, _: jnp.tanh(a @ z + x), jnp.zeros(N), ())[0]
    )
    assert float(jnp.linalg.norm(jax.grad(closed)(b))) > 0.1
    monkeypatch.setattr(jax, "closure_convert", lambda f, *example: (f, []))
    assert float(jnp.linalg.norm(jax.grad(closed)(b))) == 0.0


def test_closure_under_vmap_jvp_and_in_a_flax_cell(x64):
    """Closed-over tracers of vmap and jvp, and a Flax cell whose input is closed over."""
    a, b = problem()
    bs = b + jax.random.normal(jax.random.PRNGKey(2), (3, N))
    z_of = lambda x: deq_fixed_point(lambda z, _: jnp.tanh(a @ z + x), jnp.zeros(N), ())[0]
    ref = lambda x: deq_fixed_point(lambda z, p: jnp.tanh(a @ z + p), jnp.zeros(N), x)[0]
    # (the transforms jitted throughout: compile time; an eager call compiles every
    # primitive, the solver's loops included, on its own)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.jacfwd(z_of)))(bs), jax.jit(jax.vmap(jax.jacfwd(ref)))(bs), atol=1e-11
    )

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, u):
            return jnp.tanh(nn.Dense(N, use_bias=False, param_dtype=jnp.float64)(z) + u)

    layer = DEQ(Cell(), config())
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), bs)
    gx = jax.jit(jax.grad(lambda x: jnp.sum(layer.apply(params, x)[0] ** 2)))(bs)
    cell = lambda z, x: jnp.tanh(z @ params["params"]["cell"]["Dense_0"]["kernel"] + x)
    ref_g = jax.jit(
        jax.grad(
            lambda x: jnp.sum(
                jax.vmap(lambda xi: deq_fixed_point(cell, jnp.zeros(N), xi, config())[0])(x) ** 2
            )
        )
    )(bs)
    np.testing.assert_allclose(gx, ref_g, rtol=1e-9)


# --- 2. higher-order derivatives ---------------------------------------------------


@pytest.mark.parametrize("backward", ["implicit", "implicit_probe", "unroll"])
@pytest.mark.parametrize("adjoint", ["auto", "anderson", "gmres"])
def test_hessian_of_an_affine_fixed_point_is_analytic(backward, adjoint, x64):
    """z* = M b, M = (I − A)⁻¹: the Hessian of ‖z*‖² in b is 2 MᵀM (before: exactly 0),
    by forward-over-reverse and reverse-over-reverse."""
    if backward == "unroll" and adjoint != "auto":
        pytest.skip("unroll has no adjoint solve")
    a, b = problem()
    m = jnp.linalg.inv(jnp.eye(N) - a)
    loss = lambda b: jnp.sum(
        fixed_point(lambda z, p: a @ z + p, b, backward, adjoint=adjoint)[0] ** 2
    )
    exact = 2 * m.T @ m
    # (one jitted program: an eager Hessian compiles every primitive on its own, ~3x the
    # compile time of the program)
    hess, rev_rev = jax.jit(lambda b: (jax.hessian(loss)(b), jax.jacrev(jax.grad(loss))(b)))(b)
    np.testing.assert_allclose(hess, exact, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(rev_rev, exact, rtol=1e-8, atol=1e-10)


def _tanh_loss(backward):
    a, _ = problem()

    def loss(x):
        z = fixed_point(lambda z, p: jnp.tanh(a @ z + p), x, backward)[0]
        return jnp.sum(jnp.sin(z) * jnp.arange(1.0, N + 1))

    return loss


@pytest.mark.parametrize("backward", ["implicit", "implicit_probe"])
def test_hessian_hvp_and_double_backprop_on_tanh_match_converged_unrolling(backward, x64):
    """On z = tanh(Az + x) the implicit Hessian, HVP (jvp of grad, grad of grad) and the
    gradient of an input-gradient-norm penalty equal those of 400 unrolled steps
    (converged to 1e-13: their derivatives converge too)."""
    _, b = problem()
    implicit, unrolled = _tanh_loss(backward), _tanh_loss("unroll")
    v = jax.random.normal(jax.random.PRNGKey(5), (N,))
    penalty = lambda fn, b: jax.grad(lambda x: jnp.sum(jax.grad(fn)(x) ** 2))(b)

    @jax.jit  # every derivative in one program: compile time (eager: ~2x, apart: ~1.5x)
    def derivatives(b):
        return {
            "h_ref": jax.hessian(unrolled)(b),
            "h": jax.hessian(implicit)(b),
            "hvp_fwd": jax.jvp(jax.grad(implicit), (b,), (v,))[1],
            "hvp_rev": jax.grad(lambda x: jnp.dot(jax.grad(implicit)(x), v))(b),
            "penalty": penalty(implicit, b),
            "penalty_ref": penalty(unrolled, b),
        }

    d = derivatives(b)
    h_ref = d["h_ref"]
    assert float(jnp.abs(h_ref).max()) > 0.1
    np.testing.assert_allclose(d["h"], h_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d["hvp_fwd"], h_ref @ v, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d["hvp_rev"], h_ref @ v, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d["penalty"], d["penalty_ref"], rtol=1e-8, atol=1e-10)


def test_input_gradient_penalty_through_the_flax_deq(x64):
    """Double backprop through the Flax DEQ (which always passes a backward probe) equals
    the unrolled model's (before: a while_loop reverse-mode crash)."""

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, u):
            return jnp.tanh(nn.Dense(N, use_bias=False, param_dtype=jnp.float64)(z) * 0.5 + u)

    x = jax.random.normal(jax.random.PRNGKey(3), (2, N))
    layer = DEQ(Cell(), config())
    params = jax.jit(layer.init)(jax.random.PRNGKey(0), x)

    def penalty_grad(backward):
        # the unrolled reference: 400 plain iterations (tol 0; its derivatives converge
        # more slowly than its iterates, and an unrolled Anderson past convergence
        # differentiates a degenerate least-squares problem)
        cfg = config(backward)
        if backward == "unroll":
            cfg = config(backward, method="fixed_point", tol=0.0)

        def penalty(params):
            g = jax.grad(lambda x: jnp.sum(jnp.sin(layer.apply(params, x, config=cfg)[0])))(x)
            return jnp.sum(g**2)

        return jax.jit(jax.grad(penalty))(params)  # (jit: compile time)

    got, ref = penalty_grad("implicit"), penalty_grad("unroll")
    leaves = jax.tree.leaves(jax.tree.map(lambda p, q: float(jnp.abs(p - q).max()), got, ref))
    assert max(leaves) < 1e-9, leaves
    assert float(jnp.abs(jax.tree.leaves(ref)[0]).max()) > 1e-3


# --- 3. pytree states, aux, args of any kind ---------------------------------------


@pytest.mark.parametrize(
    "method,backward",
    [(m, "implicit") for m in SOLVERS] + [("anderson", "implicit_probe"), ("anderson", "unroll")],
)
def test_pytree_state_equals_the_flat_solve(method, backward, x64):
    """A dict state {"u": (2,), "v": (2, 2)} gives the fixed point and gradient of the
    same map on the flat (6,) vector."""
    a, b = problem()

    def flat_cell(z, p):
        return jnp.tanh(p[0] @ z + p[1])

    def tree_cell(zt, p):
        z = jnp.concatenate([zt["u"], zt["v"].reshape(-1)])
        out = flat_cell(z, p)
        return {"u": out[:2], "v": out[2:].reshape(2, 2)}

    z0 = {"u": jnp.zeros(2), "v": jnp.zeros((2, 2))}

    def losses(b):
        zt = fixed_point(tree_cell, (a, b), backward, z0=z0, method=method)[0]
        zf = fixed_point(flat_cell, (a, b), backward, method=method)[0]
        tree_loss = jnp.sum(jnp.sin(zt["u"])) + jnp.sum(zt["v"] ** 2)
        flat_loss = jnp.sum(jnp.sin(zf[:2])) + jnp.sum(zf[2:] ** 2)
        return tree_loss, flat_loss

    # (one jitted program: compile time)
    (lt, lf), gt, gf = jax.jit(
        lambda b: (
            losses(b),
            jax.grad(lambda b: losses(b)[0])(b),
            jax.grad(lambda b: losses(b)[1])(b),
        )
    )(b)
    np.testing.assert_allclose(lt, lf, rtol=1e-12)
    np.testing.assert_allclose(gt, gf, rtol=1e-9, atol=1e-12)


def test_has_aux_returns_the_aux_at_the_fixed_point_and_differentiates_it(x64):
    a, b = problem()

    def cell(z, p):
        out = jnp.tanh(p[0] @ z + p[1])
        return out, {"energy": jnp.sum(out**2)}

    (z, aux), stats = deq_fixed_point(cell, jnp.zeros(N), (a, b), config(), has_aux=True)
    assert bool(stats.converged)
    np.testing.assert_allclose(aux["energy"], jnp.sum(z**2), rtol=1e-12)
    g_aux = jax.grad(
        lambda b: deq_fixed_point(cell, jnp.zeros(N), (a, b), config(), has_aux=True)[0][1][
            "energy"
        ]
    )(b)
    g_ref = jax.grad(
        lambda b: jnp.sum(
            deq_fixed_point(lambda z, p: cell(z, p)[0], jnp.zeros(N), (a, b), config())[0] ** 2
        )
    )(b)
    np.testing.assert_allclose(g_aux, g_ref, rtol=1e-9)
    with pytest.raises(TypeError, match="has_aux=True"):
        deq_fixed_point(lambda z, p: cell(z, p)[0], jnp.zeros(N), (a, b), config(), has_aux=True)


def test_functions_and_strings_among_args_are_constants(x64):
    a, b = problem()
    args = {"act": jnp.tanh, "name": "cell", "scale": 1.0, "a": a, "b": b, "n": jnp.asarray(2)}
    cell = lambda z, p: p["act"](p["scale"] * p["a"] @ z + p["b"] * p["n"])
    z, _ = deq_fixed_point(cell, jnp.zeros(N), args, config())
    ref, _ = deq_fixed_point(
        lambda z, p: jnp.tanh(p[0] @ z + 2 * p[1]), jnp.zeros(N), (a, b), config()
    )
    np.testing.assert_allclose(z, ref, rtol=1e-12)
    g = jax.grad(
        lambda b: jnp.sum(deq_fixed_point(cell, jnp.zeros(N), {**args, "b": b}, config())[0])
    )(b)
    assert float(jnp.abs(g).max()) > 0.1


def test_state_structure_errors():
    with pytest.raises(TypeError, match="complex"):
        deq_fixed_point(lambda z, _: z, jnp.zeros(3, jnp.complex64), ())
    with pytest.raises(ValueError, match="float array"):
        deq_fixed_point(lambda z, _: z, jnp.zeros(3, jnp.int32), ())
    with pytest.raises(TypeError, match="same structure as z0"):
        deq_fixed_point(lambda z, _: (z["a"], z["b"]), {"a": jnp.zeros(2), "b": jnp.zeros(2)}, ())


# --- 4. mixed precision ------------------------------------------------------------


LOW_PRECISION_CASES = [(m, "implicit", jnp.bfloat16) for m in SOLVERS] + [
    ("anderson", b, d)
    for b, d in [
        ("implicit_probe", jnp.bfloat16),
        ("phantom", jnp.bfloat16),
        ("unroll", jnp.bfloat16),
        ("implicit", jnp.float16),
        ("implicit_probe", jnp.float16),
    ]
]


@pytest.mark.parametrize("method,backward,dtype", LOW_PRECISION_CASES)
def test_low_precision_state_and_parameters(method, backward, dtype):
    """bf16/f16 states and parameters: the solver iterates in float32 (Anderson's small
    system, Broyden's updates, norms), returns the state's dtype, and lands within the
    low precision's rounding of the float32 fixed point; gradients come back in the
    parameters' dtype and close to float32's."""
    a, b = problem()
    cfg = DEQConfig(
        forward=SolverConfig(method=method, max_iter=60, tol=1e-2),
        backward=backward.removesuffix("_probe"),
        phantom_steps=5,
    )
    probe = jnp.zeros(2) if backward.endswith("_probe") else None

    def loss(p, dt):
        z, st = deq_fixed_point(
            lambda z, p: jnp.tanh(p[0] @ z + p[1]), jnp.zeros(N, dt), p, cfg, backward_probe=probe
        )
        return jnp.sum(z.astype(jnp.float32) ** 2), (z, st)

    p32 = (a, b)
    plow = jax.tree.map(lambda x: x.astype(dtype), p32)
    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)  # (compile time)
    (l_low, (z_low, st)), g_low = vg(plow, dtype)
    (l32, (z32, _)), g32 = vg(p32, jnp.float32)
    assert z_low.dtype == dtype and g_low[0].dtype == dtype
    assert bool(st.converged) and bool(jnp.all(jnp.isfinite(z_low)))
    np.testing.assert_allclose(z_low.astype(jnp.float32), z32, atol=0.05)
    np.testing.assert_allclose(
        g_low[1].astype(jnp.float32), g32[1], atol=0.1 * float(jnp.abs(g32[1]).max())
    )


# --- 7. defaults for every size: the dense adjoint ---------------------------------


def test_auto_adjoint_is_dense_for_small_states_and_exact(x64):
    a, b = problem()
    assert adjoint_method(DEQConfig(), N) == "dense"
    assert adjoint_method(DEQConfig(), DENSE_ADJOINT_MAX_SIZE + 1) == "anderson"
    assert adjoint_method(DEQConfig(adjoint_solver="gmres"), N) == "gmres"
    cfg = DEQConfig(forward=SolverConfig(max_iter=200, tol=1e-13, stop_mode="abs"))
    loss = lambda b, probe: jnp.dot(
        jnp.arange(1.0, N + 1),
        deq_fixed_point(lambda z, p: a @ z + p, jnp.zeros(N), b, cfg, backward_probe=probe)[0],
    )
    gb, stats = jax.grad(loss, argnums=(0, 1))(b, jnp.zeros(2))
    exact = jnp.linalg.solve(jnp.eye(N) - a.T, jnp.arange(1.0, N + 1))
    np.testing.assert_allclose(gb, exact, rtol=1e-12)
    assert float(stats[0]) < 1e-13 and int(stats[1]) == 1  # one factorisation


def test_solver_state_under_strict_promotion_in_float64(x64):
    """Anderson's history mask, step budgets and trajectories mix no integer widths."""
    a, b = problem()
    for method in SOLVERS:
        z, st = solve(
            lambda z: jnp.tanh(a @ z + b),
            jnp.zeros(N),
            SolverConfig(method=method, tol=1e-10),
            return_trajectory=True,
            num_steps=jnp.asarray(20),
        )
        assert st.trajectory.shape == (30, N) and int(st.steps) <= 20
