"""The model registry: ``config.model.name`` → a Flax module with the common
calling convention ``module(x, **kw) -> (logits, stats or None)``.

Families plug in with a :class:`ModelSpec` that says how to train and evaluate them:
whether the model is a DEQ (solver statistics, backward probe, attack gradient
paths), which extra variable collections training updates (e.g. the CPL
power-iteration vectors), and keyword arguments for training and evaluation calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections

from deqjax.deq import DEQConfig
from deqjax.models import ExplicitMDEQ, MDEQClassifier
from deqjax.solvers import SolverConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    module: nn.Module
    is_deq: bool = False
    mutable: tuple[str, ...] = ()  # collections updated by training steps
    train_kwargs: dict = dataclasses.field(default_factory=dict)
    eval_kwargs: dict = dataclasses.field(default_factory=dict)
    # Extra report sections: hook(spec, state, x, y, eps_list, robustness_cfg) -> dict
    report_hooks: tuple = ()
    # Regularisers sown into the "losses" collection, with their weights in the loss.
    regularizers: dict = dataclasses.field(default_factory=dict)


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
        phantom_steps=c.phantom_steps,
        phantom_damping=c.phantom_damping,
    )


def _mdeq(config, num_classes):
    m = config.model
    module = MDEQClassifier(
        num_classes=num_classes,
        width=m.width,
        inner=m.inner,
        groups=m.groups,
        head_kind=m.head,
        deq=deq_config(config.deq),
    )
    return ModelSpec(
        module, is_deq=True, eval_kwargs={"config": deq_config(config.deq, evaluation=True)}
    )


def _explicit(config, num_classes):
    m = config.model
    return ModelSpec(
        ExplicitMDEQ(
            num_classes=num_classes,
            width=m.width,
            inner=m.inner,
            groups=m.groups,
            head_kind=m.head,
            depth=m.depth,
        )
    )


_REGISTRY: dict[str, Callable[[Any, int], ModelSpec]] = {"mdeq": _mdeq, "explicit_mdeq": _explicit}


def register(name: str, builder: Callable[[Any, int], ModelSpec]) -> None:
    """Add a model family: ``builder(config, num_classes) -> ModelSpec``."""
    _REGISTRY[name] = builder


def build(config: ml_collections.ConfigDict, num_classes: int) -> ModelSpec:
    import experiments.families  # noqa: F401  (registers the other model families)

    name = config.model.name
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](config, num_classes)
