"""Implicit, phantom and unrolled gradients of deq_fixed_point."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from deqjax import _jaxopt
from deqjax.conv import _conv, conv2d, conv2d_transpose
from deqjax.deq import (
    ADJOINT_SOLVERS,
    DEQConfig,
    deq_fixed_point,
    jacobian_frobenius_sq,
)
from deqjax.solvers import SolverConfig

N = 6


def problem():
    a = jax.random.normal(jax.random.PRNGKey(0), (N, N))
    a = 0.7 * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(1), (N,))
    return a, b


def cell(z, args):
    a, b = args
    return jnp.tanh(a @ z + b)


def loss(args, backward="implicit", adjoint="anderson", probe=None, max_iter=300):
    cfg = DEQConfig(
        forward=SolverConfig(max_iter=max_iter, tol=1e-13, stop_mode="abs"),
        backward=backward,
        adjoint_solver=adjoint,
        adjoint_tol=1e-13,
        adjoint_max_iter=300,
    )
    z, _ = deq_fixed_point(cell, jnp.zeros(N), args, cfg, backward_probe=probe)
    return jnp.sum(jnp.sin(z) * jnp.arange(1.0, N + 1))


@pytest.mark.parametrize("adjoint", ADJOINT_SOLVERS)
def test_implicit_gradient_matches_long_unroll(adjoint, x64):
    args = problem()
    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))  # (jit: compile time)
    g_unroll = grad(args, "unroll", "anderson")
    g = grad(args, "implicit", adjoint)
    for gi, gu in zip(g, g_unroll):
        np.testing.assert_allclose(gi, gu, atol=1e-9)


def test_implicit_gradient_finite_differences(x64):
    a, b = problem()
    # jitted: check_grads evaluates the function many times, and an eager call of the
    # solver's loop recompiles it each time
    f = jax.jit(lambda a, b: loss((a, b)))
    check_grads(f, (a, b), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_implicit_gradient_wrt_input_injection_finite_differences(x64):
    a, b = problem()
    x = jax.random.normal(jax.random.PRNGKey(3), (N,))
    f = jax.jit(lambda x: loss((a, b + jnp.sin(x))))  # (jit: see above)
    check_grads(f, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_implicit_gradient_matches_jaxopt_custom_root(x64):
    a, b = problem()
    cfg = SolverConfig(max_iter=300, tol=1e-13, stop_mode="abs")
    from deqjax.solvers import solve

    def solver(init, a, b):
        return solve(lambda z: cell(z, (a, b)), init, cfg)[0]

    ref = _jaxopt.custom_root_reference(lambda z, a, b: cell(z, (a, b)) - z, solver)
    ref_loss = lambda a, b: jnp.sum(jnp.sin(ref(jnp.zeros(N), a, b)) * jnp.arange(1.0, N + 1))
    g_ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(a, b)  # (jit: compile time)
    g = jax.jit(jax.grad(loss))((a, b))
    for gi, gr in zip(g, g_ref):
        np.testing.assert_allclose(gi, gr, atol=1e-9)


def test_phantom_gradient_is_autodiff_through_k_damped_steps(x64):
    args = problem()
    cfg = DEQConfig(
        forward=SolverConfig(max_iter=300, tol=1e-13),
        backward="phantom",
        phantom_steps=3,
        phantom_damping=0.5,
    )
    z_star, _ = deq_fixed_point(cell, jnp.zeros(N), args, DEQConfig(forward=cfg.forward))

    def manual(args):
        z = jax.lax.stop_gradient(z_star)
        for _ in range(3):
            z = 0.5 * z + 0.5 * cell(z, args)
        return jnp.sum(z**2)

    g = jax.grad(lambda p: jnp.sum(deq_fixed_point(cell, jnp.zeros(N), p, cfg)[0] ** 2))(args)
    g_ref = jax.grad(manual)(args)
    for gi, gr in zip(g, g_ref):
        np.testing.assert_allclose(gi, gr, rtol=1e-10)
    # K = 1, λ = 1 is the one-step gradient ∂f/∂θ at z*.
    one = DEQConfig(forward=cfg.forward, backward="phantom", phantom_steps=1, phantom_damping=1.0)
    g1 = jax.grad(lambda p: jnp.sum(deq_fixed_point(cell, jnp.zeros(N), p, one)[0]))(args)
    g1_ref = jax.grad(lambda p: jnp.sum(cell(z_star, p)))(args)
    np.testing.assert_allclose(g1[0], g1_ref[0], rtol=1e-10)


def test_backward_probe_reports_adjoint_residual(x64):
    args = problem()
    probe = jnp.zeros(2)
    cfg_short = DEQConfig(
        forward=SolverConfig(max_iter=300, tol=1e-12),
        adjoint_solver="fixed_point",
        adjoint_max_iter=2,
        adjoint_tol=1e-12,
    )
    cfg_long = DEQConfig(
        forward=cfg_short.forward,
        adjoint_solver="fixed_point",
        adjoint_max_iter=300,
        adjoint_tol=1e-12,
    )
    f = lambda p, probe, cfg: jnp.sum(
        deq_fixed_point(cell, jnp.zeros(N), p, cfg, backward_probe=probe)[0]
    )
    grad = jax.jit(jax.grad(f, argnums=1), static_argnums=2)  # (jit: compile time)
    short = grad(args, probe, cfg_short)
    long = grad(args, probe, cfg_long)
    assert short[1] == 2 and short[0] > 1e-3  # visibly unconverged
    assert long[0] < 1e-10 and 2 < long[1] < 300


def test_jit_vmap_grad_compose(x64):
    a, b = problem()
    bs = jax.random.normal(jax.random.PRNGKey(5), (4, N))
    cfg = DEQConfig(
        forward=SolverConfig(max_iter=200, tol=1e-12), adjoint_tol=1e-12, adjoint_max_iter=200
    )

    def batch_loss(a, bs):
        zs, stats = jax.vmap(lambda b: deq_fixed_point(cell, jnp.zeros(N), (a, b), cfg))(bs)
        return jnp.sum(zs**2), stats

    (val, stats), g = jax.jit(jax.value_and_grad(batch_loss, has_aux=True))(a, bs)
    # the reference, one example at a time (jitted once: an eager call of the solver's
    # loop recompiles it for each example)
    grad_one = jax.jit(
        jax.grad(lambda a, b: jnp.sum(deq_fixed_point(cell, jnp.zeros(N), (a, b), cfg)[0] ** 2))
    )
    g_each = sum(grad_one(a, b) for b in bs)
    np.testing.assert_allclose(g, g_each, atol=1e-10)
    assert stats.steps.shape == (4,) and bool(jnp.all(stats.converged))


def test_hutchinson_jacobian_estimate(x64):
    a, b = problem()
    lin = lambda z, args: args[0] @ z + args[1]
    est = jacobian_frobenius_sq(lin, jnp.zeros(N), (a, b), jax.random.PRNGKey(0), num_samples=20000)
    np.testing.assert_allclose(est, jnp.sum(a**2), rtol=0.05)
    # differentiable wrt the parameters: d‖A‖_F²/dA = 2A in expectation
    g = jax.grad(
        lambda a: jacobian_frobenius_sq(lin, jnp.zeros(N), (a, b), jax.random.PRNGKey(1), 20000)
    )(a)
    np.testing.assert_allclose(g, 2 * a, atol=0.1)


@pytest.mark.parametrize(
    "stride,padding,k",
    [
        (1, "SAME", 3),
        (2, "SAME", 3),
        (2, "VALID", 3),
        (3, "SAME", 2),
        (2, ((2, 0), (1, 1)), 3),
        (1, "VALID", 4),
    ],
)
def test_fast_conv_value_and_vjp_equal_lax(stride, padding, k):
    """Exact for any stride, padding and kernel size (odd and even input sizes: the
    transpose must also recover the rows a strided conv skips)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (2, 7, 6, 3))
    w = jax.random.normal(k2, (k, k, 3, 4))
    ref_fn = lambda x, w: _conv(x, w, (stride, stride), padding)
    y, vjp_ref = jax.vjp(ref_fn, x, w)
    ours, vjp_ours = jax.vjp(lambda x, w: conv2d(x, w, stride, padding), x, w)
    np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(k3, y.shape)
    for r, o in zip(vjp_ref(g), vjp_ours(g)):
        assert o.shape == r.shape
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "stride,padding,k",
    [(1, "SAME", 3), (2, "SAME", 3), (2, "VALID", 3), (3, "SAME", 2), (2, ((2, 0), (1, 1)), 3)],
)
def test_conv2d_transpose_is_the_exact_adjoint(stride, padding, k, x64):
    """<conv2d(x, w), y> = <x, conv2d_transpose(y, w, x.shape)>, odd and even sizes."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    for hw in ((7, 6), (8, 9)):
        x = jax.random.normal(k1, (2,) + hw + (3,))
        w = jax.random.normal(k2, (k, k, 3, 4))
        y = jax.random.normal(k3, conv2d(x, w, stride, padding).shape)
        lhs = jnp.vdot(conv2d(x, w, stride, padding), y)
        rhs = jnp.vdot(x, conv2d_transpose(y, w, x.shape, stride, padding))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    with pytest.raises(ValueError, match="gives"):
        conv2d_transpose(y[:, :-1], w, x.shape, stride, padding)
    with pytest.raises(ValueError, match="channels"):
        conv2d_transpose(y, w, x.shape[:3] + (5,), stride, padding)


def test_fast_conv_layer_is_a_drop_in_for_nn_conv():
    """Same parameter tree and initial values as ``nn.Conv`` (so checkpoints load),
    same outputs; bad arguments are clear errors."""
    import flax.linen as nn

    from deqjax.models import FastConv

    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 9, 3))
    ref = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME")
    ours = FastConv(5, 3, strides=2)
    v_ref, v_ours = ref.init(jax.random.PRNGKey(1), x), ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_ours)
    for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_ours)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ours.apply(v_ref, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, jnp.zeros((3, 3, 4, 5)))
    with pytest.raises(ValueError, match="stride"):
        conv2d(x, jnp.zeros((3, 3, 3, 5)), 0)
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, jnp.zeros((3, 3, 3, 5)), 1, "FULL")


def test_config_errors():
    with pytest.raises(ValueError, match="backward"):
        DEQConfig(backward="magic")
    with pytest.raises(ValueError, match="adjoint_solver"):
        DEQConfig(adjoint_solver="lu")


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_adjoint_residual_is_the_returned_solutions(solver):
    """adjoint_solve reports ‖u − v − Jᵀu‖ / ‖v‖ of the u it returns (the solver's own
    residual, not recomputed: the Krylov branch recomputes it)."""
    from deqjax.deq import adjoint_solve

    w = 0.9 * jax.random.normal(jax.random.PRNGKey(0), (40, 40)) / jnp.sqrt(40.0)
    f = lambda z, a: jnp.tanh(w @ z + a)
    args = jax.random.normal(jax.random.PRNGKey(1), (40,))
    z_star = jnp.full((40,), 0.3)
    v = jax.random.normal(jax.random.PRNGKey(2), (40,))
    cfg = DEQConfig(adjoint_solver=solver, adjoint_max_iter=3, adjoint_tol=0.0)
    u, res, _ = adjoint_solve(f, z_star, args, v, cfg)
    _, vjp = jax.vjp(lambda z: f(z, args), z_star)
    true = jnp.linalg.norm(u - v - vjp(u)[0]) / jnp.linalg.norm(v)
    assert float(true) > 1e-6  # 3 steps: not solved exactly, so the check is not vacuous
    np.testing.assert_allclose(float(res), float(true), rtol=1e-4)


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(adjoint_max_iter=0), ValueError, "adjoint_max_iter must be >= 1"),
        (dict(adjoint_max_iter=2.5), TypeError, "adjoint_max_iter must be an int"),
        (dict(adjoint_tol=-1.0), ValueError, "adjoint_tol"),
        (dict(adjoint_tol=-1.0, adjoint_solver="gmres"), ValueError, "adjoint_tol"),
        (dict(adjoint_tol=float("nan")), ValueError, "adjoint_tol"),
        (dict(phantom_steps=True), TypeError, "phantom_steps must be an int"),
        (dict(forward=DEQConfig()), TypeError, "DEQConfig.forward expects a SolverConfig"),
        (dict(backward="shine"), ValueError, "forward.method='broyden'"),
        (dict(backward="shine_refine"), ValueError, "forward.method='broyden'"),
        (dict(adjoint_ridge_mode="abs"), ValueError, "adjoint_ridge_mode must be 'relative'"),
    ],
)
def test_deq_config_is_validated_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        DEQConfig(**kwargs)


def test_solver_config_where_a_deq_config_is_expected():
    with pytest.raises(TypeError, match="expects a DEQConfig, got SolverConfig"):
        deq_fixed_point(cell, jnp.zeros(N), problem(), SolverConfig())


def _modes():
    """Every backward mode of an Anderson- and a Broyden-solved DEQ (SHINE's included)."""
    out = []
    for method, backwards in (
        ("anderson", ("implicit", "phantom", "unroll")),
        ("broyden", ("shine_refine", "shine", "implicit", "phantom", "unroll")),
    ):
        fwd = SolverConfig(method=method, max_iter=100, tol=1e-10)
        kw = dict(forward=fwd, adjoint_tol=1e-12, adjoint_max_iter=100)
        out += [DEQConfig(backward=b, **kw) for b in backwards]
    return out


@pytest.mark.parametrize("cfg", _modes(), ids=lambda c: f"{c.forward.method}-{c.backward}")
@pytest.mark.parametrize("probe", [False, True])
def test_non_finite_args_give_nan_for_that_example_only(cfg, probe, x64):
    """One example's injection holds a NaN (another's z0 an Inf): those states, losses
    and gradients are NaN and not converged in every backward mode; the other example's
    value and its own gradient are those of a batch without them."""
    a, b = problem()
    bs = jnp.stack([b, b.at[2].set(jnp.nan), b])  # example 1: a NaN in its args
    z0s = jnp.zeros((3, N)).at[2, 1].set(jnp.inf)  # example 2: an Inf in its z0

    def one(a, b, z0):
        p = jnp.zeros(2) if probe else None
        z, st = deq_fixed_point(cell, z0, (a, b), cfg, backward_probe=p)
        return jnp.sum(jnp.sin(z)), (z, st)

    # (jitted: compile time; the NaN/Inf handling is inside the traced solve either way)
    (vals, (zs, st)), grads = jax.jit(
        jax.vmap(jax.value_and_grad(one, has_aux=True), (None, 0, 0))
    )(a, bs, z0s)
    (v0, (z_ref, st_ref)), g_ref = jax.jit(jax.value_and_grad(one, has_aux=True))(
        a, b, jnp.zeros(N)
    )
    np.testing.assert_allclose(zs[0], z_ref, rtol=1e-12)
    np.testing.assert_allclose(vals[0], v0, rtol=1e-12)
    # (SHINE's H holds secant pairs Δz ~ tol = 1e-10: its gradient carries their
    # rounding differences between batched and single matmuls, ~1e-16 / 1e-10)
    rtol = 1e-5 if cfg.backward.startswith("shine") else 1e-10
    np.testing.assert_allclose(grads[0], g_ref, rtol=rtol, atol=1e-14)
    assert bool(st.converged[0]) and bool(st_ref.converged)
    assert bool(jnp.all(jnp.isfinite(grads[0])))
    for i in (1, 2):  # the non-finite examples: NaN state, loss and gradient
        assert bool(jnp.all(jnp.isnan(zs[i]))), (i, zs[i])
        assert not bool(st.converged[i]), i
        assert bool(jnp.isnan(vals[i])), i
        assert bool(jnp.all(jnp.isnan(grads[i]))), (i, grads[i])


def test_nan_image_in_a_flax_deq_batch_gives_nan_logits_for_it_only():
    from deqjax.models import MDEQClassifier

    cfg = DEQConfig(forward=SolverConfig(max_iter=8, tol=1e-3))
    model = MDEQClassifier(width=8, inner=8, groups=4, deq=cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(model.apply)  # one compile for both batches
    clean, st_clean = apply(params, x)
    dirty, st = apply(params, x.at[1, 5, 7, 0].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(dirty[1])))
    assert not bool(st.converged[1]) and int(st.steps[1]) == 0
    keep = jnp.array([0, 2])
    np.testing.assert_allclose(dirty[keep], clean[keep], rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(clean)))


# --- SHINE ----------------------------------------------------------------------


def _affine_shine_problem(n=12, rho=0.8):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    a = rho * a / jnp.linalg.norm(a, 2)
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    w = jax.random.normal(jax.random.PRNGKey(2), (n,))
    return a, b, w


def _counted_affine():
    """f(z, (A, b)) = A z + b whose VJPs are counted (a debug callback in its bwd)."""
    count = [0]

    @jax.custom_vjp
    def matvec(a, z):
        return a @ z

    def fwd(a, z):
        return a @ z, (a, z)

    def bwd(res, ct):
        a, z = res
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return jnp.outer(ct, z), a.T @ ct

    matvec.defvjp(fwd, bwd)
    return (lambda z, p: matvec(p[0], z) + p[1]), count


def test_shine_gradient_on_an_affine_map(x64):
    """f(z) = A z + b, ‖A‖₂ = ρ = 0.8, loss wᵀz*: the exact gradient wrt b is the
    adjoint u* = (I − Aᵀ)⁻¹ w. SHINE with refinement matches it to 1e-10. Pure SHINE
    (u = −Hᵀw from the forward Broyden's H) is close in the sense its reported
    residual r = ‖w − (I − Aᵀ)u‖ bounds: ‖u − u*‖ ≤ ‖r‖ / (1 − ρ) (σ_min(I − A) ≥ 1 − ρ);
    it is closer than the Jacobian-free estimate u = w that uses no curvature at all,
    and it costs ONE VJP against the implicit backward's adjoint iterations + 1."""
    a, b, w = _affine_shine_problem()
    f, count = _counted_affine()
    fwd = SolverConfig(method="broyden", max_iter=100, tol=1e-10, stop_mode="abs")

    def grad_b(backward, adjoint_max_iter):
        cfg = DEQConfig(
            forward=fwd,
            backward=backward,
            adjoint_solver="fixed_point",
            adjoint_max_iter=adjoint_max_iter,
            adjoint_tol=1e-13,
        )
        loss = lambda p, probe: jnp.dot(
            w, deq_fixed_point(f, jnp.zeros(12), p, cfg, backward_probe=probe)[0]
        )
        count[0] = 0
        # (jitted: compile time; the callback counts the VJPs the compiled program runs)
        (_, gb), probe = jax.jit(jax.grad(loss, argnums=(0, 1)))((a, b), jnp.zeros(2))
        jax.effects_barrier()
        return gb, probe, count[0]

    exact = jnp.linalg.solve(jnp.eye(12) - a.T, w)
    g_imp, p_imp, n_imp = grad_b("implicit", 500)
    g_ref, p_ref, n_ref = grad_b("shine_refine", 500)
    g_pure, p_pure, n_pure = grad_b("shine", 500)
    np.testing.assert_allclose(g_imp, exact, rtol=1e-10)
    np.testing.assert_allclose(g_ref, exact, rtol=1e-10)
    err = float(jnp.linalg.norm(g_pure - exact))
    r = float(p_pure[0]) * float(jnp.linalg.norm(w))  # the probe's residual, unscaled
    true_r = float(jnp.linalg.norm(w - (g_pure - a.T @ g_pure)))
    np.testing.assert_allclose(r, true_r, rtol=1e-8)  # the probe reports the true residual
    assert 1e-6 < err <= r / (1 - 0.8) * (1 + 1e-9)
    assert err < float(jnp.linalg.norm(w - exact))  # better than u = w
    assert n_pure == 1 and int(p_pure[1]) == 0
    # implicit: one VJP per adjoint step and one for the parameter gradient; the count
    # holds one more: lax.custom_linear_solve traces its matvec once outside the loop to
    # transpose it — dead code XLA removes, except for this counter's debug callback
    # (an effect, never removed)
    assert n_imp == int(p_imp[1]) + 2 > 10 and n_ref == int(p_ref[1]) + 2


def test_shine_forward_mode_and_vmap(x64):
    """Without a probe the SHINE modes are custom_jvps too. shine_refine: jacfwd and
    jacrev equal the exact Jacobian dz*/db = (I − A)⁻¹. Pure shine: its tangent map is
    −H and its adjoint map −Hᵀ, so jacfwd = jacrev = −H (an estimate: not exact),
    under vmap too."""
    from deqjax.solvers import apply_inverse_jacobian, solve

    a, b, _ = _affine_shine_problem(n=6)
    fwd = SolverConfig(method="broyden", max_iter=100, tol=1e-12, stop_mode="abs")
    lin = lambda z, p: p[0] @ z + p[1]
    exact = jnp.linalg.inv(jnp.eye(6) - a)
    refine = DEQConfig(
        forward=fwd, backward="shine_refine", adjoint_tol=1e-13, adjoint_max_iter=200
    )
    z_of_b = lambda b, cfg: deq_fixed_point(lin, jnp.zeros(6), (a, b), cfg)[0]
    # (the transforms jitted: compile time; cfg static)
    jacfwd = jax.jit(jax.jacfwd(z_of_b), static_argnums=1)
    jacrev = jax.jit(jax.jacrev(z_of_b), static_argnums=1)
    np.testing.assert_allclose(jacfwd(b, refine), exact, atol=1e-10)
    np.testing.assert_allclose(jacrev(b, refine), exact, atol=1e-10)

    # (a moderate tolerance: the last secant pairs of a 1e-12 solve are rounding-sized,
    # so H — not its action on the iterates — differs at 1e-5 between batched and
    # single matmuls)
    fwd = dataclasses.replace(fwd, tol=1e-8)
    pure = DEQConfig(forward=fwd, backward="shine")
    _, st = solve(lambda z: lin(z, (a, b)), jnp.zeros(6), fwd, return_inverse_jacobian=True)
    minus_h = -jax.vmap(lambda e: apply_inverse_jacobian(st.inverse_jacobian, e), 1, 1)(jnp.eye(6))
    jf = jacfwd(b, pure)
    np.testing.assert_allclose(jf, minus_h, rtol=1e-12)
    np.testing.assert_allclose(jacrev(b, pure), minus_h, rtol=1e-12)
    assert float(jnp.abs(jf - exact).max()) > 1e-3  # an estimate, not the exact Jacobian
    bs = jnp.stack([b, 2 * b])
    jv = jax.jit(jax.vmap(lambda b: jax.jacfwd(z_of_b)(b, pure)))(bs)
    np.testing.assert_allclose(jv[0], jf, rtol=1e-8)


@pytest.mark.parametrize("mode", ["relative", "absolute"])
def test_adjoint_solution_scales_with_the_cotangent(mode, x64):
    """The adjoint system u = v + Jᵀu is linear in v, so the implicit gradient of c·L is
    c times that of L. Anderson's relative ridge keeps a fixed-budget adjoint solve
    equivariant to the scale; the absolute ridge does not (the negative control): a
    small cotangent (a batch-mean loss, a confident example) lets λ dominate."""
    a, b = problem()
    a = 2.5 * a  # a slowly contracting cell: 5 adjoint steps do not converge
    cfg = DEQConfig(
        forward=SolverConfig(max_iter=300, tol=1e-13, stop_mode="abs"),
        adjoint_solver="anderson",
        adjoint_max_iter=5,
        adjoint_tol=0.0,
        adjoint_ridge_mode=mode,
    )
    weights = jnp.arange(1.0, N + 1)

    def scaled_loss(b, c):
        z, _ = deq_fixed_point(cell, jnp.zeros(N), (a, b), cfg)
        return c * jnp.sum(jnp.sin(z) * weights)

    grad = jax.jit(jax.grad(scaled_loss))  # one compile for both scales
    g1 = grad(b, 1.0)
    g_small = grad(b, 1e-4) / 1e-4
    rel = float(jnp.linalg.norm(g_small - g1) / jnp.linalg.norm(g1))
    if mode == "relative":
        assert rel < 1e-9, rel
    else:
        assert rel > 1e-3, rel
