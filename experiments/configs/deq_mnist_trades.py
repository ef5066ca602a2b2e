"""TRADES adversarial training of deq_mnist (Zhang et al. 2019, β = 6): the inner
attack is ``adv.steps`` sign-gradient steps on the KL from x + 0.001·N(0, I),
scaled to run here in minutes (MNIST L∞ ε = 0.3 style)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.train.loss = "trades"
    c.train.epochs = 4
    c.deq.max_iter = 12
    c.deq.adjoint_max_iter = 12
    c.adv.update(eps=0.3, step=0.05, steps=7, norm="linf", beta=6.0, attack_gradient="phantom")
    return c
