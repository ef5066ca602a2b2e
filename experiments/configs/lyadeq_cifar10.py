"""LyaDEQ on CIFAR-10 (needs a prepared TFDS cifar10): MDEQ-style cell of width 64,
ICNN widths 128,128, orthogonal layer; the finite-time model of lyadeq_mnist."""

from experiments.configs.base import base_config
from experiments.configs.lyadeq_mnist import finite_time


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model.update(name="lyadeq", width=64, inner=128, groups=8, head="gap")
    c.train.update(epochs=50, batch_size=128, learning_rate=1e-3)
    c.robustness.update(eps=f"{2 / 255},{4 / 255},{8 / 255}")
    return finite_time(c, icnn_widths="128,128")
