"""Seeds as a vmapped axis (train.seeds) and fixed-point reuse in training
(train.reuse_fixed_points)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import data as data_lib
from experiments import common, models, seeds
from experiments import fixed_points as fp
from experiments import train as train_lib
from experiments.workdir import load_run, load_seed_runs
from tests.helpers import tiny_config


def _leaves(state):
    return [np.asarray(a) for a in jax.tree.leaves(state.params)]


@pytest.mark.slow
def test_two_seeds_equal_two_single_runs_and_one_seed_is_the_plain_run(tmp_path):
    """seeds=2 (one vmapped program) equals the single runs with seeds 0 and 1 (float
    tolerance); seeds=1 is bit-for-bit the plain step loop (init_state + make_train_step
    over the epoch's batches, as before the key existed)."""
    c = tiny_config(epochs=1)
    train_lib.train(c, str(tmp_path / "s0"))
    c1 = tiny_config(epochs=1)
    c1.seed = 1
    train_lib.train(c1, str(tmp_path / "s1"))
    c2 = tiny_config(epochs=1)
    c2.train.seeds = 2
    final = train_lib.train(c2, str(tmp_path / "k2"))
    assert [r["seed"] for r in final["seeds"]] == [0, 1]
    runs = load_seed_runs(str(tmp_path / "k2"))
    assert [r.config.seed for r in runs] == [0, 1] and runs[1].config.train.seeds == 1
    for i, single in enumerate(["s0", "s1"]):
        ref = _leaves(load_run(str(tmp_path / single)).state)
        for a, b in zip(_leaves(runs[i].state), ref, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    # the report scores each seed on the same images: per-seed entries, across-seed summary
    from experiments import compare
    from experiments.evaluate import evaluate

    cheap = {"attacks": "fgsm", "gradients": "implicit", "eps": "0.1", "n_examples": "24"}
    rep = evaluate(str(tmp_path / "k2"), cheap, quiet=True)
    assert [e["seed"] for e in rep["seeds"]] == [0, 1]
    assert rep["seeds"][0]["worst_case"] == rep["worst_case"]
    worst = [e["worst_case"]["0.1"] for e in rep["seeds"]]
    summary = rep["across_seeds"]["worst_case"]["0.1"]
    assert summary["values"] == worst and summary["mean"] == pytest.approx(np.mean(worst))
    assert summary["sd"] == pytest.approx(np.std(worst, ddof=1))
    assert len({e["outcomes"]["images"] for e in rep["seeds"]}) == 1
    assert "Over 2 seeds" in (tmp_path / "k2" / "report.md").read_text()
    assert len(compare.seed_reports(compare.load_report(str(tmp_path / "k2")))) == 2
    # seeds=1: the plain loop, bit for bit
    ds = data_lib.load_dataset(c.dataset, None, c.limit_train, c.limit_test)
    spec = models.build(c, ds.num_classes)
    steps = data_lib.batches_per_epoch(len(ds.train_images), c.train.batch_size)
    opt = common.build_optimizer(c.train, steps)
    state = common.init_state(spec.module, opt, ds.image_shape, c.seed)
    step = train_lib.make_train_step(spec, opt, c)
    perm = data_lib.epoch_permutation(len(ds.train_images), c.seed, 0)
    for b in range(steps):
        idx = perm[b * c.train.batch_size : (b + 1) * c.train.batch_size]
        state, _ = step(state, ds.train_images[idx], ds.train_labels[idx])
    for a, b in zip(_leaves(load_run(str(tmp_path / "s0")).state), _leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def _converging_config():
    c = tiny_config(epochs=1)
    c.deq.max_iter, c.deq.tol = 40, 1e-4
    c.train.reuse_fixed_points = True
    return c


class _Cell(nn.Module):
    """A small contractive cell: z ↦ tanh(0.5·W z + u), ‖W‖ ≤ 1."""

    @nn.compact
    def __call__(self, z, u):
        w = self.param("w", nn.initializers.orthogonal(), (z.shape[-1], z.shape[-1]))
        return jnp.tanh(0.5 * z @ w + u)


def test_reused_starts_give_the_same_fixed_points_in_fewer_steps():
    """A small DEQ whose weights move between two visits (as in training): the solve
    started from the previous visit's equilibrium (with the residual reset test) reaches
    the cold solve's fixed point to tolerance, in fewer steps."""
    from deqjax.deq import DEQConfig
    from deqjax.models import DEQ
    from deqjax.solvers import SolverConfig

    config = DEQConfig(forward=SolverConfig(method="anderson", max_iter=50, tol=1e-5))
    layer = DEQ(_Cell(), config)
    u = jax.random.normal(jax.random.PRNGKey(1), (16, 24))
    v = layer.init(jax.random.PRNGKey(0), u)
    z_prev, _ = layer.apply(v, u)
    moved = jax.tree.map(lambda p: p * 1.02, v)  # one "update" later
    z_cold, cold = layer.apply(moved, u)
    (z_warm, warm), sown = layer.apply(
        moved, u, z0=z_prev, reset_stale=True, mutable=["fixed_points"]
    )
    assert np.all(cold.converged) and np.all(warm.converged)
    z_sown, reset = fp.sown_state(sown["fixed_points"])
    assert not np.any(reset)
    np.testing.assert_allclose(z_warm, z_cold, atol=1e-4)
    np.testing.assert_array_equal(z_sown, z_warm)
    assert np.mean(warm.steps) < 0.8 * np.mean(cold.steps)


def test_train_step_reads_and_writes_the_store_at_the_batch_indices():
    c = tiny_config(epochs=1)
    c.train.reuse_fixed_points = True
    ds = data_lib.load_dataset(c.dataset, None, 64, 10)
    spec = models.build(c, ds.num_classes)
    opt = common.build_optimizer(c.train, 8)
    state = common.init_state(spec.module, opt, ds.image_shape, 0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    store = fp.new_store(spec, ds.image_shape, 64, mesh)
    assert store.shape == (64, 14, 14, 8)
    step = train_lib.make_train_step(spec, opt, c)
    idx = np.arange(0, 64, 2)  # every other example
    x, y = ds.train_images[idx], ds.train_labels[idx]
    state, aux, store = step(state, x, y, idx, store)
    s = np.asarray(store)
    assert np.all(np.abs(s[idx]).reshape(32, -1).max(1) > 0) and not np.any(s[1::2])
    assert float(aux["reuse_reset"]) == 0.0  # first visit: zero starts are never "reset"


def test_stale_starts_are_reset_to_zero():
    """A start worse than zero (‖f(z0) − z0‖ > ‖f(0)‖) is replaced by zero: the
    solution is the cold one and the reset mask says so; a good start is kept."""
    c = _converging_config()
    spec = models.build(c, 10)
    x = jnp.asarray(data_lib.load_dataset(c.dataset, None, 8, 1).train_images[:4])
    variables = spec.module.init(jax.random.PRNGKey(0), x)

    def solve(z0):
        (z, _), sown = spec.module.apply(
            variables,
            x,
            method=lambda m, x: m.equilibrium(m.injection(x), z0=z0, reset_stale=True),
            mutable=["fixed_points"],
        )
        return z, fp.sown_state(sown["fixed_points"])[1]

    z_cold, reset = solve(None)
    assert not np.any(reset)
    garbage = 100.0 * jnp.ones_like(z_cold).at[:2].set(0.0)  # rows 2, 3 stale
    z, reset = solve(garbage)
    np.testing.assert_array_equal(np.asarray(reset), [False, False, True, True])
    np.testing.assert_allclose(z, z_cold, rtol=1e-5, atol=1e-5)
    _, reset = solve(z_cold)  # the equilibrium itself is a good start
    assert not np.any(reset)


def test_reuse_is_refused_where_it_would_change_the_model():
    c = tiny_config(epochs=1, name="explicit")
    c.train.reuse_fixed_points = True
    with pytest.raises(ValueError, match="no warm-startable DEQ state"):
        train_lib.make_loss_fn(models.build(c, 10), c)
    c = _converging_config()
    c.deq.backward = "unroll"
    with pytest.raises(ValueError, match="implicit or phantom"):
        train_lib.make_loss_fn(models.build(c, 10), c)
    assert seeds.seed_count(c) == 1
