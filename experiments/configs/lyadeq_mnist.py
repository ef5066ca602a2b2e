"""LyaDEQ on mnist_5k with the same injection, cell, solver and budget as deq_mnist
(a fair comparison). α = 0 by default: for α > 0 the projected dynamics of SPEC §2
have no root (see README, section "LyaDEQ"); α, η, d, the ICNN widths and the
orthogonal layer are configuration."""

import ml_collections

from experiments.configs.base import base_config


def lyapunov_block(**kw):
    block = dict(
        alpha=0.0,
        eta=0.01,
        d=1.0,
        icnn_widths="64",
        orthogonal=True,
        orthogonal_kind="householder",
        orth_features=128,
    )
    block.update(kw)
    return ml_collections.ConfigDict(block)


def get_config():
    c = base_config()
    c.model.name = "lyadeq"
    c.lyapunov = lyapunov_block()
    return c
