"""Several training seeds as one vmapped axis (``config.train.seeds = K``).

Seed ``i`` of a K-seed run is the single-seed run with ``config.seed + i``: the same
initial parameters, run key (per-step keys) and data order
(:func:`deqjax.data.epoch_permutation` with that seed). The K train states are stacked
along a new leading axis and trained by ONE compiled step, ``jax.vmap`` of the
single-seed step; the stacked state is what the checkpoint holds. ``K = 1`` (the
default) is the plain, unstacked run.

For reports: :func:`seed_state` slices seed ``i`` out of a stacked state, and
:func:`experiments.workdir.load_run` (``seed=i``) / :func:`experiments.workdir.load_seed_runs`
return one :class:`~experiments.workdir.Run` per seed with an ordinary single-seed state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import parallel


def seed_count(config) -> int:
    """``config.train.seeds`` (1 for configs written before the key existed)."""
    t = config.get("train")
    return int(t.get("seeds", 1)) if t is not None else 1


def seed_values(config) -> list[int]:
    """The seed of each stacked model: ``config.seed + i`` for ``i < K``."""
    return [int(config.seed) + i for i in range(seed_count(config))]


def stack(trees):
    """Stack pytrees of the same structure along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def seed_state(state, i: int):
    """Seed ``i``'s state out of a stacked (K-seed) state: every leaf's row ``i``.
    The result is an ordinary single-seed state (e.g. a ``TrainState`` that
    :func:`experiments.train.make_eval_fn`'s predict, attacks and reports take)."""
    return jax.tree.map(lambda a: a[i], state)


def stacked_sharding(s: NamedSharding) -> NamedSharding:
    """``s`` with an unsharded leading (seed) axis in front."""
    return NamedSharding(s.mesh, P(None, *s.spec))


def stacked_shardings(shardings):
    return jax.tree.map(stacked_sharding, shardings)


def seed_batch_sharding(mesh) -> NamedSharding:
    """``(K, B, ...)`` batches: seeds unsharded, rows split over the data axis."""
    return NamedSharding(mesh, P(None, parallel.DATA))


def host_seed_batches(images, labels, batch_size, *, seeds, epoch, start_batch, rows):
    """This process's rows of each seed's global batch, stacked: ``(x, y, idx)`` of
    shapes ``(K, rows, ...)``, each seed in its own data order."""
    its = [
        parallel.host_epoch_batches(
            images,
            labels,
            batch_size,
            seed=s,
            epoch=epoch,
            start_batch=start_batch,
            rows=rows,
            with_indices=True,
        )
        for s in seeds
    ]
    for parts in zip(*its, strict=True):
        yield tuple(np.stack(a) for a in zip(*parts, strict=True))


def global_seed_batch(local, sharding: NamedSharding, global_batch_size: int):
    """Host-local ``(K, rows, ...)`` arrays → global ``(K, B, ...)`` arrays."""
    return tuple(
        jax.make_array_from_process_local_data(
            sharding,
            np.asarray(a),
            (a.shape[0], global_batch_size) + np.shape(a)[2:],
        )
        for a in local
    )
