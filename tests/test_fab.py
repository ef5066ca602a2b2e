"""Tests of FAB / FAB-T (deqjax.attacks.fab): the exact projection, analytic minimal
perturbations of linear classifiers, the attack invariants, the reference code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from tests.test_attacks import FAST, KEY, _assert_feasible, _jit, _robust_acc, trained_mlp

__all__ = ["trained_mlp"]  # the shared fixture


# ------------------------------------------------------------------ projection
@pytest.fixture(scope="module")
def hyperplanes():
    """Rows with some pixels at 0/1, some zero weights, a few infeasible hyperplanes."""
    rng = np.random.default_rng(0)
    b_, n = 40, 12
    t = rng.uniform(0, 1, (b_, n))
    t[:, :3] = rng.choice([0.0, 1.0], (b_, 3))
    w = rng.normal(size=(b_, n))
    w[:, 3] = 0.0
    b = np.sum(w * t, 1) + rng.normal(size=b_) * 2.0
    return t, w, b


def _project(t, w, b, norm):
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return np.asarray(A.project_hyperplane_box(f32(t), f32(w), f32(b), norm), np.float64)


def test_projection_linf_is_the_linear_program_optimum(hyperplanes):
    """min ‖d‖∞ s.t. wᵀ(t+d) = b, t+d ∈ [0,1]ⁿ is an LP: scipy's optimum must match."""
    from scipy.optimize import linprog

    t, w, b = hyperplanes
    d = _project(t, w, b, "linf")
    assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
    n, n_infeasible = t.shape[1], 0
    for i in range(len(t)):
        c = b[i] - w[i] @ t[i]
        lo, hi = -t[i], 1 - t[i]
        corner = np.where(w[i] * c > 0, hi, lo) * (w[i] != 0)  # the largest move towards π
        if abs(w[i] @ corner) < abs(c):  # no box point reaches the hyperplane
            n_infeasible += 1
            np.testing.assert_allclose(d[i], corner, atol=1e-6)
            continue
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        r = linprog(
            np.r_[np.zeros(n), 1.0],
            A_ub=a_ub,
            b_ub=np.zeros(2 * n),
            A_eq=np.r_[w[i], 0.0][None],
            b_eq=[c],
            bounds=[(lo[j], hi[j]) for j in range(n)] + [(0, None)],
        )
        assert abs(np.abs(d[i]).max() - r.fun) < 1e-5 * max(1.0, r.fun)
        assert abs(w[i] @ d[i] - c) < 1e-5 * max(1.0, abs(c))
    assert 0 < n_infeasible < len(t) // 2  # both branches exercised


def test_projection_l2_is_the_quadratic_program_optimum(hyperplanes):
    """min ‖d‖₂ s.t. the same constraints: no feasible point of a QP solver is shorter,
    and the KKT form d_i = clip(−λ w_i, −t_i, 1 − t_i) holds with one λ per row."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    t, w, b = hyperplanes
    d = _project(t, w, b, "l2")
    assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
    checked = 0
    for i in range(len(t)):
        c = b[i] - w[i] @ t[i]
        lo, hi = -t[i], 1 - t[i]
        corner = np.where(w[i] * c > 0, hi, lo) * (w[i] != 0)
        if abs(w[i] @ corner) < abs(c):
            np.testing.assert_allclose(d[i], corner, atol=1e-6)
            continue
        assert abs(w[i] @ d[i] - c) < 1e-5 * max(1.0, abs(c))
        r = minimize(
            lambda v: v @ v,
            np.zeros_like(d[i]),
            jac=lambda v: 2 * v,
            method="trust-constr",
            constraints=[LinearConstraint(w[i][None], c, c)],
            bounds=Bounds(lo, hi),
            options=dict(gtol=1e-12, xtol=1e-12, maxiter=3000),
        )
        assert np.linalg.norm(d[i]) <= np.linalg.norm(r.x) * (1 + 1e-5)
        assert np.linalg.norm(d[i]) >= np.linalg.norm(r.x) * (1 - 1e-3)
        free = (w[i] != 0) & (d[i] > lo + 1e-5) & (d[i] < hi - 1e-5)
        lam = -d[i][free] / w[i][free]
        assert np.ptp(lam) < 1e-5 * np.abs(lam).max()  # one multiplier, unclipped coords
        checked += 1
    assert checked > 10


# ------------------------------------------------------------ linear classifiers
@pytest.fixture(scope="module")
def linear_problem():
    """5-class linear model on inputs near 0.5 (the box never binds): the minimal
    perturbation is d* = min_{j≠y} (z_y − z_j)/‖w_y − w_j‖_q (q = 1 for L∞, 2 for L2)."""
    rng = np.random.default_rng(1)
    d, c = 20, 5
    W = rng.normal(size=(d, c)).astype(np.float32)
    b = (rng.normal(size=c) * 0.3).astype(np.float32)
    x = (0.5 + rng.uniform(-0.1, 0.1, size=(50, d))).astype(np.float32)
    z = x @ W + b
    y = z.argmax(1)
    m = z[np.arange(len(x)), y][:, None] - z
    f = lambda xx: xx.reshape(xx.shape[0], -1) @ W + b

    def dstar(norm):
        den = np.linalg.norm(W.T[y][:, None] - W.T[None], ord=1 if norm == "linf" else 2, axis=-1)
        own = np.arange(c)[None] == y[:, None]
        return np.where(own, np.inf, m / np.maximum(den, 1e-12)).min(1)

    return f, jnp.asarray(x), jnp.asarray(y, jnp.int32), dstar


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_analytic_minimal_perturbation(linear_problem, norm):
    f, x, y, dstar = linear_problem
    ds = dstar(norm)
    big = 1.0  # beyond every d*: every example is broken, all distances are reported
    for eta, tol in ((1.05, 6e-3), (1.001, 2.5e-4)):
        # FAB overshoots by η and steps back by β, so it settles ≈ 0.1·(η − 1)·d* past
        # the boundary: the error must shrink with η (the test can fail both ways)
        _, dist = _jit(A.fab, f, x, y, KEY, big, norm=norm, eta=eta, return_distance=True)
        ratio = np.asarray(dist) / ds
        assert ratio.min() >= 1 - 1e-5 and ratio.max() <= 1 + tol, (eta, ratio.min(), ratio.max())
    _, dt = _jit(
        A.fab_targeted, f, x, y, KEY, big, norm=norm, n_target_classes=4, return_distance=True
    )
    ratio = np.asarray(dt) / ds  # the 4 targets cover every other class: the same d*
    assert ratio.min() >= 1 - 1e-5 and ratio.max() <= 1 + 6e-3
    # at a radius eps between two d* (≥ 3% apart), exactly the examples with d* < eps break
    s = np.sort(ds)
    gaps = [i for i in range(len(s) // 3, len(s) - 1) if s[i + 1] > 1.03 * s[i]]
    eps = float(np.sqrt(s[gaps[0]] * s[gaps[0] + 1]))
    xa = _jit(A.fab, f, x, y, KEY, eps, norm=norm)
    _assert_feasible(xa, x, eps, norm)
    assert _robust_acc(f, xa, y) == int(np.sum(ds > eps))


# -------------------------------------------------------------------- invariants
@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 1.0)])
def test_fab_invariants_on_trained_model(trained_mlp, norm, eps):
    f, x, y = trained_mlp
    clean = _robust_acc(f, x, y)
    xa, d1 = _jit(A.fab, f, x, y, KEY, eps, norm=norm, steps=20, return_distance=True)
    _assert_feasible(xa, x, eps, norm)
    acc1 = _robust_acc(f, xa, y)
    assert acc1 < clean - 5  # it breaks examples
    d1 = np.asarray(d1)
    broken = np.asarray(jnp.argmax(f(xa), -1) != y)
    assert np.array_equal(broken, d1 <= eps)  # returned iff found within eps
    if norm == "linf":  # determinism: same key, a fresh compile, per-example keys
        xb, _ = jax.jit(
            lambda x, y, k: A.fab(f, x, y, k, eps=eps, steps=20, return_distance=True), **FAST
        )(x, y, A.example_keys(KEY, x.shape[0]))
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
    # restarts: restart 0 is the plain run, so more restarts are never weaker
    xr, dr = _jit(A.fab, f, x, y, KEY, eps, norm=norm, steps=20, restarts=3, return_distance=True)
    _assert_feasible(xr, x, eps, norm)
    assert np.all(np.asarray(dr) <= d1)  # never weaker, per example
    assert np.all(np.isfinite(np.asarray(xr)))
    # FAB-T on two targets
    xt = _jit(A.fab_targeted, f, x, y, KEY, eps, norm=norm, steps=20, n_target_classes=2)
    _assert_feasible(xt, x, eps, norm)
    assert _robust_acc(f, xt, y) < clean - 5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_random_restarts_escape_a_zero_gradient(norm):
    """f₁ − f₀ = −1 + 10·relu(z₁ − x₁): the gradient vanishes at x (relu'(0) = 0), so FAB
    from x cannot move, while a restart started at distance eps/2 with z₁ > x₁ (half
    of them) sees the slope and reaches the boundary at distance 0.1 < eps."""
    x = jnp.full((16, 4), 0.5)
    y = jnp.zeros(16, jnp.int32)
    f = lambda z: jnp.stack(
        [jnp.zeros(z.shape[0]), -1.0 + 10.0 * jax.nn.relu(z[:, 0] - 0.5)], axis=1
    )
    eps = 0.2 if norm == "linf" else 0.4
    x1, d1 = _jit(A.fab, f, x, y, KEY, eps, norm=norm, steps=10, return_distance=True)
    assert np.all(np.isinf(np.asarray(d1))) and _robust_acc(f, x1, y) == 16
    x8, d8 = _jit(A.fab, f, x, y, KEY, eps, norm=norm, steps=10, restarts=8, return_distance=True)
    _assert_feasible(x8, x, eps, norm)
    assert _robust_acc(f, x8, y) <= 2
    found = np.isfinite(np.asarray(d8))
    d8 = np.asarray(d8)[found]
    assert np.all((d8 >= 0.1 * (1 - 1e-5)) & (d8 <= eps))  # d* = 0.1: never below it


def test_fab_targets_run_one_at_a_time_reproduce_the_full_run(trained_mlp):
    """Targets split with ``targets=`` (as the compacting ensemble runs them) give the
    same minimal distances as the full FAB-T, with per-example keys and restarts."""
    f, x, y = trained_mlp
    keys = A.example_keys(KEY, x.shape[0])
    kw = dict(eps=0.1, steps=10, n_target_classes=3, restarts=2, return_distance=True)
    _, full = _jit(A.fab_targeted, f, x, y, keys, 0.1, **{k: kw[k] for k in kw if k != "eps"})
    part = jax.jit(lambda j: A.fab_targeted(f, x, y, keys, targets=j, **kw)[1], **FAST)
    parts = [np.asarray(part(j)) for j in range(3)]  # j traced: one compile
    np.testing.assert_array_equal(np.asarray(full), np.min(parts, axis=0))
    assert len({p.tobytes() for p in parts}) == 3  # the targets differ


# ---------------------------------------------------------------- the reference
def test_fab_t_matches_reference_implementation(trained_mlp):
    """torchattacks' FAB (the PyTorch port of fra31/auto-attack's FAB) on the same MLP:
    FAB-T with one restart is deterministic in both, so the minimal distances found for
    each target must agree to float precision, and so must the robust accuracy."""
    from tests.helpers import import_or_skip

    torch = import_or_skip("torch")  # under CI=true a missing peer fails instead
    torchattacks = import_or_skip("torchattacks")
    f, x, y = trained_mlp
    params = f.params  # the fixture's weights
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(100, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    with torch.no_grad():
        for layer, (w, b) in zip((net[1], net[3]), (("W1", "b1"), ("W2", "b2"))):
            layer.weight.copy_(torch.tensor(np.asarray(params[w]).T))
            layer.bias.copy_(torch.tensor(np.asarray(params[b])))
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()  # NHWC → NCHW
    yt = torch.tensor(np.asarray(y)).long()
    np.testing.assert_allclose(net(xt).detach().numpy(), np.asarray(f(x)), atol=1e-4)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eps, k = 0.06, 3
        atk = torchattacks.FAB(net, norm="Linf", eps=eps, steps=30, multi_targeted=True)
        atk.n_target_classes = k
        theirs = []
        for rank in range(2, k + 2):  # the reference's per-target minimal points
            atk.target_class = rank
            adv = atk.attack_single_run_targeted(xt, yt)
            ok = (net(adv).argmax(1) != yt).numpy()
            dist = (adv - xt).reshape(len(xt), -1).abs().max(1)[0].detach().numpy()
            theirs.append(np.where(ok, dist, np.inf))
        theirs = np.min(theirs, axis=0)
        acc_theirs = int((net(atk(xt, yt)).argmax(1) == yt).sum())
    finally:
        torch.set_num_threads(n_threads)
    xa, ours = _jit(
        A.fab_targeted, f, x, y, KEY, eps, steps=30, n_target_classes=k, return_distance=True
    )
    ours = np.asarray(ours)
    correct = np.asarray(jnp.argmax(f(x), -1) == y)
    np.testing.assert_array_equal(np.isfinite(ours[correct]), np.isfinite(theirs[correct]))
    fin = correct & np.isfinite(theirs)
    np.testing.assert_allclose(ours[fin], theirs[fin], rtol=2e-3)
    assert _robust_acc(f, xa, y) <= acc_theirs  # at least the reference's reduction
    assert abs(_robust_acc(f, xa, y) - acc_theirs) <= 1


# ------------------------------------------------------------------- validation
def test_fab_bad_inputs_raise():
    f = lambda x: x.reshape(x.shape[0], -1) @ jnp.ones((6, 3))
    x = jnp.full((2, 6), 0.5)
    y = jnp.array([0, 1])
    with pytest.raises(ValueError, match="eps > 0"):
        A.fab(f, x, y, KEY, eps=0.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        A.fab_targeted(f, x, y, KEY, eps=-1.0, n_target_classes=2)
    with pytest.raises(ValueError, match="unknown norm"):
        A.fab(f, x, y, KEY, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="n_target_classes=3 is out of range"):
        A.fab_targeted(f, x, y, KEY, eps=0.1, n_target_classes=3)
    with pytest.raises(ValueError, match="n_target_classes must be"):
        A.fab_targeted(f, x, y, KEY, eps=0.1, n_target_classes=0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        A.fab_targeted(f, x, y, KEY, eps=0.1, n_target_classes=2, targets=2)
    with pytest.raises(ValueError, match="labels must lie"):
        A.fab(f, x, jnp.array([0, 3]), KEY, eps=0.1)
    with pytest.raises(ValueError, match="per-example keys must number"):
        A.fab(f, x, y, A.example_keys(KEY, 3), eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        A.fab(f, x, y, KEY, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="beta"):
        A.fab(f, x, y, KEY, eps=0.1, beta=1.5)


def test_fab_in_the_robustness_report(trained_mlp):
    """ "fab" and "fab-t" are gradient attacks of deqjax.robustness.evaluate_robustness."""
    from deqjax.robustness import evaluate_robustness

    f, x, y = trained_mlp
    rep = evaluate_robustness(
        {"autodiff": f},
        np.asarray(x[:16]),
        np.asarray(y[:16]),
        KEY,
        eps_list=[0.1],
        attacks=["fab-t", "fab"],
        n_iter=5,
        n_target_classes=2,
        batch_size=16,
    )
    acc = rep["robust_accuracy"]["0.1"]
    assert set(acc) == {"fab-t/autodiff", "fab/autodiff"}
    assert acc["fab-t/autodiff"] < rep["clean_accuracy"]
