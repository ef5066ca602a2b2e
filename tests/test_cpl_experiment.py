"""The ``cpl`` family in the experiment framework (Meunier et al. 2022): it trains
through experiments.train, evaluation stores each layer's σ once (Gram upper bound
and converged power iteration), the robustness report carries the provable and the
conventional certified accuracy next to the empirical attacks, no attack beats the
certificate, and the evaluated network is 1-Lipschitz (exact Jacobian)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax.cpl import SIGMA_COLLECTION, certified_logits, certified_radius, cpl_step_size
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib
from experiments.configs import cpl_mnist
from experiments.families.cpl import conventional_lipschitz_bound, cpl_net, net_variables
from experiments.workdir import load_run

EPS = (0.05, 0.15, 0.3)
TIGHT = 1 + 1e-6


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
    # restored (the power-iteration vectors) + prepared by load_run (the stored σ)
    assert set(run["state"].model_state) == {"power_iteration", SIGMA_COLLECTION}


def test_load_run_stores_sigma_once_and_evaluates_with_upper_bounds(run):
    spec, state = run["spec"], run["state"]
    assert spec.eval_kwargs == {"sigma": "upper"}
    sig = state.model_state[SIGMA_COLLECTION]["net"]
    assert set(sig) == {"convs_0", "denses_0"}
    for layer in sig.values():  # the bracket: power iteration (lower) <= Gram bound (upper)
        assert 0 < float(layer["power"]) <= float(layer["upper"]) * (1 + 1e-6)
        assert float(layer["upper"]) <= 1.05 * float(layer["power"])
        assert int(layer["power_steps"]) >= 2


def test_report_has_provable_and_conventional_certified_columns(run):
    for name in ("report.json", "report.md", "robustness.png"):
        assert os.path.getsize(os.path.join(run["workdir"], name)) > 0
    with open(os.path.join(run["workdir"], "report.json")) as fh:
        report = json.load(fh)
    assert report["norm"] == "l2" and report["model"] == "cpl"
    cert, conv = report["certified_accuracy"], report["certified_accuracy_conventional"]
    assert set(cert) == set(conv) == {str(float(e)) for e in EPS} == set(report["worst_case"])
    values = [cert[str(float(e))] for e in EPS]
    assert values == sorted(values, reverse=True) and values[0] <= report["clean_accuracy"]
    assert values[0] > 0  # something is certified, so the soundness check below has teeth
    for e in EPS:  # soundness, in aggregate: no attack beats the certificate
        assert report["worst_case"][str(float(e))] >= cert[str(float(e))]
        assert abs(cert[str(float(e))] - conv[str(float(e))]) <= 0.05
    md = open(os.path.join(run["workdir"], "report.md")).read()
    assert "| certified |" in md and "| certified (conventional) |" in md
    detail = report["certificate"]
    assert detail["attacked_vs_certified_max_logit_diff"] < 1e-5  # same network
    assert 1.0 <= detail["conventional_lipschitz_upper_bound"] < 1.1
    assert 0 <= detail["max_rel_gap_upper_vs_power_sigma"] < 0.05
    assert detail["prepare_seconds"] > 0 and detail["certify_seconds"] > 0


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
    spec, state = run["spec"], run["state"]
    model_vars = {"params": state.params, **state.model_state}
    view = lambda a: spec.module.apply(model_vars, a, **spec.eval_kwargs)[0]
    x, y = run["ds"].test_images[:60], jnp.asarray(run["ds"].test_labels[:60])
    variables = net_variables({"params": state.params, **state.model_state})
    radii = np.asarray(certified_radius(certified_logits(cpl_net(spec.module), variables, x), y))
    inflated_caught, attackers = 0, _attackers(view)
    for j, e in enumerate(EPS):
        robust = _attacked_correct(view, attackers, x, y, e, jax.random.key(j))
        assert not np.any((radii > e) & ~robust), e
        inflated_caught += int(np.sum((3 * radii > e) & ~robust))
    assert inflated_caught > 0


def test_evaluated_network_jacobian_norm_at_most_one(run):
    """The network the report evaluates (stored upper bounds) at a test point: exact
    Jacobian, float64."""
    spec, state = run["spec"], run["state"]
    x = run["ds"].test_images[:2]
    with jax.enable_x64(True):
        variables = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            {"params": state.params, **state.model_state},
        )
        xx = jnp.asarray(x, jnp.float64)

        def features(v, a):
            return spec.module.apply(v, a, method=lambda m, a: m.net.features(a, sigma="upper"))

        def logits(v, a):
            return spec.module.apply(v, a, **spec.eval_kwargs)[0]

        for f in (features, logits):
            jac = np.asarray(jax.jit(jax.jacfwd(f, argnums=1))(variables, xx))
            norm = np.linalg.norm(jac.reshape(-1, xx.size), 2)
            assert 0.05 < norm <= TIGHT, (f.__name__, norm)


def test_conventional_lipschitz_bound_formula():
    """max(1, h‖W‖² − 1) per layer with h = 2/(σ_power² + 1e-4) and ‖W‖ ≤ σ_upper."""
    assert conventional_lipschitz_bound({"a": {"power": 1.0, "upper": 1.0}}) == 1.0
    h = float(cpl_step_size(jnp.float32(1.0)))
    two = {"a": {"power": 1.0, "upper": 1.5}, "b": {"power": 2.0, "upper": 2.0}}
    np.testing.assert_allclose(conventional_lipschitz_bound(two), h * 2.25 - 1, rtol=1e-6)


def test_bad_model_config_is_rejected():
    from experiments import models

    c = tiny_config()
    c.model.eval_power_iters = 0
    with pytest.raises(ValueError, match="eval_power_iters"):
        models.build(c, 10)
    c = tiny_config()
    c.model.last_layer = "softmax"
    with pytest.raises(ValueError, match="last_layer"):
        models.build(c, 10)
    c = tiny_config()
    c.model.linear_width = 8
    with pytest.raises(ValueError, match="linear_width >= num_classes"):
        models.build(c, 10)
    c = tiny_config()
    c.model.converge_max_iters = 0
    with pytest.raises(ValueError, match="converge_max_iters"):
        models.build(c, 10)
