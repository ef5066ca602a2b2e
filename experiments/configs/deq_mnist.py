"""A small MDEQ on mnist_5k (the quick start): implicit gradient, Anderson solver."""

from experiments.configs.base import base_config


def get_config():
    return base_config()
