"""TRADES (β = 6) of an MDEQ on CIFAR-10 with the authors' setting: ε = 8/255,
step 2/255, 10 steps. Needs a prepared TFDS cifar10."""

from experiments.configs.deq_cifar10_pgdat import get_config as pgdat_config


def get_config():
    c = pgdat_config()
    c.train.loss = "trades"
    c.adv.beta = 6.0
    return c
