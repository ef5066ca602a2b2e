"""deq_mnist_trades evaluated with input entropy reduction at inference:
R = 3 rounds of T_f = 8 solver steps, 5 sign-gradient steps (η = 0.025) between rounds
inside an L∞ ball of 0.1 around the given input. Training is plain TRADES; the report
labels the adaptive (BPDA, full autodiff) and non-adaptive protocols."""

from experiments.configs.deq_mnist_trades import get_config as trades_config


def get_config():
    c = trades_config()
    c.entropy_reduction.update(
        enabled=True, rounds=3, round_steps=8, steps=5, eps=0.1, step_size=0.025
    )
    return c
