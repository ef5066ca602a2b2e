"""The training loop: loss goes down, checkpoints resume exactly, bad configs fail loudly."""

import json
import subprocess

import jax
import numpy as np
import pytest

from experiments import train as train_lib
from experiments.configs import deq_mnist
from experiments.workdir import load_run
from tests.helpers import ROOT, read_metrics, tiny_config, train_command


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
        train_command(tmp_path, "--config.train.epoch=3"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown config key 'config.train.epoch'" in out.stderr and "epochs" in out.stderr


def test_cli_refuses_invalid_values_before_any_work(tmp_path):
    """``--config.train.epochs=-1`` used to exit 0 and report an untrained model; a zero
    batch size raised ZeroDivisionError. Both are refused, each named with its fix, and
    nothing is written."""
    workdir = tmp_path / "run"
    out = subprocess.run(
        train_command(workdir, "--config.train.epochs=-1", "--config.train.batch_size=0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config.train.epochs = -1: must be >= 1" in out.stderr
    assert "--config.train.epochs=3" in out.stderr  # the fix
    assert "config.train.batch_size = 0: must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr and not workdir.exists()


def test_invalid_config_values_are_refused_naming_each_key(tmp_path):
    from experiments.common import ConfigError

    for key, value in (("epochs", -1), ("batch_size", 0)):
        c = tiny_config()
        c.train[key] = value
        with pytest.raises(ConfigError, match=rf"config\.train\.{key} = {value}: must be >= 1"):
            train_lib.train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    c = tiny_config()
    c.train.learning_rate = -1e-3
    c.adv.eps = -0.1
    c.robustness.eps = "0.1,-0.2"
    c.deq.damping = 0.0
    c.train.nonconvergence_warning = float("nan")
    with pytest.raises(ConfigError) as err:  # one error listing every bad key
        train_lib.train(c, str(tmp_path / "run"))
    text = str(err.value)
    for expected in (
        "config.train.learning_rate = -0.001: must be > 0",
        "config.adv.eps = -0.1: must be >= 0",
        "config.robustness.eps = '0.1,-0.2': every radius must be finite and >= 0",
        "config.deq.damping must be in (0, 1]",
        "config.train.nonconvergence_warning = nan: must be finite",
    ):
        assert expected in text, text


def _damage(step_dir, how: str) -> None:
    """Truncate (to half) or delete the array files of a checkpoint step's state."""
    import shutil

    if how == "delete":
        shutil.rmtree(step_dir / "state")
        return
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)


# tensorstore reads left in flight by a failed restore call into orbax's closed event
# loop (restore_latest quietens them; a late one may still reach pytest's own hook)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_one_clear_error_naming_the_intact_step(tmp_path):
    """A truncated latest checkpoint used to surface as a raw tensorstore error: it is one
    CheckpointError naming the workdir, the damaged step, the newest intact step and how
    to resume from it; only when asked (--skip_damaged_checkpoints) does training fall
    back to that step, keeping the damaged one aside."""
    import shutil

    from experiments.common import CheckpointError

    # checkpointing does not depend on the model: the explicit twin compiles faster
    c = tiny_config(epochs=1, name="explicit")
    c.limit_train, c.limit_test, c.train.batch_size = 64, 32, 16  # 4 steps
    c.train.checkpoint_every_steps = 2
    workdir = tmp_path / "run"
    train_lib.train(c, str(workdir))
    ckpt = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir()) == [2, 4]
    _damage(ckpt / "4", "truncate")
    for attempt in (lambda: load_run(str(workdir)), lambda: train_lib.train(c, str(workdir))):
        with pytest.raises(CheckpointError) as err:
            attempt()
        text = str(err.value)
        assert f"the checkpoint of step 4 in workdir {workdir} is damaged" in text, text
        assert (
            f"Step 2 is intact: to resume from it, delete the damaged step 4 (rm -r {ckpt / '4'})"
            in text
        )
    assert "--skip_damaged_checkpoints" in text  # training names its flag
    out = train_lib.train(c, str(workdir), skip_damaged_checkpoints=True)
    assert (out["resumed_from"], out["step"]) == (2, 4)
    assert (workdir / "checkpoints_damaged" / "4" / "state").is_dir()
    assert int(load_run(str(workdir)).state.step) == 4  # the re-trained step 4 restores
    # no intact step left: the message says so (and names the possible config change)
    _damage(ckpt / "4", "delete")
    _damage(ckpt / "2", "truncate")
    with pytest.raises(
        CheckpointError, match=r"No earlier step restores either \(tried steps \[2\]\)"
    ):
        load_run(str(workdir))
    shutil.rmtree(ckpt / "2")
    with pytest.raises(CheckpointError, match=f"It is the only checkpoint: delete {ckpt}"):
        load_run(str(workdir))


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
    # The inner attack must do something: at the trained parameters the training loss
    # exceeds the clean CE by a clear margin (measured 0.3-0.7). An attack that returns
    # x (or only its random start: gap ≤ 0.03) leaves the loss at the clean CE (TRADES:
    # KL(p(x) ‖ p(x)) = 0), and the learning test above would still pass.
    import jax.numpy as jnp

    run = load_run(str(tmp_path))
    x = jnp.asarray(run.dataset.train_images[:64])
    y = jnp.asarray(run.dataset.train_labels[:64])
    clean = c.copy_and_resolve_references()
    clean.train.loss = "ce"
    fns = [train_lib.make_loss_fn(run.spec, cfg) for cfg in (c, clean)]
    key, probe = jax.random.PRNGKey(0), jnp.zeros((64, 2))
    adv_loss, clean_loss = jax.jit(lambda p, ms: [f(p, ms, x, y, key, probe)[0] for f in fns])(
        run.state.params, run.state.model_state
    )
    assert float(adv_loss) > float(clean_loss) + 0.1, (float(adv_loss), float(clean_loss))


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
        loss, (aux, _) = jax.jit(train_lib.make_loss_fn(spec, c))(
            state.params, state.model_state, x, y, key, probe
        )
        losses[w] = (float(loss), aux)
    est = float(losses[2.0][1]["jacobian_frobenius_sq"])
    assert est > 0 and "jacobian_frobenius_sq" not in losses[0.0][1]
    np.testing.assert_allclose(losses[2.0][0] - losses[0.0][0], 2.0 * est, rtol=1e-4)


def test_nonfinite_step_stops_training_naming_it_or_is_skipped_and_counted(tmp_path):
    """A diverging run (learning rate 1e30; 256 examples, batch 32: 8 steps). The warm-up
    makes step 1's rate 0 and step 2's 5e29: step 2's update is finite but huge, so step
    3 is the first whose loss/gradient overflows. Training stops there with an error
    naming step 3 (epoch 1, batch 2) and no checkpoint past step 2; with
    train.skip_nonfinite every step from 3 on is skipped (the state stays step 2's, so
    each later batch overflows too): exactly 6 of 8 steps counted, and the whole state
    (parameters, optimiser state) stays finite. (A NaN pixel never gets this far: data
    loading refuses it.)"""
    c = tiny_config(epochs=1)
    c.train.learning_rate = 1e30
    c.train.checkpoint_every_steps = 2
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss or gradient at step 3 \(epoch 1, batch 2: "
    ):
        train_lib.train(c, str(tmp_path / "stop"))
    assert not (tmp_path / "stop" / "final.json").exists()
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == ["2"]
    c.train.skip_nonfinite = True
    train_lib.train(c, str(tmp_path / "skip"))
    m = read_metrics(tmp_path / "skip")
    assert m[0]["step"] == 8 and m[0]["train_nonfinite"] == 6 / 8
    state = load_run(str(tmp_path / "skip")).state
    assert int(state.step) == 8
    for part in (state.params, state.opt_state, state.model_state):
        assert all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree.leaves(part))
