"""Reading a training workdir back: its config, model, latest checkpoint and data.

Every report script starts here (``experiments.evaluate``, ``experiments.otad_fit``,
``experiments.otad_evaluate``, ``experiments.obfuscation``). Files go through
:func:`experiments.common.read_text`, so ``gs://`` workdirs work.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from deqjax import data as data_lib
from experiments import common, models, parallel
from experiments.spec import ModelSpec


class Run(NamedTuple):
    """A trained workdir: ``config``, ``spec`` (the model), ``state`` (restored
    :class:`~experiments.common.TrainState`, laid out as training laid it out),
    ``dataset`` and the ``workdir`` path."""

    config: ml_collections.ConfigDict
    spec: ModelSpec
    state: Any
    dataset: data_lib.Dataset
    workdir: str


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """``workdir/config.json`` (FileNotFoundError naming the fix when missing)."""
    path = os.path.join(workdir, "config.json")
    text = common.read_text(path)
    if text is None:
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by experiments.train "
            "(or experiments.import_params)"
        )
    return ml_collections.ConfigDict(json.loads(text))


def load_run(workdir: str) -> Run:
    """The :class:`Run` of a training workdir (latest checkpoint)."""
    config = load_config(workdir)
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir or None, config.limit_train, config.limit_test
    )
    spec = models.build(config, ds.num_classes)
    # the restore needs only the state's shapes, dtypes and layout: an abstract template
    # (initialising a DEQ eagerly to throw the values away took ~10 s)
    abstract = jax.eval_shape(
        lambda: common.init_state(
            spec.module, common.build_optimizer(config.train, 1), ds.image_shape, config.seed
        )
    )
    mesh, shard_params = parallel.mesh_from_config(config)  # restored as training laid it out
    template = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        parallel.state_shardings(mesh, abstract, shard_params),
    )
    state = common.restore_latest(common.checkpoint_manager(workdir), template)
    if state is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
    if spec.prepare_eval is not None:
        spec, state = spec.prepare_eval(spec, state, ds.image_shape)
    return Run(config, spec, state, ds, workdir)
