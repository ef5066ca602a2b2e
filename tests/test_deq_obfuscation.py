"""Gradient obfuscation of DEQs, measured (SPEC §3, seed 001).

On the TRADES-trained deq_mnist_trades model shipped in tests/data (trained here with
`python -m experiments.train --config experiments/configs/deq_mnist_trades.py`, then
its parameters exported), PGD through at least one intermediate state finds more
adversarial examples than the naive PGD through the implicit gradient."""

import os

import flax.serialization
import jax
import numpy as np
import pytest

from deqjax import data as data_lib
from deqjax.robustness import evaluate_robustness
from experiments import models
from experiments.configs import deq_mnist_trades

PARAMS = os.path.join(os.path.dirname(__file__), "data", "deq_mnist_trades_params.msgpack")
EPS = float(os.environ.get("DEQJAX_OBFUSCATION_EPS", "0.2"))


@pytest.mark.skipif(not os.path.exists(PARAMS), reason="trained parameters not shipped")
def test_intermediate_state_attack_beats_naive_implicit_pgd():
    config = deq_mnist_trades.get_config()
    spec = models.build(config, 10)
    with open(PARAMS, "rb") as fh:
        params = flax.serialization.msgpack_restore(fh.read())
    variables = {"params": params}
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[:100], ds.test_labels[:100]

    def view(**kw):
        return lambda xb: spec.module.apply(variables, xb, **spec.eval_kwargs, **kw)[0]

    views = {"implicit": view(gradient="implicit")}
    for i in (2, 5):
        views[f"intermediate_z{i}"] = view(gradient="intermediate", state_index=i, attack_steps=5,
                                           attack_damping=0.5)
    rep = evaluate_robustness(views, x, y, jax.random.PRNGKey(0), eps_list=[EPS], attacks=["pgd"],
                              n_iter=10, batch_size=100)
    per = rep["robust_accuracy"][str(EPS)]
    naive = per["pgd/implicit"]
    best = min(v for k, v in per.items() if "intermediate" in k)
    assert rep["clean_accuracy"] > 0.5
    assert best < naive, per
