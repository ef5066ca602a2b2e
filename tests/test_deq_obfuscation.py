"""Gradient obfuscation of an adversarially trained DEQ, measured (docs/results/obfuscation.md).

`tests/data/deq_mnist_trades_params.msgpack` holds `deq_mnist_trades` trained here (TRADES,
3 epochs). The same PGD-10 (same random starts) follows the naive implicit gradient and
the simultaneous adjoint — the adjoint iteration run along the forward solver's
intermediate states — and both are scored on the model's own 40-step forward. On this
model the attack through the intermediate states finds adversarial examples the naive
implicit-gradient attack misses (docs/results/obfuscation.md)."""

import os

import flax.serialization
import jax
import jax.numpy as jnp
import pytest

from deqjax import attacks
from deqjax import data as data_lib
from deqjax.deq_gradients import AttackView
from experiments import models
from experiments.configs import deq_mnist_trades

PARAMS = os.path.join(os.path.dirname(__file__), "data", "deq_mnist_trades_params.msgpack")


# e2e, not in the default run: its margin is one example of 100 (robust accuracy 0.31
# through the intermediate states vs 0.32 implicit under the tests' XLA opt-level-0
# flag; the implicit attack leaves 0.33 at XLA's default level), so it reproduces a
# measured result rather than checks a property, at 77 s. The obfuscation CLI and its report run
# in the default suite (tests/test_evaluate.py::test_obfuscation_sweep).
@pytest.mark.e2e
def test_intermediate_state_attack_beats_naive_implicit_pgd():
    config = deq_mnist_trades.get_config()
    spec = models.build(config, 10)
    with open(PARAMS, "rb") as fh:
        variables = {"params": flax.serialization.msgpack_restore(fh.read())}
    ds = data_lib.mnist_5k()
    x, y = jnp.asarray(ds.test_images[:100]), jnp.asarray(ds.test_labels[:100])

    def view(gradient):
        v = AttackView(gradient)
        return lambda xb: spec.module.apply(variables, xb, **spec.eval_kwargs, view=v)[0]

    model = lambda xb: spec.module.apply(variables, xb, **spec.eval_kwargs)[0]

    @jax.jit
    def robust_accuracy(eps, key):
        out = {}
        for g in ("implicit", "simultaneous_adjoint"):
            x_adv = attacks.pgd(view(g), x, y, key, eps=eps, steps=10)
            out[g] = jnp.mean(jnp.argmax(model(x_adv), -1) == y)
        return out

    clean = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert clean > 0.5
    acc = robust_accuracy(jnp.float32(0.1), jax.random.PRNGKey(0))
    naive, through_states = float(acc["implicit"]), float(acc["simultaneous_adjoint"])
    print(
        f"clean {clean:.2f}; PGD-10 eps=0.1: implicit "
        f"{naive:.2f}, simultaneous adjoint {through_states:.2f}"
    )
    assert through_states < naive, acc
