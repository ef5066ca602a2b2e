"""What the training loop and the reports need to know about a model family.

A family's builder ``build(config, num_classes) -> ModelSpec`` (in
``experiments/families/``) returns the Flax module with the common calling convention
``module(x, **kw) -> (logits, stats or None)`` and says how to train and evaluate it.
This module imports nothing else from ``experiments`` (the registry, the families, the
loop and the reports all import it), so the package has no import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from deqjax.deq import DEQConfig
from deqjax.solvers import SolverConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model family's module and its training/evaluation conventions.

    Attributes:
      module: the Flax module, ``module(x, **kw) -> (logits, stats or None)``.
      is_deq: a DEQ (solver statistics, backward probe, attack gradient views).
      mutable: variable collections updated by training steps (e.g. CPL power iteration).
      train_kwargs / eval_kwargs: keyword arguments of training / evaluation calls.
      report_hooks: extra report sections, ``hook(spec, state, x, y, eps_list, r) -> dict``.
      regularizers: losses sown into the ``"losses"`` collection, with their weights.
      prepare_eval: optional ``prepare_eval(spec, state, image_shape) -> (spec, state)``,
        called by :func:`experiments.workdir.load_run` on the restored run (e.g. CPL:
        compute each layer's σ once, store it, and evaluate with the stored values).
      views: optional ``views(run, r) -> {model label: Evaluated}`` for families whose
        report scores several models of one training run (OTAD); default: the model's
        own gradient views (see :mod:`experiments.views`).
    """

    module: nn.Module
    is_deq: bool = False
    mutable: tuple[str, ...] = ()
    train_kwargs: dict = dataclasses.field(default_factory=dict)
    eval_kwargs: dict = dataclasses.field(default_factory=dict)
    report_hooks: tuple = ()
    regularizers: dict = dataclasses.field(default_factory=dict)
    prepare_eval: Callable | None = None
    views: Callable | None = None


class Evaluated(NamedTuple):
    """One model as a report scores it: ``score`` (its own logits function, which scores
    clean inputs and every attack's output) and the ``views`` attacks go through
    (``{name: logits_fn}``; see :mod:`experiments.views`)."""

    score: Callable
    views: dict[str, Callable]


def split_list(s) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]`` (comma-separated config values)."""
    return [p.strip() for p in str(s).split(",") if p.strip()]


# ``config.model.dtype``: the dtype a model computes its activations in (parameters,
# optimiser state, solver internals and logits stay float32; docs/concepts/mixed_precision.md).
# "float32" is the models' own default (None: the inputs' dtype, float32 images).
ACTIVATION_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# the families whose builder reads config.model.dtype (others refuse anything but float32)
MIXED_PRECISION_FAMILIES = ("mdeq", "explicit_mdeq")


def activation_dtype(m: ml_collections.ConfigDict):
    """The activations' dtype of the ``config.model`` block (None for ``"float32"``; a
    workdir written before the key existed computed in float32)."""
    name = m.get("dtype", "float32")
    if name not in ACTIVATION_DTYPES:
        raise ValueError(f"unknown model.dtype {name!r}; choose one of {tuple(ACTIVATION_DTYPES)}")
    return ACTIVATION_DTYPES[name]


def deq_config(c: ml_collections.ConfigDict, *, evaluation: bool = False) -> DEQConfig:
    """A :class:`DEQConfig` from the ``config.deq`` block (the eval budget if asked)."""
    forward = SolverConfig(
        method=c.solver,
        max_iter=int(c.eval_max_iter if evaluation else c.max_iter),
        tol=c.tol,
        stop_mode=c.stop_mode,
        damping=c.damping,
        anderson_m=c.anderson_m,
        anderson_ridge=c.anderson_ridge,
        # a workdir written before the key existed ran the absolute ridge
        anderson_ridge_mode=c.get("anderson_ridge_mode", "absolute"),
        anderson_beta=c.anderson_beta,
        broyden_memory=c.broyden_memory,
    )
    return DEQConfig(
        forward=forward,
        backward=c.backward,
        adjoint_solver=c.adjoint_solver,
        adjoint_max_iter=c.adjoint_max_iter,
        adjoint_tol=c.adjoint_tol,
        # training and evaluation have their own adjoint ridge (base config); a workdir
        # written before the keys existed ran the forward's (absolute) ridge in both
        adjoint_ridge_mode=c.get(
            "eval_adjoint_ridge_mode" if evaluation else "adjoint_ridge_mode", "absolute"
        ),
        phantom_steps=c.phantom_steps,
        phantom_damping=c.phantom_damping,
    )
