"""LyaDEQ: Lyapunov function, projected dynamics, orthogonal layer, model (SPEC §2)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deqjax.deq import DEQConfig
from deqjax.deq_gradients import AttackView
from deqjax.lyapunov import (
    check_positive_definite,
    icnn_apply,
    icnn_init,
    lyapunov_value,
    project_dynamics,
    projected_dynamics,
    rehu,
    stability_check,
)
from deqjax.models import DEQ
from deqjax.models.lyadeq import LyaDEQClassifier, LyapunovCell, lyadeq_stability_check
from deqjax.orthogonal import (
    ORTHOGONAL_KINDS,
    OrthogonalDense,
    orthogonal_init,
    orthogonal_matrix,
    orthogonality_error,
)
from deqjax.solvers import SolverConfig

DIM, XDIM = 6, 3
N_STATES = 4000


def dynamics(weights):
    """A random nonlinear residual dynamics F(z; x) = tanh(A z + B x + c) − z."""
    a, b, c = weights
    return lambda z, x: jnp.tanh(a @ z + b @ x + c) - z


@jax.jit
def _setup(key):
    """Random dynamics weights, ICNN params, states (several scales) and inputs, in
    the default float dtype (jitted: one compile instead of dozens of eager ops)."""
    ka, kb, kc, kp, kz, kx, ks = jax.random.split(key, 7)
    dt = jnp.zeros(()).dtype
    weights = (
        2.0 * jax.random.normal(ka, (DIM, DIM), dt),
        jax.random.normal(kb, (DIM, XDIM), dt),
        jax.random.normal(kc, (DIM,), dt),
    )
    params = icnn_init(kp, DIM, (16, 16), dt)
    scale = 10.0 ** jax.random.uniform(ks, (N_STATES, 1), dt, -3.0, 1.5)
    return (
        weights,
        params,
        scale * jax.random.normal(kz, (N_STATES, DIM), dt),
        jax.random.normal(kx, (N_STATES, XDIM), dt),
    )


def setup(seed=0):
    weights, params, zs, xs = _setup(jax.random.PRNGKey(seed))
    return dynamics(weights), params, zs, xs


def lyapunov_derivative(F, params, zs, xs, alpha, projected, activation="softplus"):
    """(∇Vᵀ F̂ (or ∇Vᵀ F), V, ‖∇V‖‖F‖) at every (z, x)."""

    def one(z, x):
        v, gv = jax.value_and_grad(lambda s: lyapunov_value(params, s, 0.01, 1.0, activation))(z)
        fh = (
            projected_dynamics(F, params, z, x, alpha, 0.01, 1.0, activation)
            if projected
            else F(z, x)
        )
        return gv @ fh, v, jnp.linalg.norm(gv) * jnp.linalg.norm(F(z, x))

    return jax.vmap(one)(zs, xs)


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["softplus", "rehu"])
def test_projected_dynamics_decrease_v(dtype_name, activation, request):
    if dtype_name == "float64":
        request.getfixturevalue("x64")
    dtype = jnp.dtype(dtype_name)
    assert jnp.zeros((), dtype).dtype == dtype
    alpha = 0.5
    F, params, zs, xs = setup()
    assert zs.dtype == dtype and params[0]["W"].dtype == dtype
    dv, v, size = jax.jit(
        lambda zs, xs: lyapunov_derivative(F, params, zs, xs, alpha, True, activation)
    )(zs, xs)
    assert dv.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    # rounding tolerance relative to the size of the terms that cancel: ‖∇V‖‖F‖ + αV
    tol = 20 * eps * (size + alpha * v)
    dv_raw, _, _ = jax.jit(
        lambda zs, xs: lyapunov_derivative(F, params, zs, xs, alpha, False, activation)
    )(zs, xs)
    assert bool(jnp.all(jnp.isfinite(dv)))
    assert bool(jnp.all(dv <= -alpha * v + tol)), float(jnp.max(dv + alpha * v - tol))
    # negative control: the unprojected dynamics violate the decrease somewhere
    assert bool(jnp.any(dv_raw > -alpha * v + 1e-3))


def test_rehu_pieces():
    s = jnp.array([-2.0, 0.0, 0.5, 1.0, 3.0])
    np.testing.assert_allclose(rehu(s, 1.0), [0.0, 0.0, 0.125, 0.5, 2.5])
    np.testing.assert_allclose(rehu(jnp.array(0.3), 2.0), 0.3**2 / 4)
    # C¹: derivative continuous at d
    g = jax.vmap(jax.grad(lambda s: rehu(s, 2.0)))(jnp.array([2.0 - 1e-4, 2.0 + 1e-4]))
    np.testing.assert_allclose(g, [1.0, 1.0], atol=1e-3)
    with pytest.raises(ValueError, match="d must be > 0"):
        rehu(s, 0.0)


def test_v_positive_definite_and_g_convex(x64):
    _, params, zs, _ = setup(1)
    zs = zs[:2000]
    report = check_positive_definite(params, zs)
    assert report["v0"] == 0.0 and report["min_v"] > 0
    # V ≥ η‖z‖² (ReHU ≥ 0) is the positive-definiteness bound
    assert report["min_v_over_sq_norm"] >= 0.01 * (1 - 1e-9)
    # g convex: midpoint inequality on random pairs
    a, b = zs[:1000], zs[1000:]
    g = jax.jit(jax.vmap(lambda z: icnn_apply(params, z)))
    assert bool(jnp.all(g((a + b) / 2) <= (g(a) + g(b)) / 2 + 1e-10))
    # negative control: a concave function (−g) fails the same midpoint check
    gn = lambda z: -g(z)
    assert bool(jnp.any(gn((a + b) / 2) > (gn(a) + gn(b)) / 2 + 1e-10))


def test_check_positive_definite_raises_on_bad_v():
    _, params, _, _ = setup()
    zs = jnp.ones((3, DIM))
    # float32 underflow makes V(z) = 0 at a tiny non-zero z: the check must catch it
    zero = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="not positive"):
        check_positive_definite(zero, 1e-30 * zs, eta=1e-10)
    with pytest.raises(ValueError, match="eta must be > 0"):
        lyapunov_value(params, zs[0], eta=0.0)


def test_projection_at_origin_is_finite_with_gradients():
    F, params, _, _ = setup()
    x = jnp.ones(XDIM)
    z0 = jnp.zeros(DIM)
    out = jax.jit(projected_dynamics, static_argnums=0)(F, params, z0, x, 0.5)
    np.testing.assert_allclose(out, F(z0, x), rtol=1e-6)  # no correction at ∇V = 0
    jac = jax.jit(jax.jacrev(lambda z: projected_dynamics(F, params, z, x, 0.5)))(z0)
    gp = jax.jit(jax.grad(lambda p: jnp.sum(projected_dynamics(F, p, z0, x, 0.5))))(params)
    assert bool(jnp.all(jnp.isfinite(jac)))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(gp))
    # the raw projection with ∇V = 0 and V = 0 too
    g = jax.grad(lambda gv: jnp.sum(project_dynamics(jnp.ones(3), gv, jnp.sum(gv**2), 1.0)))(
        jnp.zeros(3)
    )
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("kind", ORTHOGONAL_KINDS)
@pytest.mark.parametrize("n_out,n_in", [(8, 8), (12, 5), (5, 12)])
def test_orthogonal_layer_stays_orthogonal_under_adam(kind, n_out, n_in):
    layer = OrthogonalDense(n_out, kind)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, n_in))
    y_target = jax.random.normal(jax.random.PRNGKey(1), (16, n_out))
    params = layer.init(jax.random.PRNGKey(2), x)["params"]
    w = lambda p: orthogonal_matrix(p["orthogonal"], n_out, n_in, kind)
    assert float(orthogonality_error(w(params))) < 1e-5
    opt = optax.adam(0.1)
    state = opt.init(params)
    loss = lambda p: jnp.mean((layer.apply({"params": p}, x) ** 3 - y_target) ** 2)
    w0 = w(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(5):
        params, state = step(params, state)
    assert float(orthogonality_error(w(params))) < 1e-5
    assert float(jnp.max(jnp.abs(w(params) - w0))) > 1e-2  # it did move
    # the layer applies exactly that weight
    np.testing.assert_allclose(
        layer.apply({"params": params}, x), x @ w(params).T + params["bias"], rtol=1e-5, atol=1e-5
    )


def test_orthogonal_bad_input():
    with pytest.raises(ValueError, match="unknown orthogonal"):
        orthogonal_init(jax.random.PRNGKey(0), 3, 3, "qr")
    with pytest.raises(ValueError, match="must have shape"):
        orthogonal_matrix(jnp.zeros((4, 4)), 3, 5, "expm")
    # degenerate Householder vectors stay finite, gradients too
    g = jax.grad(lambda v: jnp.sum(orthogonal_matrix(v, 4, 4, "householder")))(jnp.zeros((4, 4)))
    assert bool(jnp.all(jnp.isfinite(g)))


def tiny_model(alpha, cfg):
    return LyaDEQClassifier(
        num_classes=3,
        width=4,
        inner=4,
        groups=2,
        icnn_widths=(8,),
        alpha=alpha,
        orth_features=6,
        deq=cfg,
    )


def tiny_params(model, x, injection_scale=10.0):
    """float params; the injection is scaled up so that the GroupNorm'd MDEQ cell is a
    contraction (a small random MDEQ cell is not, and its solve does not converge)."""
    p = model.init(jax.random.PRNGKey(1), x)["params"]
    p = jax.tree.map(lambda a: a.astype(x.dtype), p)
    p["injection"]["conv"]["kernel"] = injection_scale * p["injection"]["conv"]["kernel"]
    return p


def test_alpha_positive_projected_dynamics_have_no_root_and_say_so(x64):
    """For α > 0, ∇VᵀF̂ ≤ −αV < 0 at every z ≠ 0 and F̂(0) = f(0, u) ≠ 0, so the
    projected dynamics of SPEC §2 have no root (an open issue, see README): the solver
    must report non-convergence instead of returning a silent 'equilibrium'."""
    cfg = DEQConfig(
        forward=SolverConfig("anderson", max_iter=40, tol=1e-8, stop_mode="abs"), backward="phantom"
    )
    model = tiny_model(0.5, cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1), jnp.float64)
    params = tiny_params(model, x)
    _, stats = model.apply({"params": params}, x)
    assert not bool(jnp.any(stats.converged))
    assert float(jnp.min(stats.abs_residual)) > 1e-4


def test_stability_check_same_equilibrium_and_negative_control():
    cfg = DEQConfig(forward=SolverConfig(max_iter=80, tol=1e-6, stop_mode="abs"))
    model = tiny_model(0.0, cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    params = tiny_params(model, x)
    z_star, rep = jax.jit(
        lambda p, x, k: lyadeq_stability_check(model, {"params": p}, x, k, n_perturb=8, scale=0.5)
    )(params, x, jax.random.PRNGKey(3))
    assert z_star.shape == (2, 4, 4, 4) and rep.distances.shape == (2, 8)
    assert bool(jnp.all(rep.initial_distance > 1.0))  # the starts really were far
    assert bool(jnp.all(rep.fraction_converged == 1.0))
    assert bool(jnp.all(rep.max_relative < 1e-4)), rep.max_relative
    # negative control: an expanding map z ↦ 2z − 1 (fixed point 1, unstable)
    bad = stability_check(
        lambda z, a: 2.0 * z - a,
        jnp.ones(3),
        1.0,
        jax.random.PRNGKey(0),
        4,
        0.1,
        SolverConfig("fixed_point", max_iter=20, tol=1e-6),
    )
    # (the solver returns its best iterate, near the start: no convergence, large spread)
    assert float(bad.fraction_converged) == 0.0 and float(bad.max_relative) > 1e-2


def test_lyadeq_spurious_roots_are_reported_not_converged(x64):
    """At α = 0 the projection also stops the flow wherever F is a positive multiple of
    ∇V (the uphill direction): such points are roots of F̂ but not equilibria of the
    base cell, and the IFT on the base cell would be wrong there. A tanh cell started
    from 0 lands on one; the solve must say it did not converge."""
    import flax.linen as nn

    class TanhCell(nn.Module):
        @nn.compact
        def __call__(self, z, u):
            w = self.param(
                "w", lambda k: 0.3 * jax.random.normal(k, (6, 6), jnp.float64) / jnp.sqrt(6.0)
            )
            return jnp.tanh(z @ w + u)

    cfg = DEQConfig(forward=SolverConfig("anderson", max_iter=200, tol=1e-11, stop_mode="abs"))
    layer = DEQ(LyapunovCell(TanhCell(), (16,), alpha=0.0), cfg)
    u = jax.random.normal(jax.random.PRNGKey(0), (3, 6), jnp.float64)
    variables = layer.init(jax.random.PRNGKey(1), u)
    z, stats = layer.apply(variables, u)
    base = TanhCell().apply({"params": variables["params"]["cell"]["base_cell"]}, z, u)
    projected_res = stats.abs_residual
    base_res = jnp.linalg.norm(base - z, axis=-1)
    spurious = (projected_res < 1e-10) & (base_res > 1e-6)
    assert bool(jnp.any(spurious)), (projected_res, base_res)
    assert not bool(jnp.any(stats.converged & spurious))
    # The same on the LyaDEQ classifier: the projected solve from z₀ = 0 stalls on a
    # root of F̂ short of the base cell's root (V may not increase, and V(0) = 0 < V(z*)).
    model = tiny_model(0.0, dataclasses.replace(cfg, backward="phantom"))
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1), jnp.float64)
    _, stats = model.apply({"params": tiny_params(model, x)}, x)
    assert bool(jnp.all(stats.abs_residual < 1e-8)) and not bool(jnp.any(stats.converged))


def test_implicit_gradient_never_reaches_the_lyapunov_function(x64):
    """α = 0 with the implicit backward: at a root of the base cell the projection is
    inactive, so z* does not depend on V and the ICNN's gradient is exactly zero (README,
    "LyaDEQ": the Lyapunov function is not trained this way), while the base cell's is not."""
    cfg = DEQConfig(forward=SolverConfig("anderson", max_iter=60, tol=1e-10, stop_mode="abs"))
    model = tiny_model(0.0, cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1), jnp.float64)
    params = tiny_params(model, x)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)[0])))(params)
    cell = g["equilibrium"]["cell"]
    assert all(float(jnp.max(jnp.abs(l))) == 0.0 for l in jax.tree.leaves(cell["icnn"]))
    assert sum(float(jnp.sum(jnp.abs(l))) for l in jax.tree.leaves(cell["base_cell"])) > 1e-3


def test_lyadeq_alpha_positive_refuses_implicit_gradient():
    cfg = DEQConfig(forward=SolverConfig("anderson", max_iter=5))
    phantom = dataclasses.replace(cfg, backward="phantom")
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    params = tiny_params(tiny_model(0.5, phantom), x)
    model = tiny_model(0.5, cfg)  # the config asks for the implicit backward
    with pytest.raises(ValueError, match="no equilibrium to differentiate implicitly"):
        model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="no equilibrium to differentiate implicitly"):
        model.apply({"params": params}, x)
    with pytest.raises(ValueError, match="no equilibrium to differentiate implicitly"):
        model.apply({"params": params}, x, config=cfg, view=AttackView("implicit"))
    g = jax.grad(lambda xx: jnp.sum(model.apply({"params": params}, xx, config=phantom)[0]))(x)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_finite_step_lyadeq_gradient_matches_finite_differences(x64, alpha):
    """What a LyaDEQ computes (README, "LyaDEQ"): K steps of the projected dynamics
    from z₀ = 0. With a fixed step count (tol 0) and the unrolled backward, the loss is
    a piecewise-smooth function of the parameters and its gradient must match central
    differences along random directions (float64). The *implicit* gradient of SPEC §2
    has no equilibrium to differentiate (α > 0) or stops on spurious roots (α = 0); see
    the two tests above."""
    cfg = DEQConfig(
        forward=SolverConfig("fixed_point", max_iter=8, tol=0.0, return_state="last"),
        backward="unroll",
    )
    model = tiny_model(alpha, cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1), jnp.float64)
    y = jnp.array([0, 2])
    params = tiny_params(model, x)
    # Zero-initialised biases put the first step (z₀ = 0) exactly on the ReLU kinks
    # of the MDEQ cell (GroupNorm of a constant is 0); a trained model is not there.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    params = jax.tree.unflatten(
        treedef, [l + 0.1 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    )

    def loss(p):
        logits = model.apply({"params": p}, x)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grad = jax.jit(jax.grad(loss))(params)
    leaves, treedef = jax.tree.flatten(params)
    for seed in range(3):
        keys = jax.random.split(jax.random.PRNGKey(10 + seed), len(leaves))
        d = jax.tree.unflatten(
            treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
        )
        plus = jax.tree.map(lambda p, v: p + 1e-5 * v, params, d)
        minus = jax.tree.map(lambda p, v: p - 1e-5 * v, params, d)
        fd = (loss(plus) - loss(minus)) / (2 * 1e-5)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-5, atol=1e-8)
