"""What train.py and evaluate.py share: building the model, optimiser and state
from a config, and the checkpoint manager."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp

log = logging.getLogger("deqjax.checkpoints")


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
    extra: dict | None = None,
) -> None:
    """Save ``state`` and a JSON ``progress`` item (e.g. the running sums of the epoch's
    training metrics, so a resumed run logs what an uninterrupted one would); ``extra``:
    more pytree items by name (e.g. training's ``fixed_points`` store)."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in (extra or {}).items()}
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(progress or {}),
            **items,
        ),
        force=force,
    )


class CheckpointError(RuntimeError):
    """A checkpoint step that cannot be restored (damaged, incomplete, or written for
    another model), with the workdir, the step and what to do."""


class ConfigError(ValueError):
    """Config values that cannot work, each named by its key, with the fix."""


def _restore_step(
    mngr: ocp.CheckpointManager, step: int, abstract, with_progress: bool, extra=None
):
    from etils import epath

    folder = epath.Path(mngr.directory) / str(step)
    if not (folder / "state").exists():
        # written before progress items: the state is the step's only item
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return (state, None, {}) if extra is not None else (state, None)
    args = {"state": ocp.args.StandardRestore(abstract)}
    if with_progress:
        args["progress"] = ocp.args.JsonRestore()
    present = {k: v for k, v in (extra or {}).items() if (folder / k).exists()}
    args.update({k: ocp.args.StandardRestore(v) for k, v in present.items()})
    out = mngr.restore(step, args=ocp.args.Composite(**args))
    progress = out.get("progress") if with_progress else None
    if extra is None:
        return out.state, progress
    return out.state, progress, {k: out.get(k) for k in present}


def _short(error: BaseException, n: int = 300) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:n]}{'…' if len(text) > n else ''}"


DAMAGED_DIR = "checkpoints_damaged"  # where skip_damaged moves unreadable steps


def restore_latest(
    mngr: ocp.CheckpointManager,
    template: TrainState,
    with_progress: bool = False,
    *,
    skip_damaged: bool = False,
    skip_hint: str = "",
    extra: dict | None = None,
):
    """The latest ``TrainState`` (arrays placed like ``template``'s, i.e. sharded when the
    template is), or None; with ``with_progress``: ``(state, progress dict or None)``.

    A latest step that cannot be restored (truncated or deleted files, an interrupted
    copy) raises ONE :class:`CheckpointError` naming the workdir, the step, the newest
    earlier step that does restore (if any) and what to do: it never falls back on its
    own. With ``skip_damaged`` the unreadable newer steps are moved to
    ``WORKDIR/checkpoints_damaged/`` (kept, not deleted) and the newest intact step is
    returned. ``skip_hint`` is how the caller's interface sets ``skip_damaged`` (e.g. a
    command-line flag), quoted in the message.

    ``extra`` (``{name: template}``, e.g. training's ``fixed_points`` store): also restore
    those items where the step has them; the return then gains a third element, the
    dict of the restored ones (an item the step lacks is absent; with_progress only)."""
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        if extra is not None:
            return None, None, {}
        return (None, None) if with_progress else None
    if extra is not None and not with_progress:
        raise ValueError("restore_latest: extra items need with_progress=True")
    extra_abstract = None if extra is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, extra)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    directory = str(mngr.directory)
    workdir = os.path.dirname(directory.rstrip("/"))
    damaged = []
    undo_quiet = _quiet_failed_restore_aftermath()
    for i, step in enumerate(steps):
        try:
            restored = _restore_step(mngr, step, abstract, with_progress, extra_abstract)
        except Exception as e:  # orbax, tensorstore and JSON errors of every kind
            logging.getLogger("asyncio").addFilter(_drop_unretrieved_reads)
            damaged.append(step)
            if skip_damaged:
                continue
            intact = next(
                (s for s in steps[i + 1 :] if _restores(mngr, s, abstract, with_progress)), None
            )
            raise CheckpointError(
                _damaged_message(workdir, directory, step, e, intact, steps[i + 1 :], skip_hint)
            ) from e
        if not damaged and undo_quiet is not None:
            undo_quiet()  # nothing failed: nothing to quieten
        if damaged:
            moved_to = _move_aside(mngr, workdir, damaged)
            log.warning(
                "the checkpoints of steps %s in %s could not be restored: moved to %s; "
                "resuming from step %d",
                damaged,
                workdir,
                moved_to,
                step,
            )
        if extra is not None:
            return restored
        state, progress = restored
        return (state, progress) if with_progress else state
    raise CheckpointError(
        f"no checkpoint in workdir {workdir} can be restored (steps {damaged}, all damaged "
        f"or incomplete, or written for another model than {workdir}/config.json describes): "
        f"delete {directory} to start over, or use a new workdir"
    )


def _drop_unretrieved_reads(record: logging.LogRecord) -> bool:
    return not (
        "Task exception was never retrieved" in str(record.msg)
        and "async_deserialize" in str(record.msg)
    )


def _quiet_failed_restore_aftermath():
    """After a restore fails, orbax closes its event loop while tensorstore still has
    reads of the other arrays in flight; each then prints a "RuntimeError: Event loop is
    closed" traceback from its thread (and asyncio logs the unretrieved read tasks at
    exit): hundreds of lines around the one error that matters. Drop exactly those
    (other unraisable exceptions and asyncio records pass). Installed before restoring
    (the first tracebacks can come before the failure reaches Python); returns the
    undo for a restore that did not fail (None when already installed)."""
    previous = sys.unraisablehook
    if getattr(previous, "deqjax_quiet", False):
        return None

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.deqjax_quiet = True
    sys.unraisablehook = hook

    def undo():
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return undo


def _restores(mngr, step, abstract, with_progress) -> bool:
    try:
        _restore_step(mngr, step, abstract, with_progress)
        return True
    except Exception:
        return False


def _damaged_message(workdir, directory, step, error, intact, earlier, skip_hint) -> str:
    """The one message of an unrestorable latest checkpoint: where, which step, the
    newest intact step if any, what to do, and the underlying error last."""
    head = (
        f"the checkpoint of step {step} in workdir {workdir} is damaged or incomplete and "
        "cannot be restored. "
    )
    cause = f" (cause: {_short(error, 160)})"
    if intact is not None:
        bad = [s for s in [step, *earlier] if s > intact]
        dirs = " ".join(f"{directory}/{s}" for s in sorted(bad))
        skip = (
            f", or rerun with {skip_hint} (moves {'it' if len(bad) == 1 else 'them'} to "
            f"{workdir}/{DAMAGED_DIR}/ and resumes from step {intact})"
            if skip_hint
            else ""
        )
        steps = f"step{'s' if len(bad) > 1 else ''} {', '.join(map(str, sorted(bad)))}"
        return head + (
            f"Step {intact} is intact: to resume from it, delete the damaged {steps} "
            f"(rm -r {dirs}) and rerun{skip}.{cause}"
        )
    if earlier:
        return head + (
            f"No earlier step restores either (tried steps {list(earlier)}): if the model "
            f"config changed since they were written, use a new workdir; otherwise delete "
            f"{directory} to start over from step 0.{cause}"
        )
    return head + (
        f"It is the only checkpoint: delete {directory} to start over from step 0 (or, if "
        f"the model config changed since it was written, use a new workdir).{cause}"
    )


def _move_aside(mngr: ocp.CheckpointManager, workdir: str, steps: list[int]) -> str:
    """Move step directories to ``workdir/checkpoints_damaged/`` (process 0; every
    process waits) and make the manager forget them; returns the new folder."""
    from etils import epath

    target = epath.Path(workdir) / DAMAGED_DIR
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            dest, n = target / str(step), 1
            while dest.exists():
                dest, n = target / f"{step}.{n}", n + 1
            (epath.Path(mngr.directory) / str(step)).rename(dest)
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes("deqjax_move_damaged_checkpoints")
    mngr.reload()
    return str(target)


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


# (key, rule, what the value is): the numeric config values with an obvious valid range.
# "int>=1" etc. are integers (bool excluded); "num>0" etc. finite real numbers;
# "frac" a number in [0, 1]; "eps_list" comma-separated radii >= 0.
_RULES = (
    ("limit_train", "int>=0", "the number of training examples kept (0 = all)"),
    ("limit_test", "int>=0", "the number of test examples kept (0 = all)"),
    ("train.epochs", "int>=1", "the number of passes over the training set"),
    ("train.batch_size", "int>=1", "the global training batch size"),
    ("train.learning_rate", "num>0", "the peak learning rate"),
    ("train.weight_decay", "num>=0", "the AdamW weight decay"),
    ("train.warmup_steps", "int>=0", "the linear warm-up of the cosine schedule"),
    ("train.grad_clip", "num>=0", "the global gradient-norm clip (0 = off)"),
    ("train.hinge_margin", "num>=0", "the margin of the hinge loss"),
    ("train.checkpoint_every_steps", "int>=1", "the steps between checkpoints"),
    ("train.keep_checkpoints", "int>=1", "the number of checkpoints kept"),
    ("train.nonconvergence_warning", "frac", "the non-converged fraction that warns"),
    ("train.seeds", "int>=1", "the number of seeds trained together"),
    ("eval.batch_size", "int>=1", "the evaluation batch size"),
    ("adv.eps", "num>=0", "the radius of the inner attack"),
    ("adv.step", "num>0", "the step size of the inner attack"),
    ("adv.steps", "int>=1", "the number of inner attack steps"),
    ("adv.beta", "num>=0", "the TRADES weight of the KL term"),
    ("adv.mixed_weight", "frac", "the adversarial weight of the mixed loss"),
    ("deq.max_iter", "int>=1", "the forward solver budget in training"),
    ("deq.eval_max_iter", "int>=1", "the forward solver budget at evaluation"),
    ("deq.adjoint_max_iter", "int>=1", "the adjoint solver budget"),
    ("deq.tol", "num>=0", "the forward solver tolerance"),
    ("deq.adjoint_tol", "num>=0", "the adjoint solver tolerance"),
    ("deq.jac_reg", "num>=0", "the weight of the Jacobian regulariser"),
    ("deq.jac_reg_samples", "int>=1", "the Hutchinson samples of the Jacobian regulariser"),
    ("deq.random_states_max", "int>=0", "the most random intermediate steps (0 = off)"),
    ("robustness.eps", "eps_list", "the radii of the robustness report"),
    ("robustness.n_examples", "int>=1", "the test examples the report attacks"),
    ("robustness.n_iter", "int>=1", "the iterations of each gradient attack"),
    ("robustness.n_queries", "int>=1", "the queries of the Square attack"),
    ("robustness.restarts", "int>=1", "the restarts of each attack"),
    ("robustness.batch_size", "int>=1", "the report's batch size"),
)


def _rule_error(value, rule: str) -> str | None:
    """Why ``value`` breaks ``rule`` (None when it does not)."""
    if rule == "eps_list":
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            return "must list at least one radius (comma-separated, e.g. 0.1,0.3)"
        for p in parts:
            try:
                e = float(p)
            except ValueError:
                return f"{p!r} is not a number"
            if not (math.isfinite(e) and e >= 0):
                return f"every radius must be finite and >= 0, got {p}"
        return None
    kind, _, bound = rule.partition(">")
    strict, low = not bound.startswith("="), float(bound.lstrip("=") or 0)
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer, got {type(value).__name__} {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, got {type(value).__name__} {value!r}"
    if not math.isfinite(value):
        return "must be finite"
    if kind == "frac":
        return None if 0 <= value <= 1 else "must be in [0, 1]"
    if value > low or (value == low and not strict):
        return None
    return f"must be {'>' if strict else '>='} {low:g}"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Refuse config values that cannot work (``train.epochs = -1``, ``batch_size = 0``,
    a negative learning rate or radius, …) before any work, with ONE
    :class:`ConfigError` listing each bad key, its value, the valid range and the
    command-line fix. Keys a config does not have are not checked; the DEQ solver
    settings are also checked by :class:`deqjax.deq.DEQConfig` itself (named here by
    their ``deq.`` key)."""
    from experiments.configs.base import base_config
    from experiments.spec import ACTIVATION_DTYPES, MIXED_PRECISION_FAMILIES, deq_config

    defaults = base_config()
    bad = []
    for key, rule, what in _RULES:
        node, default = config, defaults
        for part in key.split("."):
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            default = default.get(part) if isinstance(default, ml_collections.ConfigDict) else None
        if node is None:
            continue
        why = _rule_error(node, rule)
        if why is not None:
            example = f"; set e.g. --config.{key}={default}" if default is not None else ""
            bad.append(f"config.{key} = {node!r}: {why} ({what}){example}")
    model = config.get("model")
    dtype = model.get("dtype") if isinstance(model, ml_collections.ConfigDict) else None
    if dtype is not None and dtype not in ACTIVATION_DTYPES:
        bad.append(
            f"config.model.dtype = {dtype!r}: must be one of {tuple(ACTIVATION_DTYPES)} (the "
            "activations' dtype); set e.g. --config.model.dtype=bfloat16"
        )
    elif dtype not in (None, "float32") and model.get("name") not in MIXED_PRECISION_FAMILIES:
        bad.append(
            f"config.model.dtype = {dtype!r}: the {model.get('name')!r} family computes in "
            f"float32 only (bfloat16/float16 activations: {', '.join(MIXED_PRECISION_FAMILIES)}); "
            "set --config.model.dtype=float32"
        )
    deq = config.get("deq")
    if deq is not None and not any(b.startswith("config.deq.") for b in bad):
        for evaluation in (False, True):
            try:
                deq_config(deq, evaluation=evaluation)
            except (TypeError, ValueError) as e:
                name = str(e).split(" ", 1)[0]
                if name in deq and defaults.deq.get(name) is not None:
                    fix = f"; set e.g. --config.deq.{name}={defaults.deq[name]}"
                    bad.append(f"config.deq.{e}{fix}")
                else:
                    bad.append(f"config.deq: {e}")
                break
    if bad:
        raise ConfigError(
            "invalid config value"
            + ("s" if len(bad) > 1 else "")
            + " (nothing was run):\n  "
            + "\n  ".join(bad)
        )
