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
from experiments import common, models, parallel, seeds
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


def load_run(workdir: str, seed: int = 0) -> Run:
    """The :class:`Run` of a training workdir (latest checkpoint).

    A workdir trained with ``train.seeds = K > 1`` holds K stacked models: ``seed``
    (``0 … K-1``, default 0) picks one, returned as the single-seed run it equals —
    its state sliced out (:func:`experiments.seeds.seed_state`), its config with
    ``seed = config.seed + seed`` and ``train.seeds = 1``. All K:
    :func:`load_seed_runs`."""
    return load_seed_runs(workdir, [seed])[0]


def load_seed_runs(workdir: str, which=None) -> list[Run]:
    """One :class:`Run` per seed of a (multi-seed) workdir, in seed order (``which``:
    the seed positions to load, default all); the checkpoint is restored once. A
    single-seed workdir gives a list of one."""
    config = load_config(workdir)
    n_seeds = seeds.seed_count(config)
    which = list(range(n_seeds)) if which is None else list(which)
    for i in which:
        if not 0 <= i < n_seeds:
            raise ValueError(
                f"seed position {i} out of range: {workdir} holds {n_seeds} seed(s) "
                f"(train.seeds = {n_seeds}); use 0 … {n_seeds - 1}"
            )
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
    shardings = parallel.state_shardings(mesh, abstract, shard_params)
    if n_seeds > 1:  # the checkpoint holds the K states stacked
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((n_seeds, *a.shape), a.dtype), abstract
        )
        shardings = seeds.stacked_shardings(shardings)
    template = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    stacked = common.restore_latest(common.checkpoint_manager(workdir), template)
    if stacked is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
    runs = []
    for i in which:
        state, run_config, run_spec = stacked, config, spec
        if n_seeds > 1:
            state = seeds.seed_state(stacked, i)
            run_config = ml_collections.ConfigDict(config.to_dict())
            run_config.seed = seeds.seed_values(config)[i]
            run_config.train.seeds = 1
        if run_spec.prepare_eval is not None:
            run_spec, state = run_spec.prepare_eval(run_spec, state, ds.image_shape)
        runs.append(Run(run_config, run_spec, state, ds, workdir))
    return runs
