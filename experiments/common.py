"""What train.py and evaluate.py share: building the model, optimiser and state
from a config, and the checkpoint manager."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp


def build_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, t.learning_rate, min(t.warmup_steps, total_steps // 2), max(total_steps, 1)
        )
    elif t.schedule == "constant":
        lr = t.learning_rate
    else:
        raise ValueError(f"unknown schedule {t.schedule!r}; choose 'cosine' or 'constant'")
    if t.optimizer == "adam":
        opt = optax.adamw(lr, weight_decay=t.weight_decay)
    elif t.optimizer == "sgd":
        opt = optax.sgd(lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {t.optimizer!r}; choose 'adam' or 'sgd'")
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    return optax.chain(*chain, opt)


@dataclasses.dataclass
class TrainState:
    """Everything a restarted run needs: parameters, other model variables (e.g.
    CPL power-iteration vectors), optimiser state, the step, and the base PRNG key
    (per-step keys are ``fold_in(key, step)``)."""

    params: Any
    model_state: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


jax.tree_util.register_dataclass(
    TrainState, data_fields=["params", "model_state", "opt_state", "step", "key"], meta_fields=[]
)


def init_state(model: nn.Module, optimizer, image_shape, seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(key)
    variables = dict(model.init(init_key, jnp.zeros((2,) + tuple(image_shape), jnp.float32)))
    params = variables.pop("params")
    variables.pop("losses", None)
    return TrainState(
        params=params,
        model_state=variables,
        opt_state=optimizer.init(params),
        step=jnp.asarray(0, jnp.int32),
        key=jax.random.key_data(run_key),
    )


def _is_remote(path: str) -> bool:
    return "://" in str(path)  # gs://… (orbax writes through tensorstore)


def checkpoint_manager(workdir: str, keep: int = 2, every: int = 1) -> ocp.CheckpointManager:
    """Orbax manager for ``workdir/checkpoints`` (a local path or ``gs://…``). Every
    process must create it and join every save (orbax coordinates multi-process saves)."""
    path = os.path.join(workdir, "checkpoints")
    path = path if _is_remote(path) else os.path.abspath(path)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path, options=opts)


def save_checkpoint(
    mngr: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    progress: dict | None = None,
    force: bool = False,
) -> None:
    """Save ``state`` and a JSON ``progress`` item (e.g. the running sums of the epoch's
    training metrics, so a resumed run logs what an uninterrupted one would)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress or {})
        ),
        force=force,
    )


def restore_latest(mngr: ocp.CheckpointManager, template: TrainState, with_progress: bool = False):
    """The latest ``TrainState`` (arrays placed like ``template``'s, i.e. sharded when the
    template is), or None; with ``with_progress``: ``(state, progress dict or None)``."""
    step = mngr.latest_step()
    if step is None:
        return (None, None) if with_progress else None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    from etils import epath

    if not (
        epath.Path(mngr.directory) / str(step) / "state"
    ).exists():  # written before progress items
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return (state, None) if with_progress else state
    args = {"state": ocp.args.StandardRestore(abstract)}
    if with_progress:
        args["progress"] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    return (out.state, out.get("progress")) if with_progress else out.state


def read_text(path: str) -> str | None:
    """A text file's content (local or ``gs://``), None if it does not exist."""
    from etils import epath

    p = epath.Path(path)
    return p.read_text() if p.exists() else None


def write_text(path: str, text: str) -> None:
    """Write a text file (local or ``gs://``; GCS has no append, so callers rewrite)."""
    from etils import epath

    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def read_bytes(path: str) -> bytes | None:
    """A binary file's content (local or ``gs://``), None if it does not exist."""
    from etils import epath

    p = epath.Path(path)
    return p.read_bytes() if p.exists() else None


def write_bytes(path: str, data: bytes) -> None:
    """Write a binary file (local or ``gs://``)."""
    from etils import epath

    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (for evaluate.py reading a workdir)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deqjax_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()
