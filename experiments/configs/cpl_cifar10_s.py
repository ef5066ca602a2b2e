"""CPL-S on CIFAR-10 (Meunier et al. 2022, "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML, Sec. 6): hinge loss (margin 0.7), Adam 1e-3,
batch 256, 200 epochs; certified and empirical ℓ2 accuracy at ε = 36/255, 72/255,
108/255. Sized for one GPU (hours), not for a CPU.

Sizes: 20 convolutional CPLs of 45 channels, 7 dense CPLs of width 2048, sum-pool 4,
truncation last layer; evaluation stores Gram-iteration upper bounds and converged
power-iteration σ once (see cpl_mnist.py). The depths/widths of
CPL-S/M/L are as recalled from the paper and the authors' code defaults (depth 20,
depth_linear 7, n_features 2048), not checked against the paper's table; the inner
channels of W are taken equal to the channels (the authors' code exposes them as a
separate ``conv_size``). No data augmentation (the paper uses crop + flip).
"""

from experiments.configs.base import base_config
from experiments.configs.cpl_mnist import cpl_model

CIFAR_EPS = ",".join(repr(k / 255) for k in (36, 72, 108))


def cifar_config(depth: int, channels: int):
    c = cpl_model(base_config())
    c.dataset = "cifar10"
    c.model.depth = depth
    c.model.depth_linear = 7
    c.model.conv_channels = channels
    c.model.conv_inner = channels
    c.model.linear_width = 2048
    c.model.pool = 4
    c.model.last_layer = "truncate"
    c.model.eval_power_iters = 100
    c.train.loss = "hinge"
    c.train.hinge_margin = 0.7
    c.train.epochs = 200
    c.train.batch_size = 256
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 2000  # ~10 epochs; the paper uses a triangular (one-cycle) schedule
    c.train.grad_clip = 0.0
    c.train.checkpoint_every_steps = 2000
    c.eval.batch_size = 500
    c.robustness.norm = "l2"
    c.robustness.eps = CIFAR_EPS
    c.robustness.attacks = "pgd,apgd-ce,apgd-t,square"
    c.robustness.n_examples = 1000
    c.robustness.n_iter = 100
    c.robustness.n_queries = 1000
    c.robustness.batch_size = 250
    c.robustness.gradients = "autodiff"
    return c


def get_config():
    return cifar_config(depth=20, channels=45)
