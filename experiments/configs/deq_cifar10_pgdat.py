"""PGD-AT of an MDEQ on CIFAR-10 with the DEQ robustness papers' setting:
ε = 8/255, step 2/255, 10 steps, uniform random start; Broyden 8 forward steps,
7 backward. Needs a prepared TFDS cifar10 (``tfds build cifar10``)."""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.dataset = "cifar10"
    c.model.update(width=64, inner=128, groups=8, head="gap")
    c.deq.update(
        solver="broyden",
        max_iter=8,
        adjoint_solver="broyden",
        adjoint_max_iter=7,
        eval_max_iter=30,
        tol=1e-3,
    )
    c.train.update(
        loss="pgd_at",
        epochs=100,
        batch_size=128,
        learning_rate=1e-3,
        optimizer="adam",
        schedule="cosine",
        warmup_steps=1000,
    )
    c.adv.update(eps=8 / 255, step=2 / 255, steps=10, norm="linf", attack_gradient="phantom")
    return c
