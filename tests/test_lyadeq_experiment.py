"""lyadeq trains through the common loop and its report carries the stability check."""

from experiments import evaluate as evaluate_lib
from experiments import train as train_lib
from experiments.configs import lyadeq_mnist
from tests.helpers import tiny_config


def test_lyadeq_trains_and_reports_stability(tmp_path):
    c = tiny_config(epochs=1)
    ly = lyadeq_mnist.get_config()
    c.model.name = "lyadeq"
    c.lyapunov = ly.lyapunov
    c.lyapunov.update(icnn_widths="8", orth_features=16)
    c.robustness.update(n_examples=8, batch_size=8, eps="0.1", attacks="fgsm", gradients="implicit")
    final = train_lib.train(c, str(tmp_path))
    assert 0.0 <= final["test_accuracy"] <= 1.0
    report = evaluate_lib.evaluate(str(tmp_path), quiet=True)
    st = report["stability"]
    assert st["n_perturb"] == 16 and st["max_distance"] >= st["mean_distance"] >= 0.0
    assert 0.0 <= st["fraction_converged"] <= 1.0
