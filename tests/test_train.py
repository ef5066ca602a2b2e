"""The training loop: loss goes down, checkpoints resume exactly, bad configs fail loudly."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import train as train_lib
from experiments.configs import deq_mnist
from experiments.workdir import load_run
from tests.helpers import ROOT, read_metrics, tiny_config


def test_training_reduces_loss_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    train_lib.train(tiny_config(epochs=2), str(full))
    m = read_metrics(full)
    assert m[1]["train_loss"] < m[0]["train_loss"]
    assert 0 < m[0]["train_forward_steps"] <= 6 and m[0]["train_backward_steps"] > 0
    # A run interrupted mid-epoch and restarted ends where the uninterrupted run did.
    part = tmp_path / "part"
    first = train_lib.train(tiny_config(epochs=2), str(part), stop_at_step=11)
    assert first["interrupted"] and (first["resumed_from"], first["steps_run"]) == (0, 11)
    final = train_lib.train(tiny_config(epochs=2), str(part))
    # it resumed: 5 steps from the checkpoint at 11, not 16 from scratch
    assert (final["resumed_from"], final["steps_run"]) == (11, 5)
    full_final = json.load(open(full / "final.json"))
    assert final["step"] == full_final["step"] == 16
    for a, b in zip(
        jax.tree.leaves(load_run(str(full)).state), jax.tree.leaves(load_run(str(part)).state)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert final["test_accuracy"] == full_final["test_accuracy"]
    resumed = read_metrics(part)
    np.testing.assert_allclose(resumed[0]["train_loss"], m[0]["train_loss"], rtol=1e-6)
    assert resumed[1]["test_accuracy"] == m[1]["test_accuracy"]


def test_explicit_baseline_trains(tmp_path):
    c = tiny_config(epochs=2, name="explicit")
    c.train.learning_rate = 0.01  # 16 steps: 2e-3 gets to 0.18 only
    final = train_lib.train(c, str(tmp_path))
    m = read_metrics(tmp_path)
    assert m[1]["train_loss"] < m[0]["train_loss"]
    assert final["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert "test_forward_steps" not in final  # an explicit net has no solver statistics


def test_cli_rejects_unknown_config_key(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            "experiments/configs/deq_mnist.py",
            "--workdir",
            str(tmp_path),
            "--config.train.epoch=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown config key 'config.train.epoch'" in out.stderr and "epochs" in out.stderr


def test_unknown_model_and_loss_names():
    from experiments import models

    c = tiny_config()
    c.model.name = "resnet9000"
    with pytest.raises(ValueError, match="unknown model name"):
        models.build(c, 10)
    c = tiny_config()
    c.train.loss = "hinge2"
    with pytest.raises(ValueError, match="unknown train.loss"):
        train_lib.make_loss_fn(models.build(c, 10), c)


@pytest.mark.e2e
def test_deq_mnist_reaches_95_percent(tmp_path):
    """The quick-start config on mnist_5k (3 epochs)."""
    c = deq_mnist.get_config()
    c.train.progress = False
    c.robustness.after_training = False  # the report is tested in test_evaluate.py
    final = train_lib.train(c, str(tmp_path))
    assert final["test_accuracy"] >= 0.95, final


@pytest.mark.parametrize("loss", ["pgd_at", "trades", "mixed"])
def test_adversarial_training_step_runs_and_learns(loss, tmp_path):
    c = tiny_config(epochs=2)
    c.limit_train = 128
    c.train.loss = loss
    c.adv.steps = 2
    train_lib.train(c, str(tmp_path))
    m = read_metrics(tmp_path)
    assert m[1]["train_loss"] < m[0]["train_loss"]
    if loss != "pgd_at":
        assert 0.0 <= m[0]["train_adversarial_accuracy"] <= m[0]["train_accuracy"] + 0.25


def test_jacobian_regulariser_enters_the_loss():
    """``deq.jac_reg = w`` adds w × the Hutchinson estimate sown inside the DEQ layer
    (it was once keyed by the submodule's name and silently weighted 0)."""
    import jax.numpy as jnp

    from experiments import common, models

    c = tiny_config()
    spec = models.build(c, 10)
    state = common.init_state(spec.module, common.build_optimizer(c.train, 10), (28, 28, 1), 0)
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
    y, key, probe = jnp.arange(4), jax.random.PRNGKey(1), jnp.zeros((4, 2))
    losses = {}
    for w in (0.0, 2.0):
        c.deq.jac_reg = w
        loss, (aux, _) = train_lib.make_loss_fn(spec, c)(
            state.params, state.model_state, x, y, key, probe
        )
        losses[w] = (float(loss), aux)
    est = float(losses[2.0][1]["jacobian_frobenius_sq"])
    assert est > 0 and "jacobian_frobenius_sq" not in losses[0.0][1]
    np.testing.assert_allclose(losses[2.0][0] - losses[0.0][0], 2.0 * est, rtol=1e-4)


def test_nonfinite_step_stops_training_naming_it_or_is_skipped_and_counted(tmp_path):
    """A diverging run (learning rate 1e30: the first real update overflows the model):
    training stops at the first non-finite loss/gradient with an error naming the step;
    with train.skip_nonfinite such steps are skipped (the parameters stay finite) and
    counted in metrics.jsonl. (A NaN pixel never gets this far: data loading refuses it.)"""
    c = tiny_config(epochs=1)
    c.train.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step \d+ "):
        train_lib.train(c, str(tmp_path / "stop"))
    assert not (tmp_path / "stop" / "final.json").exists()
    c.train.skip_nonfinite = True
    train_lib.train(c, str(tmp_path / "skip"))
    m = read_metrics(tmp_path / "skip")
    assert 0 < m[0]["train_nonfinite"] < 1
    state = load_run(str(tmp_path / "skip")).state
    assert all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(state.params))
