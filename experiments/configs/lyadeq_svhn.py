"""LyaDEQ on SVHN (needs a prepared TFDS svhn_cropped); otherwise as lyadeq_cifar10."""

from experiments.configs.lyadeq_cifar10 import get_config as cifar_config


def get_config():
    c = cifar_config()
    c.dataset = "svhn_cropped"
    return c
