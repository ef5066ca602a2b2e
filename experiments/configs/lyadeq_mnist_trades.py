"""LyaDEQ (lyadeq_mnist's finite-time model) trained with TRADES, with the settings of
deq_mnist_trades: the inner attack follows the phantom gradient (for a LyaDEQ: the last
``deq.phantom_steps`` of its K steps), the weight update the exact gradient (unroll).

Measured (docs/results/lyadeq.md): the model learns to defeat that phantom inner attack — 0.92
"robust" at ε = 0.3 through the phantom view, 0.00 through the exact K-step gradient.
``--config.adv.attack_gradient=unroll`` trains against the exact gradient (not yet
measured)."""

from experiments.configs.deq_mnist_trades import get_config as trades_config
from experiments.configs.lyadeq_mnist import finite_time


def get_config():
    c = trades_config()
    c.model.name = "lyadeq"
    return finite_time(c)
