"""LyaDEQ: Lyapunov function, projected dynamics, orthogonal layer, model (Chu et al. 2024)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deqjax.deq import damped_steps
from deqjax.deq_gradients import AttackView
from deqjax.lyapunov import (
    check_positive_definite,
    icnn_apply,
    icnn_init,
    lyapunov_along,
    lyapunov_value,
    project_dynamics,
    projected_dynamics,
    rehu,
    stability_check,
)
from deqjax.models import DEQ
from deqjax.models.lyadeq import (
    LyaDEQClassifier,
    LyapunovCell,
    finite_time_config,
    lyadeq_stability_check,
)
from deqjax.orthogonal import (
    ORTHOGONAL_KINDS,
    OrthogonalDense,
    orthogonal_init,
    orthogonal_matrix,
    orthogonality_error,
)
from deqjax.solvers import solve

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


def test_icnn_has_no_dead_output_bias():
    """The paper's output bias b_k of g cancels in g(z) − g(0): V cannot depend on it, so
    it is not a parameter (it could never be trained)."""
    params = icnn_init(jax.random.PRNGKey(0), DIM, (8, 8))
    assert set(params[-1]) == {"W", "U"} and all("b" in layer for layer in params[:-1])


def euler_trajectory(F, params, z0, x, alpha, h, steps, projected=True):
    """z_{k+1} = z_k + h F̂(z_k; x) (or h F without the projection), states z_0 … z_K."""

    def step(z, _):
        dz = projected_dynamics(F, params, z, x, alpha) if projected else F(z, x)
        z = z + h * dz
        return z, z

    _, zs = jax.lax.scan(step, z0, None, length=steps)
    return jnp.concatenate([z0[None], zs])


def test_euler_steps_decrease_v_only_when_small(x64):
    """dV/dt ≤ −αV is a property of the flow: tiny Euler steps of F̂ never increase V
    (200 random starts with 1 ≤ ‖z‖ ≤ 30, 20 steps of h = 1e-6), large ones do
    (h = 1.5), and so do tiny steps of the unprojected F (negative control).
    (Near z = 0 even tiny steps can increase V: F̂(0) = F(0) ≠ 0 while V and ∇V → 0.)
    lyapunov_along counts the increases."""
    F, params, zs, xs = setup(2)
    norms = jnp.linalg.norm(zs, axis=1)
    keep = jnp.nonzero((norms >= 1) & (norms <= 30), size=200)[0]
    zs, xs = zs[keep], xs[keep]
    alpha = 0.5

    @functools.partial(jax.jit, static_argnums=1)
    def increases(h, projected):
        traj = jax.vmap(lambda z, x: euler_trajectory(F, params, z, x, alpha, h, 20, projected))(
            zs, xs
        )
        values, inc = jax.vmap(lambda t: lyapunov_along(params, t))(traj)
        return values, inc

    values, inc = increases(1e-6, True)
    assert values.shape == (200, 21) and inc.shape == (200, 20)
    np.testing.assert_allclose(values[:, 0], jax.vmap(lambda z: lyapunov_value(params, z))(zs))
    np.testing.assert_array_equal(inc, values[:, 1:] > values[:, :-1])
    assert not bool(jnp.any(inc))
    assert bool(jnp.any(increases(1.5, True)[1]))
    assert bool(jnp.any(increases(1e-6, False)[1]))
    with pytest.raises(ValueError, match="trajectory"):
        lyapunov_along(params, zs[0])


def test_stability_check_measures_the_spread_of_final_states():
    """Analytic: K steps of z ← c z + a map a start perturbation δ to c^K δ, so every
    distance is c^K ‖δ‖ and the contraction is c^K (c = 0.5: shrinks, c = 2: grows)."""
    a = jnp.arange(5.0)

    def run_with(c, steps=4):
        return lambda z0: damped_steps(lambda z, _: c * z + a, z0, None, steps, 1.0)

    z0 = jnp.ones(5)
    for c in (0.5, 2.0):
        rep = stability_check(run_with(c), z0, jax.random.PRNGKey(0), 8, 0.3)
        assert rep.distances.shape == (8,)
        np.testing.assert_allclose(rep.contraction, c**4, rtol=1e-5)
        starts = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (8, 5))
        np.testing.assert_allclose(rep.distances, c**4 * jnp.linalg.norm(starts, axis=1), rtol=1e-5)
        assert float(rep.max_distance) >= float(rep.mean_distance)
    with pytest.raises(ValueError, match="n_perturb"):
        stability_check(run_with(0.5), z0, jax.random.PRNGKey(0), 0)


def tiny_model(alpha=2.0, steps=6, step_size=0.5, backward="unroll", phantom_steps=2):
    return LyaDEQClassifier(
        num_classes=3,
        width=4,
        inner=4,
        groups=2,
        icnn_widths=(8,),
        alpha=alpha,
        orth_features=6,
        steps=steps,
        step_size=step_size,
        backward=backward,
        phantom_steps=phantom_steps,
    )


def tiny_params(model, x, scale=0.1):
    """Float params of ``x``'s dtype, every leaf moved by ``scale``·N(0, 1): zero biases
    put the first step (z₀ = 0) exactly on the ReLU kinks of the MDEQ cell (GroupNorm
    of a constant is 0); a trained model is not there."""
    p = model.init(jax.random.PRNGKey(1), x)["params"]
    leaves, treedef = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            (l + scale * jax.random.normal(k, l.shape, l.dtype)).astype(x.dtype)
            for k, l in zip(keys, leaves)
        ],
    )


def tiny_batch(dtype=jnp.float32):
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 1), dtype)
    return x, jnp.array([0, 2, 1, 0])


def test_lyadeq_is_k_steps_from_zero():
    """The model's output is z_K of z_{k+1} = z_k + h F̂(z_k) from z₀ = 0 (checked
    against a plain loop over the cell), whatever the backward; steps = K, and
    'converged' means a finite K-step output."""
    x, _ = tiny_batch()
    model = tiny_model()
    params = tiny_params(model, x)

    @jax.jit  # the plain loop, written out (jitted: compile time, as the applies below)
    def plain(params):
        bound = model.bind({"params": params})
        u = bound.inject(x)
        cell = bound.equilibrium.cell
        z = jnp.zeros_like(u)
        for _ in range(model.steps):
            z = z + model.step_size * (cell(z, u) - z)
        return bound.classify(z)

    want = plain(params)
    for backward in ("unroll", "phantom"):
        m = tiny_model(backward=backward)
        logits, stats = jax.jit(lambda p, m=m: m.apply({"params": p}, x))(params)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
        assert bool(jnp.all(stats.steps == model.steps)) and bool(jnp.all(stats.converged))
    for view in ("unroll", "intermediate", "simultaneous_adjoint"):
        v = AttackView(view, state_index=2)
        logits, _ = jax.jit(lambda p, v=v: model.apply({"params": p}, x, view=v))(params)
        np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)
    # a call-time config may change the backward, not the K steps
    other = finite_time_config(model.steps + 1, model.step_size)
    with pytest.raises(ValueError, match="finite-time system of K = 6 steps"):
        model.apply({"params": params}, x, config=other)
    with pytest.raises(ValueError, match="1 <= phantom_steps < K"):
        finite_time_config(4, 1.0, "phantom", 4)
    with pytest.raises(ValueError, match="step size h"):
        finite_time_config(4, 1.5)


def test_implicit_backward_is_refused_naming_the_finite_time_definition():
    x, _ = tiny_batch()
    params = tiny_params(tiny_model(), x)
    for alpha in (0.0, 2.0):
        implicit = tiny_model(alpha, backward="implicit")
        with pytest.raises(ValueError, match="finite-time system"):
            implicit.init(jax.random.PRNGKey(0), x)
        with pytest.raises(ValueError, match="finite-time system"):
            implicit.apply({"params": params}, x)
        with pytest.raises(ValueError, match="finite-time system"):
            tiny_model(alpha).apply({"params": params}, x, view=AttackView("implicit"))
    # the DEQ layer refuses it for the bare cell too
    import flax.linen as nn

    class Tanh(nn.Module):
        @nn.compact
        def __call__(self, z, u):
            return jnp.tanh(z + u)

    layer = DEQ(LyapunovCell(Tanh(), (4,)), finite_time_config(3, 1.0, "implicit"))
    with pytest.raises(ValueError, match="finite-time system"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))


def _loss(model, params, x, y):
    logits = model.apply({"params": params}, x)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


@pytest.mark.parametrize("alpha", [pytest.param(0.0, marks=pytest.mark.e2e), 2.0])
def test_k_step_gradient_matches_finite_differences(x64, alpha):
    """The exact (unroll) gradient of the K-step model against central differences
    along random directions in parameter space (float64; the tiny random model is
    strongly curved, so the differences need a small step: 1e-7)."""
    x, y = tiny_batch(jnp.float64)
    model = tiny_model(alpha)
    params = tiny_params(model, x)
    loss = jax.jit(lambda p: _loss(model, p, x, y))  # (jit: six evaluations, one compile)
    grad = jax.jit(jax.grad(loss))(params)
    leaves, treedef = jax.tree.flatten(params)
    for seed in range(3):
        keys = jax.random.split(jax.random.PRNGKey(10 + seed), len(leaves))
        d = jax.tree.unflatten(
            treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
        )
        plus = jax.tree.map(lambda p, v: p + 1e-7 * v, params, d)
        minus = jax.tree.map(lambda p, v: p - 1e-7 * v, params, d)
        fd = (loss(plus) - loss(minus)) / (2 * 1e-7)
        analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(d)))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, atol=1e-8)


def test_phantom_backward_is_the_gradient_of_the_last_p_steps(x64):
    """backward='phantom' (p = 2 of K = 6): the gradient of z_K through the last p steps
    from stop_gradient(z_{K−p}), checked against that computation written out; it differs
    from the exact gradient (negative control)."""
    x, y = tiny_batch(jnp.float64)
    exact = tiny_model()
    phantom = tiny_model(backward="phantom", phantom_steps=2)
    params = tiny_params(exact, x)

    def reference(p):
        bound = exact.bind({"params": p})
        u = bound.inject(x)
        f = bound.equilibrium.cell_function()
        cell_p = p["equilibrium"]["cell"]
        cfg = finite_time_config(4, exact.step_size).forward

        def one(u_i):
            z, _ = solve(lambda z: f(z, jax.lax.stop_gradient((cell_p, u_i))), 0 * u_i, cfg)
            return damped_steps(f, jax.lax.stop_gradient(z), (cell_p, u_i), 2, exact.step_size)

        logits = bound.classify(jax.vmap(one)(u))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    g_phantom = jax.grad(lambda p: _loss(phantom, p, x, y))(params)
    g_ref = jax.grad(reference)(params)
    g_exact = jax.grad(lambda p: _loss(exact, p, x, y))(params)
    for a, b in zip(jax.tree.leaves(g_phantom), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)
    diff = sum(
        float(jnp.sum(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(g_phantom), jax.tree.leaves(g_exact))
    )
    assert diff > 1e-3


@pytest.mark.parametrize("backward", ["unroll", "phantom"])
def test_training_learns_the_lyapunov_function(backward):
    """A few Adam steps on a tiny LyaDEQ: every ICNN parameter V depends on gets a
    finite, non-zero gradient at every step and moves (issue #4 measured exactly zero
    with the implicit backward of the root formulation)."""
    x, y = tiny_batch()
    model = tiny_model(backward=backward)
    params = tiny_params(model, x)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: _loss(model, p, x, y))(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss, g

    p = params
    for _ in range(4):
        p, state, loss, g = step(p, state)
        for leaf in jax.tree.leaves(g["equilibrium"]["cell"]["icnn"]):
            assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.max(jnp.abs(leaf))) > 0
    for new, old in zip(
        jax.tree.leaves(p["equilibrium"]["cell"]["icnn"]),
        jax.tree.leaves(params["equilibrium"]["cell"]["icnn"]),
    ):
        assert float(jnp.max(jnp.abs(new - old))) > 1e-3


def test_lyadeq_stability_check_on_the_model():
    """V along the model's own trajectory (the first step from z₀ = 0 always increases
    it), the projection's correction per step, where the ICNN term is alive, and the
    spread over perturbed starts. (No "δ → 0 changes nothing" control: F̂ is
    discontinuous at z = 0, where ∇V = 0, so even a tiny δ can move z_K by O(1).)"""
    x, _ = tiny_batch()
    model = tiny_model()
    params = tiny_params(model, x)
    check = jax.jit(
        lambda p, k, s: lyadeq_stability_check(model, {"params": p}, x, k, n_perturb=5, scale=s)
    )
    st = check(params, jax.random.PRNGKey(3), 0.2)
    assert st.v_values.shape == (4, 7) and st.v_increases.shape == (4, 6)
    assert st.corrections.shape == (4, 6) and st.icnn_active.shape == (4, 6)
    assert bool(jnp.all(st.v_values[:, 0] == 0)) and bool(jnp.all(st.v_increases[:, 0]))
    assert bool(jnp.all(st.corrections >= 0))
    assert float(jnp.max(st.corrections)) > 0  # α = 2: the projection is active somewhere
    # the model's own output is the unperturbed reference
    np.testing.assert_allclose(
        jax.jit(lambda p, r: model.bind({"params": p}).classify(r))(params, st.spread.reference),
        jax.jit(lambda p: model.apply({"params": p}, x)[0])(params),
        rtol=1e-4,
    )
    assert st.spread.distances.shape == (4, 5) and st.changed_prediction.shape == (4, 5)
    assert bool(jnp.all(st.spread.initial_distance > 0))
    # each final state is the K steps of the cell from its start δ_j (written out)

    @jax.jit  # (jitted: compile time)
    def written_out(params):
        bound = model.bind({"params": params})
        cell, u = bound.equilibrium.cell, bound.inject(x)
        key1 = jax.random.split(jax.random.PRNGKey(3), 4)[1]
        z = 0.2 * jax.random.normal(key1, (5,) + u.shape[1:])
        for _ in range(model.steps):
            z = z + model.step_size * (cell(z, jnp.broadcast_to(u[1], z.shape)) - z)
        return z

    np.testing.assert_allclose(st.spread.finals[1], written_out(params), rtol=1e-4, atol=1e-4)
