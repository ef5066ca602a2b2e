"""LyaDEQ on CIFAR-10 (needs a prepared TFDS cifar10): MDEQ-style cell of width 64,
Broyden 8 forward / 7 backward steps, ICNN widths 128,128, orthogonal layer."""

from experiments.configs.base import base_config
from experiments.configs.lyadeq_mnist import lyapunov_block


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model.update(name="lyadeq", width=64, inner=128, groups=8, head="gap")
    c.deq.update(
        solver="broyden", max_iter=8, adjoint_solver="broyden", adjoint_max_iter=7, eval_max_iter=30
    )
    c.train.update(epochs=50, batch_size=128, learning_rate=1e-3)
    c.lyapunov = lyapunov_block(icnn_widths="128,128")
    c.robustness.update(eps=f"{2 / 255},{4 / 255},{8 / 255}")
    return c
