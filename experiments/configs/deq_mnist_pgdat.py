"""PGD adversarial training of deq_mnist (Madry et al. 2018), MNIST L∞ ε = 0.3 style,
scaled to run here in minutes: 7-step PGD with step 0.05 and a uniform random
start; the inner attack uses the phantom gradient (K = 5, λ = 0.5), the weight
update the implicit one. For CIFAR-10 with the authors' setting use
``deq_cifar10_pgdat``."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.train.loss = "pgd_at"
    c.train.epochs = 4
    c.deq.max_iter = 12
    c.deq.adjoint_max_iter = 12
    c.adv.update(eps=0.3, step=0.05, steps=7, norm="linf", attack_gradient="phantom")
    return c
