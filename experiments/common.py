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

from deqjax.deq import DEQConfig
from deqjax.models import ExplicitMDEQ, MDEQClassifier
from deqjax.solvers import SolverConfig

MODELS = ("mdeq", "explicit_mdeq")


def deq_config(c: ml_collections.ConfigDict, *, evaluation: bool = False) -> DEQConfig:
    """A :class:`DEQConfig` from the ``config.deq`` block (the eval budget if asked)."""
    forward = SolverConfig(
        method=c.solver, max_iter=int(c.eval_max_iter if evaluation else c.max_iter), tol=c.tol,
        stop_mode=c.stop_mode, damping=c.damping, anderson_m=c.anderson_m,
        anderson_ridge=c.anderson_ridge, anderson_beta=c.anderson_beta,
        broyden_memory=c.broyden_memory)
    return DEQConfig(forward=forward, backward=c.backward, adjoint_solver=c.adjoint_solver,
                     adjoint_max_iter=c.adjoint_max_iter, adjoint_tol=c.adjoint_tol,
                     phantom_steps=c.phantom_steps, phantom_damping=c.phantom_damping)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    m = config.model
    if m.name == "mdeq":
        return MDEQClassifier(num_classes=num_classes, width=m.width, inner=m.inner,
                              groups=m.groups, head_kind=m.head, deq=deq_config(config.deq))
    if m.name == "explicit_mdeq":
        return ExplicitMDEQ(num_classes=num_classes, width=m.width, inner=m.inner,
                            groups=m.groups, head_kind=m.head, depth=m.depth)
    raise ValueError(f"unknown model name {m.name!r}; choose one of {MODELS}")


def is_deq(model: nn.Module) -> bool:
    return isinstance(model, MDEQClassifier)


def build_optimizer(t: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    if t.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, min(t.warmup_steps, total_steps // 2),
                                                max(total_steps, 1))
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
    """Everything a restarted run needs: parameters, optimiser state, the step,
    and the base PRNG key (per-step keys are ``fold_in(key, step)``)."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "step", "key"],
                                 meta_fields=[])


def init_state(model: nn.Module, optimizer, image_shape, seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, run_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((2,) + tuple(image_shape), jnp.float32))["params"]
    return TrainState(params=params, opt_state=optimizer.init(params),
                      step=jnp.asarray(0, jnp.int32), key=jax.random.key_data(run_key))


def checkpoint_manager(workdir: str, keep: int = 2, every: int = 1) -> ocp.CheckpointManager:
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, options=opts)


def restore_latest(mngr: ocp.CheckpointManager, template: TrainState) -> TrainState | None:
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (for evaluate.py reading a workdir)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deqjax_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()
