"""deq_mnist_trades with random intermediate states (Yang et al. 2023): every
training forward, the inner attack's included, runs n ~ U{1, …, 12} solver steps and
uses z_n with the phantom gradient (K = 5, λ = 0.5)."""

from experiments.configs.deq_mnist_trades import get_config as trades_config


def get_config():
    c = trades_config()
    c.deq.random_states_max = 12
    c.deq.update(backward="phantom", phantom_steps=5, phantom_damping=0.5)
    return c
