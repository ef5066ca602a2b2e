"""CIFAR-10 TRADES DEQ with both regulations and the authors' settings:
random intermediate states in training; entropy reduction at inference with
ε = 8/255, η = 2/255, 10 steps. Needs a prepared TFDS cifar10."""

from experiments.configs.deq_cifar10_trades import get_config as trades_config


def get_config():
    c = trades_config()
    c.deq.random_states_max = 8
    c.deq.update(backward="phantom", phantom_steps=5, phantom_damping=0.5)
    c.entropy_reduction.update(
        enabled=True, rounds=3, round_steps=8, steps=10, eps=8 / 255, step_size=2 / 255
    )
    return c
