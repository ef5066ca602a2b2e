"""Regulating DEQ dynamics: random intermediate states and input entropy reduction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.deq import DEQConfig
from deqjax.models import MDEQClassifier
from deqjax.regulation import RandomSteps, entropy_reduction, prediction_entropy
from deqjax.robustness import evaluate_robustness
from deqjax.solvers import SolverConfig
from experiments import report
from experiments import train as train_lib
from experiments.views import model_views
from experiments.workdir import load_run
from tests.helpers import tiny_config

CFG = DEQConfig(forward=SolverConfig(max_iter=6, tol=0.0))


def tiny_model():
    m = MDEQClassifier(width=8, inner=8, groups=4, deq=CFG)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
    return m, m.init(jax.random.PRNGKey(1), x), x


def test_random_states_uniform_and_reproducible():
    m, v, x = tiny_model()
    run = jax.jit(lambda k: m.apply(v, x, random_steps=RandomSteps(k, 5))[1].steps)
    steps = np.array([int(run(jax.random.PRNGKey(i))[0]) for i in range(200)])
    counts = np.bincount(steps, minlength=6)[1:]
    assert counts.sum() == 200 and set(np.unique(steps)) == {1, 2, 3, 4, 5}
    assert counts.min() >= 20 and counts.max() <= 62  # ~40 each; a binomial 5-sigma band
    k = jax.random.PRNGKey(7)
    a = m.apply(v, x, random_steps=RandomSteps(k, 5))[0]
    b = m.apply(v, x, random_steps=RandomSteps(k, 5))[0]
    np.testing.assert_array_equal(a, b)
    # the returned state is z_n of a plain n-step solve, differentiated by the phantom gradient
    n = int(run(k)[0])
    fixed = DEQConfig(
        forward=SolverConfig(max_iter=n, tol=0.0, return_state="last"), backward="phantom"
    )
    ref = m.apply(v, x, config=fixed)[0]
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reg"))
    c = tiny_config(epochs=2)
    c.limit_train, c.train.batch_size = 512, 32
    c.entropy_reduction.update(
        enabled=True, rounds=2, round_steps=4, steps=3, eps=0.1, step_size=0.03
    )
    train_lib.train(c, workdir)
    return load_run(workdir)


def test_entropy_reduction_lowers_entropy_and_stays_in_ball(trained):
    config, spec, state, ds, _ = trained
    variables = {"params": state.params, **state.model_state}
    m = spec.module
    x = jnp.asarray(ds.test_images[:64])
    cfg4 = DEQConfig(forward=SolverConfig(max_iter=4, tol=0.0))

    def pipeline(steps):
        return jax.jit(
            lambda x: entropy_reduction(
                lambda xx: m.apply(variables, xx, method="inject"),
                lambda u, z0: m.apply(variables, u, z0, cfg4, method="solve_from")[0],
                lambda u, z: m.apply(variables, u, z, 5, 0.5, method="phantom_from"),
                lambda z: m.apply(variables, z, method="classify"),
                x,
                rounds=3,
                steps=steps,
                eps=0.1,
                step_size=0.03,
            )
        )

    logits, x_p = pipeline(5)(x)
    # control: the same pipeline (3 rounds of 4 restarted solver steps) without input steps
    logits_0, x_p0 = pipeline(0)(x)
    np.testing.assert_array_equal(x_p0, x)
    entropy = lambda z: float(jnp.mean(prediction_entropy(z)))
    assert entropy(logits) < entropy(logits_0)
    plain = m.apply(variables, x, config=DEQConfig(forward=SolverConfig(max_iter=12, tol=0.0)))[0]
    assert entropy(logits) < entropy(plain)
    assert float(x_p.min()) >= 0.0 and float(x_p.max()) <= 1.0
    assert float(jnp.max(jnp.abs(x_p - x))) <= 0.1 + 1e-6
    assert float(jnp.max(jnp.abs(x_p - x))) > 0.0  # the input did move


def test_adaptive_attack_at_least_as_strong_as_non_adaptive(trained):
    ds = trained.dataset
    r = report.robustness_options(trained.config, {"gradients": "implicit"})
    (evaluated,) = model_views(trained, r).values()
    assert list(evaluated.views) == [
        "autodiff",
        "bpda_implicit",
        "guided_implicit",
        "bpda_purified_implicit",
        "transfer_implicit",
    ]
    views = {k: evaluated.views[k] for k in ("guided_implicit", "transfer_implicit")}
    told = []
    rep = evaluate_robustness(
        views,
        ds.test_images[:48],
        ds.test_labels[:48],
        jax.random.PRNGKey(0),
        eps_list=[0.15],
        attacks=["pgd"],
        n_iter=10,
        batch_size=48,
        progress=lambda *a: told.append(a),
        score=evaluated.score,
    )
    assert told == [
        ("eps=0.15 pgd/guided_implicit", 0, 2),
        ("eps=0.15 pgd/transfer_implicit", 1, 2),
    ]
    per = rep["robust_accuracy"]["0.15"]
    assert per["pgd/guided_implicit"] <= per["pgd/transfer_implicit"]
    assert rep["worst_case"]["0.15"] <= min(per.values())
