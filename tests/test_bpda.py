"""Straight-through gradients, BPDA and the adaptive views of a defended model
(deqjax.bpda): values and gradients exactly as documented, and an adaptive evaluation
that is at least as strong as the transfer attack by construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.bpda import adaptive_views, bpda, bpda_purified, straight_through

W = jax.random.normal(jax.random.PRNGKey(0), (16, 10))


def model(x):  # the undefended model: linear on 4x4 images
    return x.reshape(x.shape[0], -1) @ W


def quantise(x):  # a gradient-masking input transformation (zero gradient a.e.)
    return jnp.round(x * 4.0) / 4.0


def defence(x):
    x_p = quantise(x)
    return model(x_p), x_p


def defended(x):
    return defence(x)[0]


X = jax.random.uniform(jax.random.PRNGKey(1), (64, 4, 4, 1))
Y = jnp.argmax(defended(X), -1)


def test_straight_through_has_the_value_of_one_and_the_gradient_of_the_other():
    f = lambda a: straight_through(jnp.sin(a) * 0.0 + 3.0, a**2)
    a = jnp.linspace(-1.0, 1.0, 5)
    np.testing.assert_array_equal(f(a), jnp.full(5, 3.0))
    np.testing.assert_allclose(jax.grad(lambda a: f(a).sum())(a), 2 * a)


def test_bpda_value_is_defended_gradient_is_surrogate():
    v = jax.random.normal(jax.random.PRNGKey(2), (64, 10))
    fb = bpda(defended, model)
    np.testing.assert_array_equal(fb(X), defended(X))
    g_bpda = jax.vjp(fb, X)[1](v)[0]
    g_model = jax.vjp(model, X)[1](v)[0]
    np.testing.assert_allclose(g_bpda, g_model, rtol=1e-6)
    # the defended model itself has a zero gradient: what BPDA exists for
    assert float(jnp.abs(jax.vjp(defended, X)[1](v)[0]).max()) == 0.0


def test_bpda_purified_differentiates_the_surrogate_at_the_purified_input():
    surrogate = lambda a: jnp.tanh(model(a))  # a nonlinear surrogate: the point matters
    fb = bpda_purified(defence, surrogate)
    v = jax.random.normal(jax.random.PRNGKey(3), (64, 10))
    np.testing.assert_array_equal(fb(X), defended(X))
    g = jax.vjp(fb, X)[1](v)[0]
    at_purified = jax.vjp(surrogate, quantise(X))[1](v)[0]
    at_x = jax.vjp(surrogate, X)[1](v)[0]
    np.testing.assert_allclose(g, at_purified, rtol=1e-5, atol=1e-7)
    assert not np.allclose(g, at_x, atol=1e-4)


def test_adaptive_views_names_protocols_and_errors():
    undefended = {"implicit": model, "unroll": model}
    views = adaptive_views(defended, undefended, purify=defence)
    assert list(views) == [
        "autodiff",
        "bpda_implicit",
        "bpda_unroll",
        "bpda_purified_implicit",
        "bpda_purified_unroll",
        "transfer_implicit",
        "transfer_unroll",
    ]
    assert list(adaptive_views(defended, undefended, protocols=("bpda",))) == [
        "bpda_implicit",
        "bpda_unroll",
    ]
    with pytest.raises(ValueError, match="needs purify"):
        adaptive_views(defended, undefended)
    with pytest.raises(ValueError, match="unknown protocols"):
        adaptive_views(defended, undefended, purify=defence, protocols=("bpda", "magic"))
    with pytest.raises(ValueError, match="at least one gradient view"):
        adaptive_views(defended, {})
    with pytest.raises(ValueError, match="eot_key"):
        adaptive_views(
            defended, undefended, random_defended=lambda x, k: defended(x), protocols=("bpda",)
        )


def test_random_defence_is_attacked_through_eot():
    def noisy(x, key):  # a randomised defence: Gaussian noise before the model
        return model(x + 0.1 * jax.random.normal(key, x.shape))

    views = adaptive_views(
        defended,
        {"plain": model},
        random_defended=noisy,
        eot_key=jax.random.PRNGKey(4),
        eot_samples=16,
        protocols=("autodiff", "bpda"),
    )
    keys = jax.random.split(jax.random.PRNGKey(4), 16)
    mean_p = jnp.mean(jnp.stack([jax.nn.softmax(noisy(X, k)) for k in keys]), 0)
    np.testing.assert_allclose(jnp.exp(views["autodiff"](X)), mean_p, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda a: views["autodiff"](a)[:, 0].sum())(X)
    assert float(jnp.abs(g).max()) > 0  # EOT of a smooth random model has a gradient
