"""The model registry: ``config.model.name`` → its family's builder.

Every builder returns a :class:`~experiments.spec.ModelSpec` whose module follows the
common calling convention ``module(x, **kw) -> (logits, stats or None)``. The table is
plain data: adding a family is one import and one row here.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from experiments.families import cpl, lyadeq, mdeq, mondeq, otad
from experiments.spec import ModelSpec

REGISTRY: dict[str, Callable[[ml_collections.ConfigDict, int], ModelSpec]] = {
    "mdeq": mdeq.build,
    "explicit_mdeq": mdeq.build_explicit,
    "cpl": cpl.build,
    "lyadeq": lyadeq.build,
    "mondeq": mondeq.build,
    **{name: otad.build for name in otad.FAMILY},
}


def build(config: ml_collections.ConfigDict, num_classes: int) -> ModelSpec:
    """The :class:`ModelSpec` of ``config.model.name`` for ``num_classes`` classes."""
    name = config.model.name
    if name not in REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](config, num_classes)
