"""The weight-tied explicit twin of deq_mnist: the same cell unrolled 6 times."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.model.name = "explicit_mdeq"
    c.model.depth = 6
    return c
