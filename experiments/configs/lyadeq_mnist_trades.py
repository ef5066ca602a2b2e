"""LyaDEQ combined with TRADES (the settings of deq_mnist_trades)."""

from experiments.configs.deq_mnist_trades import get_config as trades_config
from experiments.configs.lyadeq_mnist import lyapunov_block


def get_config():
    c = trades_config()
    c.model.name = "lyadeq"
    c.lyapunov = lyapunov_block()
    return c
