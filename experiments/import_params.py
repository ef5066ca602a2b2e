"""Make a workdir from saved parameters, so ``experiments.evaluate`` (and the other
report scripts) can score them without training:

    python -m experiments.import_params --config experiments/configs/deq_mnist_trades_entropy.py \\
        --params tests/data/deq_mnist_trades_params.msgpack --workdir runs/deq_mnist_trades_entropy

``--params`` is ``flax.serialization.msgpack_serialize(params)`` of a model built from a
config with the same architecture (e.g. ``deq_mnist_trades`` params under the
``deq_mnist_trades_entropy`` config, which only adds an inference-time defence). Writes
``config.json`` and a step-0 checkpoint with fresh optimizer state; the parameter tree
must match the config's model exactly (a clear error names the first difference)."""

from __future__ import annotations

import dataclasses
import os

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections

from deqjax import data as data_lib
from experiments import common, models


def _tree_mismatch(expected, got) -> str | None:
    """A description of the first structural or shape difference, or None."""
    flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_g = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
    missing = sorted(set(flat_e) - set(flat_g))
    extra = sorted(set(flat_g) - set(flat_e))
    if missing:
        return f"parameter {missing[0]} is missing from the file ({len(missing)} missing)"
    if extra:
        return (
            f"the file has parameter {extra[0]} that the config's model does not "
            f"({len(extra)} extra)"
        )
    for k, v in flat_e.items():
        if tuple(v.shape) != tuple(jnp.shape(flat_g[k])):
            return (
                f"parameter {k} has shape {tuple(jnp.shape(flat_g[k]))} in the file, "
                f"{tuple(v.shape)} in the model"
            )
    return None


def import_params(config: ml_collections.ConfigDict, params_path: str, workdir: str) -> None:
    """Write ``workdir/config.json`` and a checkpoint holding the parameters of ``params_path``."""
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir or None, config.limit_train, config.limit_test
    )
    spec = models.build(config, ds.num_classes)
    optimizer = common.build_optimizer(config.train, 1)
    state = common.init_state(spec.module, optimizer, ds.image_shape, config.seed)
    with open(params_path, "rb") as fh:
        loaded = flax.serialization.msgpack_restore(fh.read())
    problem = _tree_mismatch(state.params, loaded)
    if problem:
        raise ValueError(
            f"{params_path} does not fit the model of this config: {problem}. "
            "Use the config the parameters were trained with (or one with the same architecture)."
        )
    params = jax.tree.map(
        lambda ref, v: jnp.asarray(v, ref.dtype),
        state.params,
        flax.serialization.from_state_dict(state.params, loaded),
    )
    state = dataclasses.replace(state, params=params, opt_state=optimizer.init(params))
    os.makedirs(workdir, exist_ok=True)
    common.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    mngr = common.checkpoint_manager(workdir)
    common.save_checkpoint(mngr, 0, state, force=True)
    mngr.wait_until_finished()


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    import_params(f.config, f.params, f.workdir)
    print(
        f"wrote {f.workdir}/config.json and a checkpoint; next: "
        f"python -m experiments.evaluate --workdir {f.workdir}"
    )


if __name__ == "__main__":
    from experiments import cli

    cli.run(
        main,
        extra_flags=lambda flags: (
            flags.DEFINE_string("params", None, "msgpack file of params"),
            flags.mark_flags_as_required(["params"]),
        ),
    )
