"""LyaDEQ on mnist_5k with the injection, cell, head and training of deq_mnist (a fair
comparison), run as the finite-time system of docs/methods/lyadeq.md: K = ``lyapunov.steps`` steps
``z ← z + h F̂(z)`` (h = ``lyapunov.step_size``) from z₀ = 0, the same K in training and
at test time, with the exact (unrolled) gradient by default (``deq.backward=phantom``:
the last ``deq.phantom_steps`` steps only). α, η, d, the ICNN widths and the
orthogonal layer are configuration; see docs/results/lyadeq.md for how the
defaults were chosen."""

import ml_collections

from experiments.configs.base import base_config


def lyapunov_block(**kw):
    block = dict(
        alpha=0.1,
        eta=0.01,
        d=1.0,
        icnn_widths="64",
        orthogonal=True,
        orthogonal_kind="householder",
        orth_features=128,
        steps=10,
        step_size=1.0,
    )
    block.update(kw)
    return block


def finite_time(c, **kw):
    """Give config ``c`` a ``lyapunov`` block and tie the ``deq`` block's forward keys to
    its ``steps`` (K) and ``step_size`` (h): ``--config.lyapunov.steps=12`` changes the
    training and the evaluation budget together (the model is checked against them)."""
    block = lyapunov_block(**kw)
    steps = ml_collections.FieldReference(int(block.pop("steps")))
    step_size = ml_collections.FieldReference(float(block.pop("step_size")))
    c.lyapunov = ml_collections.ConfigDict(block)
    c.lyapunov.steps = steps
    c.lyapunov.step_size = step_size
    c.deq.update(solver="fixed_point", tol=0.0, stop_mode="abs", backward="unroll")
    c.deq.phantom_steps = 3
    c.deq.max_iter = steps
    c.deq.eval_max_iter = steps
    c.deq.damping = step_size
    # attack views of the report: the exact gradient of the K steps (also the model's
    # default gradient, i.e. what a careless attack gets), intermediate states z₃ and z₅
    # with 5 steps of z ← z + 0.5 F̂ (as for the DEQ), and the simultaneous adjoint
    c.robustness.update(gradients="unroll,intermediate,simultaneous_adjoint", state_indices="2,4")
    return c


def get_config():
    c = base_config()
    c.model.name = "lyadeq"
    return finite_time(c)
