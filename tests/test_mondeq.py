"""monDEQ (Winston & Kolter 2020) and its provable Lipschitz bound (Pabbaraju, Winston &
Kolter 2021): strong monotonicity of I − W, both splittings reach the direct solve,
implicit gradients against finite differences, exact Jacobians never above
``lipschitz_bound`` (and above a bound made with a lower bound on ‖U‖), no attack
beats the certificate (and an inflated radius is beaten), clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax import mondeq as M
from deqjax.deq import DEQConfig
from deqjax.solvers import SolverConfig, solve

FC = dict(input_shape=(6, 6, 1), width=12)
CONV = dict(input_shape=(8, 8, 1), width=3, stride=2, pool=2)
SHAPES = {"fc": FC, "conv": CONV}
TIGHT64 = DEQConfig(
    forward=SolverConfig(method="fixed_point", max_iter=4000, tol=1e-13, stop_mode="rel"),
    backward="implicit",
    adjoint_solver="dense",
)
TIGHT32 = DEQConfig(
    forward=SolverConfig(method="fixed_point", max_iter=500, tol=1e-6, stop_mode="rel")
)


def x64():
    return jax.enable_x64(True)  # scoped: restored on exit


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def params(kind, seed=0, m=0.5, scale_ab=1.0, **kw):
    p = M.init_params(jax.random.key(seed), kind, m=m, **{**SHAPES[kind], **kw})
    return p.replace(A=scale_ab * p.A, B=scale_ab * p.B)


def inputs(p, n, seed=1, dtype=jnp.float32):
    return jax.random.uniform(jax.random.key(seed), (n,) + tuple(p.input_shape), dtype)


def w_explicit(p):
    n = int(np.prod(p.state_shape))
    z0 = jnp.zeros(p.state_shape, p.A.dtype)
    return np.asarray(jax.jacfwd(lambda z: M.apply_w(p, z))(z0)).reshape(n, n)


# --- the operator ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("m", [0.05, 1.0])
def test_i_minus_w_is_m_strongly_monotone_and_tight(kind, m):
    with x64():
        p = f64(params(kind, m=m))
        # A ignores (input) channel 0: AᵀA has a null space, so m is the exact minimum
        a = p.A.at[:, 0].set(0.0) if kind == "fc" else p.A.at[:, :, 0, :].set(0.0)
        for q in (p, p.replace(A=a)):
            w = w_explicit(q)
            n = w.shape[0]
            sym = np.eye(n) - (w + w.T) / 2
            lam = np.linalg.eigvalsh(sym).min()
            assert lam >= m * (1 - 1e-10), (lam, m)
        assert lam <= m * (1 + 1e-9), (lam, m)  # the bound is attained: a wrong m fails
        # the transpose is the adjoint
        z = jax.random.normal(jax.random.key(3), q.state_shape, jnp.float64)
        wt = np.asarray(M.apply_w(q, z, transpose=True)).reshape(-1)
        np.testing.assert_allclose(wt, w.T @ np.asarray(z).reshape(-1), atol=1e-12)


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_resolvent_is_the_explicit_inverse(kind):
    with x64():
        p = f64(params(kind, m=0.2))
        w = w_explicit(p)
        n = w.shape[0]
        for alpha in (0.3, 1.0, 4.0):
            v = jax.random.normal(jax.random.key(5), p.state_shape, jnp.float64)
            got = np.asarray(M.apply_resolvent(p, M.resolvent(p, alpha), v)).reshape(-1)
            want = np.linalg.solve((1 + alpha) * np.eye(n) - alpha * w, np.asarray(v).reshape(-1))
            np.testing.assert_allclose(got, want, atol=1e-11)


# --- forward: both splittings, random starts, the direct solve --------------------


def _direct(p, u, z_ref):
    """Solve (I − DW) z = D u on the active set of z_ref; check it is the equilibrium."""
    w = w_explicit(p)
    uf = np.asarray(u).reshape(-1)
    active = np.asarray(z_ref).reshape(-1) > 1e-9
    d = np.diag(active.astype(np.float64))
    z = np.linalg.solve(np.eye(len(uf)) - d @ w, d @ uf)
    np.testing.assert_allclose(z, np.maximum(w @ z + uf, 0.0), atol=1e-10)  # consistent
    return z


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_both_splittings_reach_the_direct_solve_from_random_starts(kind):
    with x64():
        p = f64(params(kind, m=1.0, scale_ab=0.6))
        x = inputs(p, 1, dtype=jnp.float64)[0]
        u = M.inject(p, x) - 0.2  # some units inactive
        cfg = SolverConfig(method="fixed_point", max_iter=3000, tol=1e-12, stop_mode="abs")
        fb_alpha = float(p.m / M.monotone_part_norm_bound(p) ** 2)  # the best FB rate
        assert fb_alpha < M.fb_max_step(p)
        runs = {}
        for splitting, alpha in (("fb", fb_alpha), ("pr", 0.5), ("pr", 1.0), ("pr", 3.0)):
            f, to_z = M.make_cell(p, splitting, alpha)
            s0 = 2.0 * jax.random.normal(jax.random.key(10), (3,) + p.state_shape, jnp.float64)
            run = jax.jit(jax.vmap(lambda s, f=f: solve(lambda t: f(t, (p.A, p.B, u)), s, cfg)))
            s, st = run(s0)
            assert bool(jnp.all(st.converged)), (splitting, alpha, st.abs_residual)
            for seed in range(3):
                runs[(splitting, alpha, seed)] = np.asarray(to_z(s[seed])).reshape(-1)
        z_ref = runs[("pr", 1.0, 0)]
        assert 0 < np.mean(z_ref > 0) < 1  # a genuine active set
        direct = _direct(p, u, z_ref)
        for key, z in runs.items():
            np.testing.assert_allclose(z, direct, atol=1e-9, err_msg=str(key))


# --- backward: implicit gradients vs finite differences ----------------------------


@pytest.mark.parametrize(
    "kind,splitting,adjoint",
    [("fc", "pr", "dense"), ("fc", "fb", "fixed_point"), ("conv", "pr", "fixed_point")],
)
def test_implicit_gradient_matches_finite_differences(kind, splitting, adjoint):
    with x64():
        p = f64(params(kind, m=0.8, scale_ab=0.7))
        x = inputs(p, 2, dtype=jnp.float64)
        alpha = 1.0 if splitting == "pr" else 0.5 * M.fb_max_step(p)
        cfg = DEQConfig(
            forward=TIGHT64.forward,
            backward="implicit",
            adjoint_solver=adjoint,
            adjoint_max_iter=4000,
            adjoint_tol=1e-13,
        )
        w = jax.random.normal(jax.random.key(7), (2, p.W_out.shape[1]), jnp.float64)

        @jax.jit
        def loss(q, xx):
            z, _ = M.equilibrium(q, xx, splitting=splitting, alpha=alpha, config=cfg)
            return jnp.sum(M.head(q, z) * w)

        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
        keys = jax.random.split(jax.random.key(8), 4)
        dirs = {
            "A": jax.random.normal(keys[0], p.A.shape, jnp.float64),
            "B": jax.random.normal(keys[1], p.B.shape, jnp.float64),
            "U": jax.random.normal(keys[2], p.U.shape, jnp.float64),
        }
        h = 1e-6
        for name, d in dirs.items():
            plus = loss(p.replace(**{name: getattr(p, name) + h * d}), x)
            minus = loss(p.replace(**{name: getattr(p, name) - h * d}), x)
            fd = float(plus - minus) / (2 * h)
            an = float(jnp.sum(getattr(gp, name) * d))
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(fd)), (name, fd, an)
        dx = jax.random.normal(keys[3], x.shape, jnp.float64)
        fd = float(loss(p, x + h * dx) - loss(p, x - h * dx)) / (2 * h)
        assert abs(fd - float(jnp.sum(gx * dx))) <= 1e-6 * max(1.0, abs(fd))


# --- the Lipschitz bound -----------------------------------------------------------


def _jacobian_norms(p, x, config=TIGHT64):
    fn = lambda xi: M.logits(p, xi[None], config=config)[0][0]  # noqa: E731
    jac = jax.jit(jax.vmap(jax.jacfwd(fn)))(x)
    return np.array([np.linalg.norm(np.asarray(j).reshape(j.shape[0], -1), 2) for j in jac])


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("normalize", [False, True])
def test_exact_jacobian_never_exceeds_lipschitz_bound(kind, normalize):
    with x64():
        worst = 0.0
        for seed, m in ((0, 0.1), (1, 1.0)):
            p = f64(params(kind, seed=seed, m=m, normalize=normalize))
            bound = M.lipschitz_bound(p)
            norms = _jacobian_norms(p, inputs(p, 6, seed=seed + 2, dtype=jnp.float64))
            assert np.all(norms <= bound), (norms.max(), bound)
            worst = max(worst, norms.max() / bound)
        assert worst > 0.05  # the Jacobians are not trivially small


def test_bound_is_tight_and_a_lower_norm_of_u_is_exceeded():
    """A = B = 0 (W = (1 − m)I), all units active, U and W_out aligned: ‖J‖ = ‖W_out‖‖U‖/m
    up to the noise, so the bound is nearly attained, and the same bound computed with a
    lower bound on ‖U‖ (0.999·σ₁, or ‖Uᵀv‖/‖v‖ at a random v) is exceeded."""
    with x64():
        k = jax.random.split(jax.random.key(4), 6)
        p = f64(params("fc", m=0.25))
        n_in, d = p.U.shape
        a = jax.random.normal(k[0], (n_in,), jnp.float64)
        b = jax.random.normal(k[1], (d,), jnp.float64)
        c = jax.random.normal(k[2], (p.W_out.shape[1],), jnp.float64)
        unit = lambda v: v / jnp.linalg.norm(v)  # noqa: E731
        U = 2.0 * jnp.outer(unit(a), unit(b)) + 1e-3 * jax.random.normal(k[3], (n_in, d))
        W_out = 1.5 * jnp.outer(unit(b), unit(c)) + 1e-3 * jax.random.normal(k[4], p.W_out.shape)
        zero = jnp.zeros_like(p.A)
        p = p.replace(U=U, W_out=W_out, A=zero, B=zero, b=jnp.full((d,), 5.0))
        norms = _jacobian_norms(p, inputs(p, 4, dtype=jnp.float64))
        bound = M.lipschitz_bound(p)
        assert norms.max() <= bound
        assert norms.min() >= 0.99 * bound  # tight: a bound 1 % too small would fail
        nb = M.norm_bounds(p)
        sigma_u = float(np.linalg.norm(np.asarray(U), 2))
        v = jax.random.normal(k[5], (n_in,), jnp.float64)
        for lower in (0.999 * sigma_u, float(jnp.linalg.norm(v @ U) / jnp.linalg.norm(v))):
            assert lower < sigma_u
            assert norms.min() > nb["head"] * lower / p.m  # the control is exceeded


def _pgd_l2(logit_fn, x, y, eps, steps=40):
    """ℓ2 PGD on the margin max_{j≠y} f_j − f_y, per-example radius eps."""
    xa = x
    for _ in range(steps):
        xa = _pgd_l2_step(logit_fn, xa, x, y, eps)
    return xa


@functools.partial(jax.jit, static_argnums=0)  # compiled once per logit_fn, for any eps
def _pgd_l2_step(logit_fn, xa, x, y, eps):
    axes = tuple(range(1, x.ndim))
    shape = (-1,) + (1,) * (x.ndim - 1)

    def margin(xa):
        f = logit_fn(xa)
        fy = jnp.take_along_axis(f, y[:, None], 1)[:, 0]
        return jnp.where(jax.nn.one_hot(y, f.shape[1], dtype=bool), -jnp.inf, f).max(1) - fy

    g = jax.grad(lambda z: margin(z).sum())(xa)
    g = g / (jnp.sqrt((g**2).sum(axes, keepdims=True)) + 1e-12)
    xa = xa + (eps / 8).reshape(shape) * g
    dlt = xa - x
    dn = jnp.sqrt((dlt**2).sum(axes, keepdims=True)) + 1e-12
    return jnp.clip(x + dlt * jnp.minimum(1.0, eps.reshape(shape) / dn), 0.0, 1.0)


def _tight_pair_model():
    """A monDEQ whose certificate is tight: W = (1 − m)I, every unit active, U and W_out
    rank one and aligned, and only classes 0 and 1 in play (the others' biases −100),
    whose logit difference is √2·L·⟨a, x⟩ + const: margin/(√2 L) is the exact distance
    to the decision boundary (inside the [0, 1] box)."""
    p = params("fc", m=0.5, input_shape=(8, 8, 1), width=16)
    n_in, d = p.U.shape
    k = jax.random.split(jax.random.key(6), 2)
    a = jax.random.normal(k[0], (n_in,))
    a = a / jnp.linalg.norm(a)
    b = jax.random.normal(k[1], (d,))
    b = b / jnp.linalg.norm(b)
    c = jnp.zeros(p.W_out.shape[1]).at[0].set(1.0).at[1].set(-1.0) / jnp.sqrt(2.0)
    zero = jnp.zeros_like(p.A)
    b_out = jnp.full((p.W_out.shape[1],), -100.0).at[:2].set(0.0)
    p = p.replace(
        U=jnp.outer(a, b),
        W_out=0.3 * jnp.outer(b, c),
        A=zero,
        B=zero,
        b=jnp.full((d,), 10.0),
        b_out=b_out,
    )
    centre = M.logits(p, jnp.full((1,) + p.input_shape, 0.5), config=TIGHT32)[0][0]
    return p.replace(b_out=b_out.at[0].add(centre[1] - centre[0]))  # boundary at x = 0.5


def test_no_attack_beats_the_certificate_and_an_inflated_radius_is_beaten():
    p = _tight_pair_model()
    x = 0.25 + 0.5 * inputs(p, 24, seed=3)  # inside the box with room to move
    logit_fn = jax.jit(lambda a: M.logits(p, a, config=TIGHT32)[0])
    y = jnp.argmax(logit_fn(x), -1)  # self-labelled: every example is correct
    cert = M.certify(p, x, y, config=TIGHT32)
    assert bool(jnp.all(cert.correct)) and float(cert.slack.max()) < 1e-3 * float(
        jnp.median(cert.radius)
    )
    ok = np.asarray(cert.radius > 1e-3)
    assert ok.sum() >= 12 and len(set(np.asarray(y[ok]).tolist())) == 2
    xc, yc, eps = x[ok], y[ok], (1 - 1e-3) * cert.radius[ok]

    def apgd(loss):
        one = lambda xi, yi, ei, ki: A.apgd(  # noqa: E731
            logit_fn, xi[None], yi[None], ki, eps=ei, norm="l2", steps=20, loss=loss
        )[0]
        keys = jax.random.split(jax.random.key(1), len(yc))
        run = jax.jit(jax.vmap(one))  # compiled once, for both radii
        return lambda xx, yy, ee: run(xx, yy, ee, keys)

    attacks = {"pgd-margin": lambda a, b, e: _pgd_l2(logit_fn, a, b, e)}
    attacks.update({"apgd-ce": apgd("ce"), "apgd-dlr": apgd("dlr")})
    m0 = np.asarray(jnp.take_along_axis(logit_fn(xc), yc[:, None], 1)[:, 0])
    for name, attack in attacks.items():
        xa = attack(xc, yc, eps)
        dist = np.sqrt(((np.asarray(xa) - np.asarray(xc)) ** 2).sum((1, 2, 3)))
        assert (dist <= np.asarray(eps) * (1 + 1e-5)).all(), name
        adv = logit_fn(xa)
        assert (np.asarray(adv.argmax(1)) == np.asarray(yc)).all(), name
        # the attacks come close: the margin left is a small part of the clean one
        margin = np.asarray(jnp.abs(adv[:, 0] - adv[:, 1]))
        clean = np.asarray(jnp.abs(logit_fn(xc)[:, 0] - logit_fn(xc)[:, 1]))
        assert np.median(margin / clean) < 0.05, (name, np.median(margin / clean), m0[:2])
        # the control: 1.5× the certified radius is beaten (the bound is tight here)
        flips = np.asarray(logit_fn(attack(xc, yc, 1.5 * eps)).argmax(1)) != np.asarray(yc)
        assert flips.mean() > 0.5, (name, flips.mean())


# --- the Flax model ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_flax_model_is_the_pure_functions_and_fc_views_run(kind):
    from deqjax.deq_gradients import AttackView

    kw = dict(width=12) if kind == "fc" else dict(width=3, stride=2, pool=2)
    cfg = DEQConfig(forward=SolverConfig(method="fixed_point", max_iter=40, tol=1e-4))
    mod = M.MonDEQClassifier(kind=kind, m=0.5, normalize=True, deq=cfg, **kw)
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
    # (jitted: compile time; an eager call compiles every primitive on its own)
    v = jax.jit(mod.init)(jax.random.key(0), x)
    lg, st = jax.jit(mod.apply)(v, x)
    assert bool(jnp.all(st.converged))
    p = mod.mondeq_params(v["params"], x.shape[1:])
    np.testing.assert_allclose(jax.jit(lambda x: M.logits(p, x)[0])(x), lg, atol=1e-5)
    # normalised: the Gram bound over the float32 traced norms, about 1
    assert 0.999 <= M.lipschitz_bound(p) <= 1.01
    for gradient in ("implicit", "unroll", "phantom") if kind == "fc" else ():
        view = AttackView(gradient)
        g = jax.jit(jax.grad(lambda a, view=view: mod.apply(v, a, view=view)[0].sum()))(x)
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, gradient


# --- errors --------------------------------------------------------------------------


def test_bad_inputs_are_clear_value_errors():
    p = params("fc")
    x = inputs(p, 2)
    for m in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="m must be finite and > 0"):
            M.init_params(jax.random.key(0), "fc", m=m, **FC)
        with pytest.raises(ValueError, match="m must be finite and > 0"):
            M.equilibrium(p.replace(m=m), x)
        with pytest.raises(ValueError, match="m must be finite and > 0"):
            M.MonDEQClassifier(m=m).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="outside its convergence condition"):
        M.equilibrium(p, x, splitting="fb", alpha=1.01 * M.fb_max_step(p))
    M.equilibrium(p, x, splitting="fb", alpha=0.99 * M.fb_max_step(p))  # inside: fine
    for alpha in (0.0, -0.5, float("inf")):
        with pytest.raises(ValueError, match="alpha must be finite and > 0"):
            M.equilibrium(p, x, alpha=alpha)
    with pytest.raises(ValueError, match="unknown splitting"):
        M.equilibrium(p, x, splitting="douglas")
    with pytest.raises(ValueError, match="unknown monDEQ kind"):
        M.init_params(jax.random.key(0), "rnn", **FC)
    with pytest.raises(ValueError, match=r"x must have shape"):
        M.equilibrium(p, x[:, :5])
    with pytest.raises(ValueError, match="U must be"):
        M.equilibrium(p.replace(U=p.U[:-1]), x)
    with pytest.raises(ValueError, match="A and B must be equal"):
        M.equilibrium(p.replace(B=p.B[:, :-1]), x)
    pc = params("conv")
    with pytest.raises(ValueError, match="k odd"):
        M.lipschitz_bound(pc.replace(A=pc.A[:2], B=pc.B[:2]))
    with pytest.raises(ValueError, match="pool"):
        M.lipschitz_bound(pc.replace(pool=3))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda q: M.lipschitz_bound(q))(p)


def test_clopper_pearson_exact_interval():
    from experiments.mondeq_table import clopper_pearson

    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and abs(hi - 0.30849710781876083) < 1e-9
    lo, hi = clopper_pearson(50, 100)
    assert abs(lo - 0.3983) < 1e-4 and abs(hi - 0.6017) < 1e-4


# --- the experiment family (one short end-to-end run) -----------------------------


@pytest.mark.slow
def test_family_trains_reports_certificate_and_bound_holds(tmp_path):
    import json

    from experiments import evaluate as evaluate_lib
    from experiments import train as train_lib
    from experiments.configs import mondeq_mnist
    from experiments.workdir import load_run

    c = mondeq_mnist.get_config()
    c.limit_train, c.limit_test = 400, 100
    c.model.width = 32
    c.train.epochs, c.train.batch_size, c.train.progress = 2, 50, False
    c.train.warmup_steps, c.train.checkpoint_every_steps = 2, 100
    c.robustness.after_training = False
    c.robustness.eps = "0.1,0.3"
    c.robustness.attacks = "apgd-ce"
    c.robustness.gradients = "implicit,phantom"
    c.robustness.n_examples, c.robustness.batch_size, c.robustness.n_iter = 40, 40, 10
    workdir = str(tmp_path)
    final = train_lib.train(c, workdir)
    assert final["test_accuracy"] > 0.5
    evaluate_lib.evaluate(workdir, quiet=True)
    with open(f"{workdir}/report.json") as fh:
        report = json.load(fh)
    assert report["model"] == "mondeq"
    assert set(report["certified_accuracy"]) == {"0.1", "0.3"}
    assert report["solver"]["converged_fraction"] == 1.0
    cert = report["certificate"]
    # two solves of one equilibrium, each to the solver tolerance: measured 1.5e-4 with
    # XLA's backend optimisation off (tests/conftest.py), below 1e-4 with it on
    assert cert["attacked_vs_certified_max_logit_diff"] < 5e-4
    for e in ("0.1", "0.3"):  # a proof is never above an attack's lower bound
        assert report["certified_accuracy"][e] <= report["worst_case"][e] + 1e-9
    assert report["certified_accuracy"]["0.1"] > 0
    run = load_run(workdir)
    p = run.spec.module.mondeq_params(run.state.params, run.dataset.image_shape)
    x = jnp.asarray(run.dataset.test_images[:3])
    fwd = SolverConfig(method="fixed_point", max_iter=500, tol=1e-6, stop_mode="rel")
    norms = _jacobian_norms(p, x, config=DEQConfig(forward=fwd))
    assert norms.max() <= M.lipschitz_bound(p) == cert["lipschitz_bound"]
