"""The ``cpl`` family in the experiment framework (Meunier et al. 2022): it trains
through experiments.train, the robustness report carries certified accuracy next to
the empirical attacks, no attack beats the certificate, and the trained network
is 1-Lipschitz (exact Jacobian)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax.cpl import certified_radius, conv
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib
from experiments.configs import cpl_mnist
from experiments.families.cpl import (
    CPLClassifier,
    conv_norm_upper_bound,
    layer_sigmas,
    lipschitz_upper_bound,
)
from experiments.workdir import load_run

EPS = (0.05, 0.15, 0.3)
LIP_TOL = 1 + 1e-4


def tiny_config():
    c = cpl_mnist.get_config()
    c.limit_train, c.limit_test = 256, 100
    c.model.depth, c.model.depth_linear = 1, 1
    c.model.conv_channels, c.model.conv_inner, c.model.linear_width = 4, 4, 64
    c.model.eval_power_iters = 300
    c.train.epochs, c.train.batch_size, c.train.progress = 2, 16, False
    c.train.learning_rate = 2e-2
    c.train.warmup_steps, c.train.checkpoint_every_steps = 2, 100
    c.eval.batch_size = 100
    c.robustness.after_training = False
    c.robustness.eps = ",".join(str(e) for e in EPS)
    c.robustness.n_examples, c.robustness.batch_size = 60, 60
    c.robustness.n_iter, c.robustness.n_queries = 10, 40
    c.robustness.attacks = "apgd-ce,square"  # each (attack, ε) compiles: keep the test short
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train the tiny CPL net once and write its robustness report."""
    workdir = str(tmp_path_factory.mktemp("cpl"))
    final = train_lib.train(tiny_config(), workdir)
    report = evaluate_lib.evaluate(workdir, quiet=True)
    config, spec, state, ds, _ = load_run(workdir)
    return dict(workdir=workdir, final=final, report=report, spec=spec, state=state, ds=ds)


def test_trains_and_loss_decreases(run):
    with open(os.path.join(run["workdir"], "metrics.jsonl")) as fh:
        m = [json.loads(line) for line in fh]
    assert len(m) == 2 and m[1]["train_loss"] < m[0]["train_loss"]
    assert run["final"]["test_accuracy"] > 0.4  # learned something in 32 steps
    assert set(run["state"].model_state) == {"power_iteration"}


def test_report_has_certified_and_empirical_columns(run):
    for name in ("report.json", "report.md", "robustness.png"):
        assert os.path.getsize(os.path.join(run["workdir"], name)) > 0
    with open(os.path.join(run["workdir"], "report.json")) as fh:
        report = json.load(fh)
    assert report["norm"] == "l2" and report["model"] == "cpl"
    cert = report["certified_accuracy"]
    assert set(cert) == {str(float(e)) for e in EPS} == set(report["worst_case"])
    values = [cert[str(float(e))] for e in EPS]
    assert values == sorted(values, reverse=True) and values[0] <= report["clean_accuracy"]
    assert values[0] > 0  # something is certified, so the soundness check below has teeth
    for e in EPS:  # soundness, in aggregate: no attack beats the certificate
        assert report["worst_case"][str(float(e))] >= cert[str(float(e))]
    assert "| certified |" in open(os.path.join(run["workdir"], "report.md")).read()
    provable = report["certified_accuracy_provable"]
    assert all(provable[k] <= cert[k] for k in cert) and provable[str(float(EPS[0]))] > 0
    assert 1.0 <= report["lipschitz_upper_bound"] < 1.1
    # power iteration on WᵀW: the Rayleigh quotient never decreases with more iterations
    assert report["power_iteration"]["max_rel_sigma_change_at_2x_iters"] >= -1e-6


def _attackers(view):
    """Jitted L2 attacks (PGD-CE, PGD-DLR, APGD-CE) with ε traced: one compile each."""
    kinds = [
        dict(fn=A.pgd, steps=15),
        dict(fn=A.pgd, steps=15, loss="dlr"),
        dict(fn=A.apgd, steps=15),
    ]

    def make(kw):
        kw = dict(kw)
        fn = kw.pop("fn")
        return jax.jit(lambda x, y, eps, key: fn(view, x, y, key, eps=eps, norm="l2", **kw))

    return [make(kw) for kw in kinds]


def _attacked_correct(view, attackers, x, y, eps, key):
    """Per example: still correct under every attack at radius eps."""
    ok = jnp.argmax(view(x), -1) == y
    for i, attack in enumerate(attackers):
        x_adv = attack(x, y, jnp.float32(eps), jax.random.fold_in(key, i))
        assert float(jnp.max(jnp.sqrt(jnp.sum((x_adv - x) ** 2, (1, 2, 3))))) <= eps * (1 + 1e-5)
        ok &= jnp.argmax(view(x_adv), -1) == y
    return np.asarray(ok)


@pytest.mark.slow
def test_no_attack_beats_the_certificate(run):
    """Soundness per example: every example certified at ε survives the attacks at ε.
    Control: a certificate inflated ×3 is caught by the same attacks (so they are
    strong enough to see a bad one)."""
    variables = {"params": run["state"].params, **run["state"].model_state}
    spec = run["spec"]
    view = lambda a: spec.module.apply(variables, a, **spec.eval_kwargs)[0]
    x, y = run["ds"].test_images[:60], jnp.asarray(run["ds"].test_labels[:60])
    radii = np.asarray(certified_radius(view(x), y, "truncate"))
    inflated_caught, attackers = 0, _attackers(view)
    for j, e in enumerate(EPS):
        robust = _attacked_correct(view, attackers, x, y, e, jax.random.key(j))
        assert not np.any((radii > e) & ~robust), e
        inflated_caught += int(np.sum((3 * radii > e) & ~robust))
    assert inflated_caught > 0


def test_trained_network_jacobian_norm_at_most_one(run):
    spec, state = run["spec"], run["state"]
    variables = {"params": state.params, **state.model_state}
    n = spec.eval_kwargs["n_power_iters"]
    x = run["ds"].test_images[:1]

    def features(a):
        return spec.module.apply(variables, a, n, method=lambda m, a, k: m.net.features(a, k))

    def logits(a):
        return spec.module.apply(variables, a, n)[0]

    for f in (features, logits):
        jac = np.asarray(jax.jacfwd(f)(x)).reshape(-1, x.size)
        norm = np.linalg.norm(jac, 2)
        assert 0.05 < norm <= LIP_TOL, (f.__name__, norm)


def test_conv_norm_upper_bound_and_lipschitz_bound():
    """The torus bound is ≥ the exact zero-padded conv norm (jacfwd + SVD) and equals
    it for circular padding; converged σ give a Lipschitz bound near 1 and one power
    iteration from a random start gives a larger one."""
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 3))
    x0 = jnp.zeros((1, 5, 6, 2))
    for padding in ("SAME", "CIRCULAR"):
        jac = np.asarray(jax.jacfwd(lambda a, p=padding: conv(a, kernel, 1, p))(x0))
        exact = np.linalg.norm(jac.reshape(-1, x0.size), 2)
        bound = float(conv_norm_upper_bound(kernel, 5, 6, padding))
        assert bound >= exact * (1 - 1e-5)
        if padding == "CIRCULAR":
            np.testing.assert_allclose(bound, exact, rtol=1e-4)
    module = CPLClassifier(
        depth=1,
        depth_linear=1,
        conv_channels=2,
        conv_inner=3,
        linear_width=8,
        num_classes=3,
        pool=2,
        padding="CIRCULAR",
    )
    v = module.init(jax.random.key(1), jnp.zeros((1, 6, 6, 1)))
    sig = jax.jit(lambda v: layer_sigmas(module, v, 500))(v)
    assert set(sig) == {"convs_0", "denses_0"}
    assert lipschitz_upper_bound(module, v, 500, (6, 6, 1))["bound"] <= 1 + 1e-3
    assert lipschitz_upper_bound(module, v, 1, (6, 6, 1))["bound"] > 1 + 1e-3


def test_bad_model_config_is_rejected():
    from experiments import models

    c = tiny_config()
    c.model.eval_power_iters = 0
    with pytest.raises(ValueError, match="eval_power_iters"):
        models.build(c, 10)
    c = tiny_config()
    c.model.last_layer = "softmax"
    spec = models.build(c, 10)
    with pytest.raises(ValueError, match="last_layer"):
        spec.module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
