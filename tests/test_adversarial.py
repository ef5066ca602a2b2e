"""Tests of deqjax.adversarial: PGD-AT, TRADES and mixed adversarial losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import adversarial as ADV
from deqjax.attacks import ce_loss, pgd

KEY = jax.random.PRNGKey(0)
# LLVM -O0: compiles 4-8x faster on CPU; these workloads are tiny, so runtime is moot
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
EPS, STEP, STEPS = 0.1, 0.03, 5


def apply_fn(p, x):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["W1"] + p["b1"])
    return h @ p["W2"] + p["b2"]


@pytest.fixture(scope="module")
def problem():
    k1, k2, k3, k4 = jax.random.split(KEY, 4)
    params = dict(
        W1=jax.random.normal(k1, (12, 16)),
        b1=jnp.zeros(16),
        W2=jax.random.normal(k2, (16, 3)),
        b2=jnp.zeros(3),
    )
    x = jax.random.uniform(k3, (16, 3, 4))
    y = jax.random.randint(k4, (16,), 0, 3)
    return params, x, y


def _clean(params, x, y):
    return jnp.mean(ce_loss(apply_fn(params, x), y))


def _finite_tree(t):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(t))


def test_pgd_at_loss_finite_differentiable_and_above_clean(problem):
    params, x, y = problem
    loss_fn = jax.jit(
        lambda p, x, y, k: ADV.pgd_at_loss(apply_fn, p, x, y, k, eps=EPS, step=STEP, steps=STEPS)
    )
    val, g = jax.jit(jax.value_and_grad(loss_fn), **FAST)(params, x, y, KEY)
    assert np.isfinite(float(val)) and _finite_tree(g)
    assert sum(float(jnp.abs(a).sum()) for a in jax.tree_util.tree_leaves(g)) > 0
    assert float(val) > float(_clean(params, x, y))
    # outer gradient = gradient of CE at the (fixed) adversarial point (Danskin):
    # no gradient leaks through the inner attack's dependence on params
    x_adv = jax.jit(
        lambda xx: pgd(
            lambda z: apply_fn(params, z), xx, y, KEY, eps=EPS, step_size=STEP, steps=STEPS
        ),
        **FAST,
    )(x)
    g_ref = jax.jit(jax.grad(_clean), **FAST)(params, x_adv, y)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and no gradient flows to the input
    gx = jax.jit(
        jax.grad(
            lambda xx: ADV.pgd_at_loss(apply_fn, params, xx, y, KEY, eps=EPS, step=STEP, steps=2)
        ),
        **FAST,
    )(x)
    assert float(jnp.abs(gx).max()) == 0.0


def test_trades_loss(problem):
    params, x, y = problem
    trades = lambda p, beta: ADV.trades_loss(apply_fn, p, x, y, KEY, eps=EPS, beta=beta)
    val, g = jax.jit(jax.value_and_grad(trades), **FAST)(params, 6.0)
    clean = float(_clean(params, x, y))
    assert np.isfinite(float(val)) and _finite_tree(g)
    assert float(val) > clean  # KL(p(x)||p(x_adv)) > 0
    np.testing.assert_allclose(float(jax.jit(trades, **FAST)(params, 0.0)), clean, rtol=1e-6)
    # the inner maximisation increases the KL over the 0.001-noise start
    x_adv = jax.jit(
        lambda p: ADV.trades_adversarial_examples(apply_fn, p, x, KEY, eps=EPS), **FAST
    )(params)
    kl = lambda xa: float(jnp.mean(ADV._kl(apply_fn(params, x), apply_fn(params, xa))))
    x0 = jnp.clip(x + 0.001 * jax.random.normal(KEY, x.shape), 0, 1)
    assert kl(x_adv) > 10 * kl(x0)
    assert float(jnp.abs(x_adv - x).max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    x2 = jax.jit(
        lambda p: ADV.trades_adversarial_examples(apply_fn, p, x, KEY, eps=0.5, norm="l2"), **FAST
    )(params)
    assert float(jnp.linalg.norm((x2 - x).reshape(16, -1), axis=1).max()) <= 0.5 + 1e-5


def test_mixed_loss_interpolates(problem):
    params, x, y = problem
    kw = dict(eps=EPS, step=STEP, steps=STEPS)
    mixed = jax.jit(
        lambda w: ADV.mixed_adversarial_loss(apply_fn, params, x, y, KEY, weight=w, **kw), **FAST
    )
    adv = float(jax.jit(lambda p: ADV.pgd_at_loss(apply_fn, p, x, y, KEY, **kw), **FAST)(params))
    clean = float(_clean(params, x, y))
    np.testing.assert_allclose(float(mixed(0.0)), clean, rtol=1e-5)
    np.testing.assert_allclose(float(mixed(1.0)), adv, rtol=1e-5)
    np.testing.assert_allclose(float(mixed(0.25)), 0.75 * clean + 0.25 * adv, rtol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        ADV.mixed_adversarial_loss(apply_fn, params, x, y, KEY, weight=1.5, **kw)


def test_separate_attack_apply_fn_is_used(problem):
    """The inner attack runs on ``attack_apply_fn``: attacking the negated model
    pushes inputs toward *more* confident predictions, so the loss is lower."""
    params, x, y = problem
    kw = dict(eps=EPS, step=STEP, steps=STEPS, rand_init=False)
    run = lambda att: float(
        jax.jit(
            lambda p: ADV.pgd_at_loss(apply_fn, p, x, y, KEY, attack_apply_fn=att, **kw), **FAST
        )(params)
    )
    true_attack = run(None)
    wrong = run(lambda p, xx: -apply_fn(p, xx))
    assert wrong < float(_clean(params, x, y)) < true_attack


def test_adversarial_training_reduces_adversarial_loss(problem):
    import optax

    params, x, y = problem
    opt = optax.adam(1e-2)
    loss = lambda p, k: ADV.pgd_at_loss(apply_fn, p, x, y, k, eps=EPS, step=STEP, steps=3)

    @functools.partial(jax.jit, **FAST)
    def step(p, s, k):
        l, g = jax.value_and_grad(loss)(p, k)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, l

    s = opt.init(params)
    p = params
    first = None
    for i in range(41):
        p, s, l = step(p, s, KEY if i in (0, 40) else jax.random.fold_in(KEY, i))
        first = float(l) if first is None else first
    assert float(l) < 0.7 * first  # loss at step 40 vs step 0, same key


def test_bad_inputs(problem):
    params, x, y = problem
    with pytest.raises(ValueError, match="eps"):
        ADV.trades_loss(apply_fn, params, x, y, KEY, eps=-1.0)
    with pytest.raises(ValueError, match="unknown norm"):
        ADV.pgd_at_loss(apply_fn, params, x, y, KEY, eps=0.1, step=0.1, steps=1, norm="l3")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ADV.trades_loss(apply_fn, params, x + 2.0, y, KEY, eps=0.1)
