"""The reference image DEQ (``mdeq``) and its weight-tied explicit twin
(``explicit_mdeq``): :mod:`deqjax.models.mdeq` in the experiment framework."""

from __future__ import annotations

from deqjax.models import ExplicitMDEQ, MDEQClassifier
from experiments.spec import ModelSpec, activation_dtype, deq_config


def build(config, num_classes: int) -> ModelSpec:
    """``mdeq``: injection → DEQ(MDEQ cell) → head; evaluated at ``deq.eval_max_iter``.
    ``model.dtype``: the activations' dtype (parameters stay float32)."""
    m = config.model
    module = MDEQClassifier(
        num_classes=num_classes,
        width=m.width,
        inner=m.inner,
        groups=m.groups,
        head_kind=m.head,
        deq=deq_config(config.deq),
        dtype=activation_dtype(m),
    )
    return ModelSpec(
        module, is_deq=True, eval_kwargs={"config": deq_config(config.deq, evaluation=True)}
    )


def build_explicit(config, num_classes: int) -> ModelSpec:
    """``explicit_mdeq``: the same cell, weight-tied and unrolled ``model.depth`` times."""
    m = config.model
    return ModelSpec(
        ExplicitMDEQ(
            num_classes=num_classes,
            width=m.width,
            inner=m.inner,
            groups=m.groups,
            head_kind=m.head,
            depth=m.depth,
            dtype=activation_dtype(m),
        )
    )
