"""Straight-through gradients, BPDA and the adaptive views of a defended model
(deqjax.bpda): values and gradients exactly as documented, and an adaptive evaluation
that is at least as strong as the transfer attack by construction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks
from deqjax.bpda import Guided, adaptive_views, bpda, bpda_purified, guided, straight_through
from deqjax.robustness import evaluate_robustness

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

# A defence whose inner model is related to the surrogate but not it (as when the
# defended forward re-solves or refits): transfer attacks on ``model`` return the iterate
# best for ``model``, which this defence often still classifies correctly, while another
# iterate or restart fools it — where the guided view is strictly stronger.
W_RELATED = W + 0.5 * jax.random.normal(jax.random.PRNGKey(7), W.shape)


def defended_related(x):
    return quantise(x).reshape(x.shape[0], -1) @ W_RELATED


Y_RELATED = jnp.argmax(defended_related(X), -1)


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
        "guided_implicit",
        "guided_unroll",
        "bpda_purified_implicit",
        "bpda_purified_unroll",
        "transfer_implicit",
        "transfer_unroll",
    ]
    g = views["guided_unroll"]
    assert isinstance(g, Guided) and g.select is defended and g.follow is model
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


@functools.partial(jax.jit, static_argnames=("fn", "follow", "select", "restarts"))
def _attack(fn, follow, select, labels, key, eps, restarts):
    """``fn`` (PGD, APGD, APGD-T: 10 steps) on ``X`` through ``follow``, choosing with
    ``select`` if given; jitted (ε traced: one compilation per attack and restarts)."""
    kw = {} if select is None else {"select_fn": select}
    return fn(follow, X, labels, key, eps=eps, steps=10, restarts=restarts, **kw)


@pytest.mark.parametrize("attack", ["pgd", "apgd", "apgd_targeted"])
def test_guided_attack_is_never_weaker_than_transfer_per_example(attack):
    """The guided view follows the undefended model exactly (same key: the transfer
    attack's iterates, restarts and targets) and lets the defended model choose what
    it returns: every example the transfer attack breaks, it breaks too. On the defence
    around a related model it also breaks examples the transfer attack misses (without
    ``select_fn`` the guided attack IS the transfer attack: this fails)."""
    fn = getattr(attacks, attack)
    for defence, labels, strict in ((defended, Y, False), (defended_related, Y_RELATED, True)):
        g = guided(defence, model)
        gains = 0
        for eps in (0.05, 0.1, 0.2):
            for restarts in (1, 2):
                key = jax.random.PRNGKey(int(eps * 100))
                x_t = _attack(fn, model, None, labels, key, eps, restarts)
                x_g = _attack(fn, g, g.select, labels, key, eps, restarts)
                assert float(jnp.max(jnp.abs(x_g - X))) <= eps + 1e-6
                robust_t = np.asarray(jnp.argmax(defence(x_t), -1) == labels)
                robust_g = np.asarray(jnp.argmax(defence(x_g), -1) == labels)
                assert not np.any(robust_g & ~robust_t), (eps, restarts)
                assert robust_t.mean() < 1.0  # the attacks do something at these radii
                gains += int(np.sum(robust_t & ~robust_g))
        if strict:  # measured: 9 (pgd), 14 (apgd), 45 (apgd_targeted) over the 6 runs
            assert gains >= 3, gains


def test_textbook_bpda_is_not_dominated_by_construction():
    """The control: the textbook BPDA view takes the loss derivative at the defended
    logits, so it visits other iterates than the transfer attack and misses examples
    the transfer attack breaks (on this defence, PGD-10 at ε = 0.1) — why ``guided``
    exists."""
    key, eps = jax.random.PRNGKey(10), 0.1
    x_t = attacks.pgd(model, X, Y, key, eps=eps, steps=10)
    x_b = attacks.pgd(bpda(defended, model), X, Y, key, eps=eps, steps=10)
    robust_t = np.asarray(jnp.argmax(defended(x_t), -1) == Y)
    robust_b = np.asarray(jnp.argmax(defended(x_b), -1) == Y)
    assert np.any(robust_b & ~robust_t)


def _report(views, y, score):
    """evaluate_robustness of ``views`` on X (PGD and APGD-CE, 10 steps, ε 0.05/0.1/0.2)."""
    return evaluate_robustness(
        views,
        np.asarray(X),
        np.asarray(y),
        jax.random.PRNGKey(5),
        eps_list=[0.05, 0.1, 0.2],
        attacks=["pgd", "apgd-ce"],
        n_iter=10,
        batch_size=64,
        score=score,
    )


def test_report_adaptive_worst_case_at_most_transfer():
    """Through evaluate_robustness (the views of one attack share their key, guided views
    get select_fn): the adaptive worst case is at most the transfer worst case per
    attack, and the flag stays down."""
    views = adaptive_views(defended, {"plain": model}, purify=defence)
    rep = _report(views, Y, defended)
    for eps in ("0.05", "0.1", "0.2"):
        per = rep["robust_accuracy"][eps]
        for a in ("pgd", "apgd-ce"):
            assert per[f"{a}/guided_plain"] <= per[f"{a}/transfer_plain"]
    assert not rep["sanity"]["flags"]["adaptive_weaker_than_transfer"]
    # the defended model masks its gradient: full autodiff is the weakest view
    per = rep["robust_accuracy"]["0.2"]
    assert per["pgd/autodiff"] > max(per["pgd/guided_plain"], per["pgd/bpda_plain"])


def test_report_passes_select_fn_to_guided_views():
    """On the defence around a related model the report's guided rows are strictly below
    its transfer rows (for every attack, at some ε): evaluate_robustness gives the
    guided views their ``select_fn`` (without it they would equal the transfer rows)."""
    views = adaptive_views(defended_related, {"plain": model}, protocols=("guided", "transfer"))
    rep = _report(views, Y_RELATED, defended_related)
    for a in ("pgd", "apgd-ce"):
        rows = [rep["robust_accuracy"][e] for e in ("0.05", "0.1", "0.2")]
        assert all(r[f"{a}/guided_plain"] <= r[f"{a}/transfer_plain"] for r in rows)
        assert any(r[f"{a}/guided_plain"] < r[f"{a}/transfer_plain"] for r in rows), rows
