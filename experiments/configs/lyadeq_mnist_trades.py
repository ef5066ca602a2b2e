"""LyaDEQ (lyadeq_mnist's finite-time model) trained with TRADES (the settings of
deq_mnist_trades); the inner attack differentiates the K steps exactly (unroll)."""

from experiments.configs.deq_mnist_trades import get_config as trades_config
from experiments.configs.lyadeq_mnist import finite_time


def get_config():
    c = trades_config()
    c.model.name = "lyadeq"
    c.adv.attack_gradient = "unroll"
    return finite_time(c)
