"""lyadeq trains through the common loop as the finite-time model of docs/methods/lyadeq.md, and its
report carries the stability and gradient sections."""

import ml_collections
import pytest

from experiments import evaluate as evaluate_lib
from experiments import models
from experiments import train as train_lib
from experiments.configs import lyadeq_mnist, lyadeq_mnist_trades
from experiments.families import lyadeq as lyadeq_family


def tiny_lyadeq_config():
    c = lyadeq_mnist.get_config()
    c.limit_train, c.limit_test = 128, 50
    c.model.width, c.model.inner, c.model.groups = 8, 8, 4
    c.lyapunov.update(icnn_widths="8", orth_features=16, steps=3, alpha=1.0)
    c.train.update(epochs=1, batch_size=32, progress=False, warmup_steps=2)
    c.train.checkpoint_every_steps = 5
    c.eval.batch_size = 50
    c.robustness.update(
        after_training=False,
        n_examples=8,
        batch_size=8,
        eps="0.1",
        attacks="fgsm",
        gradients="unroll,intermediate",
        state_indices="1",
    )
    return c


def test_lyadeq_trains_and_reports_stability_and_gradients(tmp_path):
    c = tiny_lyadeq_config()
    assert (c.deq.max_iter, c.deq.eval_max_iter) == (3, 3)  # tied to lyapunov.steps
    final = train_lib.train(c, str(tmp_path))
    assert 0.0 <= final["test_accuracy"] <= 1.0
    assert final["test_forward_steps"] == 3 and final["test_nonconverged"] == 0.0
    report = evaluate_lib.evaluate(str(tmp_path), quiet=True)
    assert set(report["robust_accuracy"]["0.1"]) == {"fgsm/unroll", "fgsm/intermediate_z1"}
    assert report["solver"]["mean_steps"] == 3 and report["solver"]["converged_fraction"] == 1
    st = report["stability"]
    assert st["steps"] == 3 and len(st["mean_v_per_step"]) == 4
    assert st["mean_v_per_step"][0] == 0.0
    assert st["fraction_v_increases"] >= 1 / 3  # the first step from V(0) = 0 always is
    assert 0.0 <= st["fraction_v_increases_after_first_step"] <= 1.0
    assert 0.0 <= st["fraction_projection_active"] <= 1.0
    sp = st["spread"]
    assert sp["n_perturb"] == 16 and sp["max_distance"] >= sp["mean_distance"] >= 0.0
    assert sp["mean_initial_distance"] > 0
    g = report["gradient_norms"]
    assert g["backward"] == "unroll" and g["base_cell"] > 0
    assert g["icnn"] > 0 and g["icnn_min_leaf"] > 0  # V is trained ...
    assert g["icnn_min_leaf_max_abs_change"] > 0  # ... and every ICNN parameter moved
    assert 0.0 <= st["fraction_icnn_term_alive"] <= 1.0
    assert 0.0 <= sp["fraction_prediction_changed"] <= 1.0
    # the docs' comparison table and plot from reports (naive view: unroll here)
    table = lyadeq_family.comparison_table([("LyaDEQ", report)])
    assert "| LyaDEQ |" in table and "ε=0.1 naive / worst" in table
    lyadeq_family.main(["--out", str(tmp_path / "cmp.png"), f"LyaDEQ={tmp_path}"])
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_lyadeq_config_must_be_the_same_k_steps_in_training_and_evaluation():
    c = tiny_lyadeq_config()
    c.lyapunov.steps = 7
    assert (c.deq.max_iter, c.deq.eval_max_iter) == (7, 7)
    models.build(c, 10)
    c.deq.eval_max_iter = 9  # a tie, not a copy: K changes everywhere
    assert c.lyapunov.steps == c.deq.max_iter == 9
    # a config without the ties (e.g. read back from config.json) is checked
    plain = ml_collections.ConfigDict(c.to_dict())
    plain.deq.eval_max_iter = 40
    with pytest.raises(ValueError, match="finite-time system of lyapunov.steps = 9"):
        models.build(plain, 10)
    c.deq.update(solver="anderson", tol=1e-3)
    with pytest.raises(ValueError, match="the deq block disagrees"):
        models.build(c, 10)
    t = lyadeq_mnist_trades.get_config()
    assert t.train.loss == "trades" and t.adv.attack_gradient == "phantom"
    models.build(t, 10)
