"""Certificates that are proofs (docs/concepts/certificates.md): Gram-iteration
upper bounds on the CPL
layers' operator norms (Delattre et al. 2023) against exact norms, networks stepped
with them are 1-Lipschitz (exact Jacobians), and certified_radius only accepts logits
of such a network."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deqjax.cpl import (
    SIGMA_COLLECTION,
    CertifiedLogits,
    ConvCPL,
    CPLNet,
    DenseCPL,
    certified_logits,
    certified_radius,
    conv,
    conv_norm_bound,
    dense_norm_bound,
    gram_iteration_bound,
    multiclass_hinge_loss,
    prepare_sigmas,
)

TIGHT = 1 + 1e-6


@functools.cache
def _jacobian(f):
    return jax.jit(jax.jacfwd(f, argnums=1))


def _opnorm64(f, x, variables=None):
    """Exact ℓ2 norm of the Jacobian of ``f(variables, x)`` at x, all in float64."""
    with jax.enable_x64(True):
        variables, xx = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            (variables, jnp.asarray(x)),
        )
        jac = np.asarray(_jacobian(f)(variables, xx))
        return float(np.linalg.norm(jac.reshape(-1, xx.size), 2))


# --- Gram iteration: bounds from above, converges to the norm ------------------------


def test_gram_iteration_bounds_dense_and_complex_matrices_from_above():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (5, 7), (30, 50), (64, 64)]:
        a = rng.normal(size=shape)
        exact = np.linalg.norm(a, 2)
        bounds = [float(gram_iteration_bound(a, t, rtol=0.0)) for t in range(12)]
        assert bounds[0] == pytest.approx(np.linalg.norm(a), rel=2e-9)  # t = 0: Frobenius
        assert all(b >= exact * (1 - 1e-12) for b in bounds)
        assert all(b2 <= b1 * (1 + 1e-12) for b1, b2 in zip(bounds, bounds[1:]))  # monotone
        assert bounds[-1] <= exact * 1.001  # and tight after a few steps
        assert float(dense_norm_bound(a)) >= exact
    stack = rng.normal(size=(10, 4, 6)) + 1j * rng.normal(size=(10, 4, 6))
    exact = np.linalg.norm(stack, 2, axis=(1, 2))
    got = gram_iteration_bound(stack, 12)
    assert np.all(got >= exact) and np.all(got <= exact * 1.001)
    assert float(dense_norm_bound(np.zeros((3, 4)))) == 0.0


def test_gram_iteration_rescaling_prevents_overflow():
    """Without rescaling ‖WᵀW…‖ overflows float64 at the 3rd step for entries ~1e100."""
    a = np.random.default_rng(1).normal(size=(8, 8)) * 1e100
    exact = np.linalg.norm(a, 2)
    got = float(gram_iteration_bound(a, 12))
    assert np.isfinite(got) and exact <= got <= exact * 1.001
    naive = a.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(3):
            naive = naive.T @ naive
    assert not np.isfinite(np.linalg.norm(naive))  # the control: the naive scheme fails


def test_bounds_refuse_traced_and_non_finite_weights():
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda w: dense_norm_bound(w))(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        dense_norm_bound(np.array([[np.nan, 1.0]]))


# stride, padding, kernel size, input (H, W), factor the bound may exceed the exact norm by
CONV_CASES = [
    (1, "SAME", 3, (7, 6), 1.25),
    (1, "SAME", 2, (6, 6), 1.25),
    (2, "SAME", 3, (7, 8), 1.25),
    (3, "SAME", 4, (8, 7), 1.3),
    (1, "VALID", 3, (7, 6), 1.25),
    (2, "VALID", 2, (6, 8), 1.25),
    (1, "CIRCULAR", 3, (6, 5), 1 + 1e-6),  # exact: the operator is the circular conv
    (2, "CIRCULAR", 3, (6, 8), 1 + 1e-6),  # stride | size: exact too (polyphase)
    (2, "CIRCULAR", 2, (5, 7), 1.6),  # stride ∤ size: bounded by the stride-1 norm
]


@pytest.mark.parametrize("stride,padding,k,hw,factor", CONV_CASES)
def test_conv_bound_is_above_exact_operator_norm(stride, padding, k, hw, factor):
    rng = np.random.default_rng(k * 100 + stride)
    for trial in range(3):
        kernel = rng.normal(size=(k, k, 2, 3))
        exact = _opnorm64(
            lambda kern, a: conv(a, kern, stride, padding), np.zeros((1, *hw, 2)), kernel
        )
        bound = float(conv_norm_bound(kernel, hw, stride, padding))
        assert exact * (1 - 1e-9) <= bound <= exact * factor, (trial, exact, bound)


def test_conv_bound_is_tight_at_network_sizes():
    """Zero padding at 16×16: the torus bound is within 2 % of the exact norm (power
    iteration to convergence, float64), and at least it."""
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 4, 4))
    with jax.enable_x64(True):
        from deqjax.cpl import conv_spectral_norm

        u0 = jnp.asarray(rng.normal(size=(1, 16, 16, 4)))
        exact = float(conv_spectral_norm(jnp.asarray(kernel), u0, 3000)[0])
    bound = float(conv_norm_bound(kernel, (16, 16)))
    assert exact <= bound <= 1.02 * exact


# --- layers and networks stepped with the bounds are 1-Lipschitz ----------------------


def _all_active(v, shift):
    """Biases shifted so that every ReLU is on: the Jacobian is I − h WᵀW, whose norm
    max(1, h‖W‖² − 1) exceeds 1 exactly when σ under-estimates ‖W‖."""
    return {**v, "params": {**v["params"], "bias": v["params"]["bias"] + shift}}


@pytest.mark.parametrize(
    "layer,x",
    [(ConvCPL(8), jnp.ones((1, 8, 8, 4))), (DenseCPL(30), jnp.ones((1, 20)))],
    ids=["conv", "dense"],
)
def test_layer_with_upper_bound_is_1_lipschitz_and_one_power_iteration_is_not(layer, x):
    x = x * jax.random.normal(jax.random.key(0), x.shape)
    v = _all_active(layer.init(jax.random.key(1), x), 10.0)
    default = _opnorm64(layer.apply, x, v)  # 1 power iteration
    upper = _opnorm64(
        lambda p, a: layer.apply(p, a, sigma="upper"), x, prepare_sigmas(layer, v, x, power=False)
    )
    assert default > 1.5  # the negative control: right after init it is not 1-Lipschitz
    assert 0.5 < upper <= TIGHT


@functools.cache
def _tiny():
    """(net, variables, xs, ys): a tiny CPLNet with random biases (mixed ReLU patterns)."""
    net = CPLNet(2, 2, 4, 4, 40, 10, pool=2)
    kx, ky, kp = jax.random.split(jax.random.key(30), 3)
    xs = jax.random.uniform(kx, (16, 6, 6, 2))
    ys = jax.random.randint(ky, (16,), 0, 10)
    v = jax.jit(net.init)(kp, xs)

    def shift_bias(a):
        return a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape) if a.ndim == 1 else a

    return net, {**v, "params": jax.tree.map(shift_bias, v["params"])}, xs, ys


def test_cplnet_with_upper_bounds_is_1_lipschitz_after_init_and_training():
    """Features and truncated logits (the feature map does not depend on the last layer;
    the row-normalised certificate's formula is checked in test_cpl.py)."""
    net, v, xs, ys = _tiny()
    opt = optax.adam(3e-2)
    state = opt.init(v["params"])

    @jax.jit
    def train_step(v, state):
        def loss_fn(p):
            logits, upd = net.apply({**v, "params": p}, xs, mutable=["power_iteration"])
            return multiclass_hinge_loss(logits, ys).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        updates, state = opt.update(g, state)
        return {**upd, "params": optax.apply_updates(v["params"], updates)}, state, loss

    def features(p, a):
        return net.apply(p, a, sigma="upper", method="features")

    def logits(p, a):
        return net.apply(p, a, sigma="upper")

    def worst(v):
        p = prepare_sigmas(net, v, xs, power=False)
        # on a batch the Jacobian is block-diagonal: its norm is the worst example's
        return [_opnorm64(f, xs[:3], p) for f in (features, logits)]

    before = worst(v)
    losses = []
    for _ in range(8):
        v, state, loss = train_step(v, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # the weights really moved
    for feats, logits in (before, worst(v)):
        assert 0.05 < feats <= TIGHT and logits <= TIGHT


# --- certified_radius only takes logits with a proof ------------------------------------


def test_certified_radius_refuses_uncertified_logits_and_accepts_certified_ones():
    net, v, xs, ys = _tiny()
    plain = net.apply(v, xs)  # 1 power iteration: no proof
    with pytest.raises(ValueError, match="certified_logits"):
        certified_radius(plain, ys)
    cert = certified_logits(net, v, xs, batch_size=5)
    assert isinstance(cert, CertifiedLogits) and cert.logits.shape == (16, 10)
    # the certified network is the one stepped with the freshly computed upper bounds,
    # whatever σ the variables carried before
    stale = prepare_sigmas(net, v, xs)
    stale[SIGMA_COLLECTION] = jax.tree.map(lambda s: 0.5 * s, stale[SIGMA_COLLECTION])
    np.testing.assert_array_equal(
        certified_logits(net, stale, xs, batch_size=5).logits, cert.logits
    )
    prepared = prepare_sigmas(net, v, xs)
    np.testing.assert_allclose(
        net.apply(prepared, xs, sigma="upper"), cert.logits, rtol=1e-6, atol=1e-6
    )
    radii = certified_radius(cert, ys)
    vouched = certified_radius(cert.logits, ys, assume_lipschitz=True)
    np.testing.assert_array_equal(radii, vouched)
    with pytest.raises(ValueError, match="carry their own"):
        certified_radius(cert, ys, "row_normalized")
    with pytest.raises(TypeError, match="CPLNet"):
        certified_logits(DenseCPL(3), v, xs)
    with pytest.raises(ValueError, match="prepare_sigmas"):
        net.apply(v, xs, sigma="upper")  # nothing stored yet
    with pytest.raises(ValueError, match="unknown sigma"):
        net.apply(v, xs, sigma="exact")
