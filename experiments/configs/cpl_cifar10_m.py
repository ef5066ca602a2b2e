"""CPL-M on CIFAR-10 (Meunier et al. 2022): 30 convolutional CPLs of 60 channels,
7 dense CPLs of width 2048; otherwise as cpl_cifar10_s (see its docstring for what
is assumed about the paper's sizes)."""

from experiments.configs.cpl_cifar10_s import cifar_config


def get_config():
    return cifar_config(depth=30, channels=60)
