r"""Train a model from a config file.

    python -m experiments.train --config experiments/configs/deq_mnist.py \
        --workdir runs/deq_mnist [--config.train.epochs=3 ...]

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
orbax checkpoints under ``checkpoints/`` (resumed from automatically) and
``final.json``; prints the test accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from deqjax import adversarial
from deqjax import data as data_lib
from deqjax.attacks import ce_loss
from deqjax.cpl import multiclass_hinge_loss
from deqjax.models import warm_start_logits
from deqjax.regulation import RandomSteps
from experiments import cli, common, models, parallel, seeds
from experiments import fixed_points as fixed_points_lib
from experiments.evaluate import evaluate as robustness_report
from experiments.spec import ModelSpec, deq_config

log = logging.getLogger("deqjax.train")


LOSSES = ("ce", "hinge", "pgd_at", "trades", "mixed")
# Adversarial training (the maths is deqjax.adversarial's): the inner attack that makes
# x_adv inside the step, and the outer objective of (clean logits, adversarial logits).
_INNER_ATTACK = {"pgd_at": "pgd", "mixed": "pgd", "trades": "trades"}
_OBJECTIVE = {
    "pgd_at": lambda z, z_adv, y, adv: adversarial.pgd_at_objective(z_adv, y),
    "trades": lambda z, z_adv, y, adv: adversarial.trades_objective(z, z_adv, y, adv.beta),
    "mixed": lambda z, z_adv, y, adv: adversarial.mixed_objective(z, z_adv, y, adv.mixed_weight),
}


def _classification_loss(kind, logits, y, margin):
    if kind == "hinge":
        return jnp.mean(multiclass_hinge_loss(logits, y, margin))
    return jnp.mean(ce_loss(logits, y))


def sown_losses(sown) -> dict:
    """``{name: total}`` of the values sown into the ``"losses"`` collection, keyed by the
    sow name wherever in the module tree it was sown (the DEQ layer sows
    ``jacobian_frobenius_sq`` inside its submodule, OTAD ``transport_cost`` at the top)."""
    totals = {}
    for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        totals[name] = totals.get(name, 0.0) + jnp.sum(value)
    return totals


def _adversarial_examples(kind, apply_fn, params, x, y, key, adv, attack_logits=None):
    kw = dict(eps=adv.eps, step=adv.step, steps=adv.steps, norm=adv.norm)
    if attack_logits is not None:  # warm-started DEQ solves (adv.warm_start)
        kw["attack_logits"] = attack_logits
    if _INNER_ATTACK[kind] == "pgd":
        return adversarial.pgd_adversarial_examples(apply_fn, params, x, y, key, **kw)
    return adversarial.trades_adversarial_examples(apply_fn, params, x, key, **kw)


def make_loss_fn(spec: ModelSpec, config):
    """``loss(params, model_state, x, y, key, probe) -> (loss, (aux, new_model_state))``.

    ``train.loss``: ``ce`` / ``hinge`` on clean inputs, or adversarial training with
    an inner attack inside the step: ``pgd_at`` (Madry et al. 2018), ``trades``
    (Zhang et al. 2019, β = ``adv.beta``) or ``mixed`` (clean/adversarial weight
    ``adv.mixed_weight``) — :mod:`deqjax.adversarial`'s inner attacks and objectives;
    TRADES and mixed get the clean and adversarial logits from one forward pass. For
    DEQs the inner attack differentiates the model with ``adv.attack_gradient``
    (``implicit`` or ``phantom``) while the weight update uses ``deq.backward``. With
    ``deq.random_states_max = n_max > 0`` every training forward uses random
    intermediate states (one draw for the inner attack, one for the weight update, per
    batch). ``adv.warm_start`` (DEQs): each inner attack step's solve starts
    from the previous step's equilibrium (:func:`deqjax.models.warm_start_logits`; needs
    a tolerance-stopped forward and ``adv.attack_gradient`` implicit or phantom); the
    weight update's forward stays cold. Sown regularisers are added with their weights
    (``deq.jac_reg`` for the Hutchinson Jacobian term, and any family-specific ones).

    ``train.reuse_fixed_points`` (DEQs): ``loss(..., z0)`` starts the weight update's
    solves at ``z0`` (the stored equilibria of the batch's examples; both halves of
    TRADES/mixed's clean + adversarial batch start from it), and ``new_model_state``
    then holds the solution under ``"fixed_points"`` (:mod:`experiments.fixed_points`).
    """
    kind = config.train.loss
    if kind not in LOSSES:
        raise ValueError(f"unknown train.loss {kind!r}; available: {LOSSES}")
    model, deq = spec.module, spec.is_deq
    reg_weights = {"jacobian_frobenius_sq": float(config.deq.jac_reg) if deq else 0.0}
    reg_weights.update(spec.regularizers)
    call_kwargs = dict(spec.train_kwargs)
    reuse = fixed_points_lib.enabled(config)
    if reuse:
        fixed_points_lib.check_supported(spec, config)
    reset = reuse and fixed_points_lib.reset_stale(config)
    mutable = ["losses", *spec.mutable] + (["fixed_points"] if reuse else [])
    base = "hinge" if kind == "hinge" else "ce"
    margin = float(config.train.get("hinge_margin", 0.7))
    adv = config.get("adv")
    attack_kwargs = dict(call_kwargs)
    if deq and adv is not None:
        attack_kwargs["config"] = dataclasses.replace(
            deq_config(config.deq), backward=adv.attack_gradient
        )

    n_random = int(config.deq.random_states_max) if deq else 0
    warm = bool(adv.get("warm_start", False)) if adv is not None else False
    if warm and not deq:
        raise ValueError("adv.warm_start starts DEQ solves warm; this model is not a DEQ")
    if warm and n_random:
        raise ValueError(
            "adv.warm_start cannot be combined with deq.random_states_max > 0 (random "
            "intermediate states run a drawn number of steps from z0 = 0, which a warm start "
            "changes); set one of them off"
        )

    def warm_logits(model_state):
        if not warm:
            return None
        return lambda params: warm_start_logits(
            model, {"params": params, **model_state}, config=attack_kwargs["config"]
        )

    def attack_apply(model_state, key):
        extra = {"random_steps": RandomSteps(key, n_random)} if n_random else {}

        def fn(params, x):
            return model.apply({"params": params, **model_state}, x, **attack_kwargs, **extra)[0]

        return fn

    def forward(params, model_state, x, key, probe, z0=None):
        kwargs = dict(call_kwargs)
        if z0 is not None:
            reps = x.shape[0] // z0.shape[0]  # TRADES/mixed: clean and adversarial rows
            kwargs.update(z0=jnp.concatenate([z0] * reps) if reps > 1 else z0)
            kwargs.update(reset_stale=reset)
        if deq:
            kwargs["backward_probe"] = probe
            if n_random:
                kwargs["random_steps"] = RandomSteps(jax.random.fold_in(key, 1), n_random)
            if reg_weights["jacobian_frobenius_sq"] > 0:
                kwargs["jacobian_key"] = key
        (logits, stats), new_vars = model.apply(
            {"params": params, **model_state}, x, mutable=mutable, **kwargs
        )
        new_vars = dict(new_vars)
        reg = sown_losses(new_vars.pop("losses", {}))
        return logits, stats, reg, new_vars

    def loss_fn(params, model_state, x, y, key, probe, z0=None):
        attack_key, reg_key, states_key = jax.random.split(key, 3)
        aux = {}
        if kind in ("ce", "hinge"):
            logits, stats, reg, new_vars = forward(params, model_state, x, reg_key, probe, z0)
            loss = _classification_loss(base, logits, y, margin)
        else:
            apply_fn = attack_apply(model_state, states_key)
            x_adv = _adversarial_examples(
                kind, apply_fn, params, x, y, attack_key, adv, warm_logits(model_state)
            )
            if kind == "pgd_at":  # the outer loss sees the adversarial inputs only
                logits, stats, reg, new_vars = forward(
                    params, model_state, x_adv, reg_key, probe, z0
                )
                logits_adv = logits
            else:  # clean and adversarial logits from one forward pass
                both = jnp.concatenate([x, x_adv])
                probe2 = jnp.concatenate([probe, jnp.zeros_like(probe)])
                logits2, stats, reg, new_vars = forward(
                    params, model_state, both, reg_key, probe2, z0
                )
                logits, logits_adv = logits2[: len(x)], logits2[len(x) :]
                aux["adversarial_accuracy"] = jnp.mean(jnp.argmax(logits_adv, -1) == y)
            loss = _OBJECTIVE[kind](logits, logits_adv, y, adv)
        for name, value in reg.items():
            w = reg_weights.get(name, 0.0)
            loss = loss + w * value
            aux[name] = value
        aux.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits[: len(y)], -1) == y))
        if stats is not None:
            aux.update(
                forward_steps=jnp.mean(stats.steps),
                forward_rel_residual=jnp.mean(stats.rel_residual),
                nonconverged=jnp.mean(1.0 - stats.converged),
            )
        return loss, (aux, new_vars)

    return loss_fn


def make_train_step(
    spec: ModelSpec,
    optimizer,
    config,
    *,
    state_shardings=None,
    batch_sharding=None,
    store_sharding=None,
):
    """The jitted step ``(state, x, y) -> (state, aux)``. With ``state_shardings`` and
    ``batch_sharding`` (see :mod:`experiments.parallel`) the step is partitioned over
    their mesh: the batch (and the inner attack of adversarial training) is split over
    the data axis, and the state keeps its layout from step to step.

    ``train.reuse_fixed_points``: ``(state, x, y, idx, store) -> (state, aux, store)``,
    ``idx`` the batch's dataset indices and ``store`` the per-example equilibria
    (:mod:`experiments.fixed_points`; ``store_sharding`` its layout): the solves start
    at ``store[idx]`` and the new equilibria are written back there.

    ``train.seeds = K > 1``: ``jax.vmap`` of that step over a leading seed axis of every
    argument (the stacked states of :mod:`experiments.seeds`, ``(K, B, ...)`` batches);
    pass the stacked shardings (:func:`experiments.seeds.stacked_shardings`,
    :func:`experiments.seeds.seed_batch_sharding`). ``aux`` values are then ``(K,)``."""
    loss_fn = make_loss_fn(spec, config)
    skip_nonfinite = bool(config.train.skip_nonfinite)
    reuse = fixed_points_lib.enabled(config)

    def train_step(state: common.TrainState, x, y, idx=None, store=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        probe = jnp.zeros((x.shape[0], 2), x.dtype)
        z0 = None if store is None else store[idx]
        (_, (aux, new_vars)), (grads, probe_grad) = jax.value_and_grad(
            loss_fn, argnums=(0, 5), has_aux=True
        )(state.params, state.model_state, x, y, key, probe, z0)
        fixed = new_vars.pop("fixed_points", None)
        if spec.is_deq:
            # The probe's gradient is the adjoint solve's [relative residual, steps] per example.
            aux["backward_rel_residual"] = jnp.mean(probe_grad[:, 0])
            aux["backward_steps"] = jnp.mean(probe_grad[:, 1])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        aux["grad_norm"] = optax.global_norm(grads)
        model_state = {**state.model_state, **new_vars}
        # a non-finite loss or gradient never becomes an update: the loop stops on it,
        # or (train.skip_nonfinite) keeps the previous state and counts the batch
        finite = jnp.isfinite(aux["loss"]) & jnp.isfinite(aux["grad_norm"])
        aux["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            model_state = keep(model_state, state.model_state)
        new_state = common.TrainState(params, model_state, opt_state, state.step + 1, state.key)
        if store is None:
            return new_state, aux
        z, reset = fixed_points_lib.sown_state(fixed)
        n = y.shape[0]  # TRADES/mixed also solved the adversarial rows: keep the clean ones
        if reset is not None:
            aux["reuse_reset"] = jnp.mean(reset[:n].astype(jnp.float32))
        z = jnp.where(finite, z[:n].astype(store.dtype), z0)
        return new_state, aux, store.at[idx].set(z)

    step = train_step
    if seeds.seed_count(config) > 1:
        step = jax.vmap(train_step)
    if reuse:
        fn = lambda state, x, y, idx, store: step(state, x, y, idx, store)
    else:
        fn = lambda state, x, y: step(state, x, y)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=(0, 4) if reuse else 0)
    rep = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    if reuse:
        return jax.jit(
            fn,
            donate_argnums=(0, 4),
            in_shardings=(
                state_shardings,
                batch_sharding,
                batch_sharding,
                batch_sharding,
                store_sharding,
            ),
            out_shardings=(state_shardings, rep, store_sharding),
        )
    return jax.jit(
        fn,
        donate_argnums=0,
        in_shardings=(state_shardings, batch_sharding, batch_sharding),
        out_shardings=(state_shardings, rep),
    )


def _nonfinite_message(ds, config, epoch: int, batch: int, step: int, seed=None) -> str:
    """Which step and batch produced a non-finite loss or gradient, and what to do
    (``seed``: which seed of a multi-seed run; default ``config.seed``)."""
    bs = config.train.batch_size
    seed = config.seed if seed is None else seed
    idx = data_lib.epoch_permutation(len(ds.train_images), seed, epoch)
    idx = idx[batch * bs : (batch + 1) * bs]
    bad = [int(i) for i in idx if not np.all(np.isfinite(ds.train_images[i]))]
    where = (
        f"{len(bad)} of its images have non-finite pixels (training indices {bad[:10]})"
        if bad
        else "its images are finite, so the model diverged (lower train.learning_rate, "
        "set train.grad_clip, or check the solver: deq.max_iter / deq.tol)"
    )
    which = f" of seed {seed}" if seeds.seed_count(config) > 1 else ""
    return (
        f"non-finite loss or gradient{which} at step {step} (epoch {epoch + 1}, batch {batch}: "
        f"training examples {[int(i) for i in idx[:8]]}…); {where}. The update was not "
        "applied and no checkpoint was written for this step. To skip such batches instead "
        "(counted in metrics.jsonl as train_nonfinite), pass --config.train.skip_nonfinite=True."
    )


def make_eval_fn(spec: ModelSpec):
    @jax.jit
    def predict(params, model_state, x):
        logits, stats = spec.module.apply({"params": params, **model_state}, x, **spec.eval_kwargs)
        return logits, stats

    return predict


@functools.cache
def _eval_sums(predict):
    def masked(v, mask):
        v = jnp.asarray(v, jnp.float32)
        return jnp.sum(v * mask) if v.ndim else v

    @jax.jit
    def sums(params, model_state, x, y, mask):
        logits, stats = predict(params, model_state, x)
        out = {"correct": jnp.sum((jnp.argmax(logits, -1) == y) & mask)}
        if stats is not None:
            out.update(
                steps=masked(stats.steps, mask),
                res=masked(stats.rel_residual, mask),
                nonconv=masked(1 - stats.converged, mask),
            )
        return out

    return sums


def evaluate(predict, state, images, labels, batch_size, mesh=None):
    """Accuracy and solver statistics on a split. Batches are split over ``mesh``'s data
    axis (default: all devices); a short last batch is padded and masked."""
    mesh = mesh or parallel.make_mesh()
    sharding = parallel.batch_sharding(mesh)
    size = -(-batch_size // parallel.data_size(mesh)) * parallel.data_size(mesh)
    sums_fn = _eval_sums(predict)
    correct, steps, res, nonconv, n = 0, 0.0, 0.0, 0.0, 0
    for x, y in data_lib.eval_batches(images, labels, batch_size):
        (xp, yp), mask = parallel.pad_batch((x, y), size)
        xg, yg, mg = parallel.shard_host_batch((xp, yp, mask), sharding)
        out = sums_fn(state.params, state.model_state, xg, yg, mg)
        correct += int(out["correct"])
        if "steps" in out:
            steps += float(out["steps"])
            res += float(out["res"])
            nonconv += float(out["nonconv"])
        n += len(y)
    out = {"accuracy": correct / n}
    if steps:
        out.update(forward_steps=steps / n, forward_rel_residual=res / n, nonconverged=nonconv / n)
    return out


def _saved_sums(sums: dict) -> dict:
    """The running metric sums as JSON: floats (one seed) or lists (per seed)."""
    return {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist() for k, v in sums.items()}


def _restore_sums(saved: dict) -> dict:
    return {k: np.asarray(v, np.float32) if isinstance(v, list) else v for k, v in saved.items()}


def _seed_mean(per_seed: list, seed_list: list) -> dict:
    """One seed: its values. Several: the mean of each value over seeds, and ``seeds``,
    each seed's values with its ``seed``."""
    if len(per_seed) == 1:
        return per_seed[0]
    keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
    out = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    out["seeds"] = [{"seed": s, **r} for s, r in zip(seed_list, per_seed, strict=True)]
    return out


def _write_metrics(path: str, records: list) -> None:
    if parallel.is_main_process():
        common.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _read_metrics(path: str) -> list:
    text = common.read_text(path) if parallel.is_main_process() else None
    return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    skip_damaged_checkpoints: bool = False,
) -> dict:
    """Run (or resume) training; returns the final metrics, with ``resumed_from`` (the
    restored step, 0 for a fresh run) and ``steps_run`` (steps this call ran).

    Data-parallel over all devices of all processes (:mod:`experiments.parallel`).
    A checkpoint (state + the epoch's running metric sums) is saved every
    ``train.checkpoint_every_steps``, at every epoch end, and on SIGTERM at the next
    step boundary (then it returns ``{"step", "interrupted": True, "preempted": True}``).
    ``stop_at_step`` saves a checkpoint and returns at that step, as an
    interrupted run would (used to test exact resumption).

    Invalid config values (``train.epochs = -1``, ``batch_size = 0``, …) are refused
    before anything is written (:func:`experiments.common.validate_config`). A damaged
    or incomplete latest checkpoint is an error naming the step and the newest intact
    one; ``skip_damaged_checkpoints`` (``--skip_damaged_checkpoints``) moves the
    damaged steps aside and resumes from the intact one instead.

    ``train.seeds = K > 1`` trains seeds ``config.seed .. config.seed + K - 1`` as one
    vmapped program (:mod:`experiments.seeds`; one stacked checkpoint): metric records
    and ``final.json`` hold the mean over seeds and a ``seeds`` list of each seed's
    values. ``train.reuse_fixed_points`` keeps each example's last equilibrium as the
    start of its next solve (:mod:`experiments.fixed_points`; checkpointed too)."""
    common.validate_config(config)
    main = parallel.is_main_process()
    if main:
        common.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir or None, config.limit_train, config.limit_test
    )
    data_lib.validate_images(ds.train_images[:1000], "training images")
    t = config.train
    mesh, shard_params = parallel.mesh_from_config(config)
    parallel.check_batch_size(t.batch_size, mesh, "train.batch_size")
    steps_per_epoch = data_lib.batches_per_epoch(len(ds.train_images), t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    spec = models.build(config, ds.num_classes)
    optimizer = common.build_optimizer(t, total_steps)
    n_seeds, seed_list = seeds.seed_count(config), seeds.seed_values(config)
    reuse = fixed_points_lib.enabled(config)
    states = [common.init_state(spec.module, optimizer, ds.image_shape, s) for s in seed_list]
    state_sh = parallel.state_shardings(mesh, states[0], shard_params)
    batch_sh = parallel.batch_sharding(mesh)
    step_batch_sh = batch_sh
    if n_seeds > 1:
        state_sh, step_batch_sh = seeds.stacked_shardings(state_sh), seeds.seed_batch_sharding(mesh)
        state = parallel.put_state(seeds.stack(states), state_sh)
    else:
        state = parallel.put_state(states[0], state_sh)
    del states
    store = store_sh = None
    if reuse:
        fixed_points_lib.check_supported(spec, config)
        store = fixed_points_lib.new_store(
            spec, ds.image_shape, len(ds.train_images), mesh, n_seeds
        )
        store_sh = fixed_points_lib.store_sharding(mesh, n_seeds)
        if main:
            log.info(
                "fixed-point store: %d examples x %d seed(s), %.1f MB",
                len(ds.train_images),
                n_seeds,
                n_seeds * fixed_points_lib.nbytes(spec, ds.image_shape, len(ds.train_images)) / 1e6,
            )
    mngr = common.checkpoint_manager(workdir, keep=t.keep_checkpoints)
    restore_kw = dict(
        with_progress=True,
        skip_damaged=skip_damaged_checkpoints,
        skip_hint="--skip_damaged_checkpoints",
    )
    if reuse:
        restored, progress, extra = common.restore_latest(
            mngr, state, extra={"fixed_points": {"z": store}}, **restore_kw
        )
        if restored is not None and "fixed_points" not in extra and main:
            log.warning("the checkpoint has no fixed-point store: its solves start from zero")
        store = extra.get("fixed_points", {"z": store})["z"]
    else:
        restored, progress = common.restore_latest(mngr, state, **restore_kw)
    if restored is not None:
        state = restored
        if main:
            log.info("resumed from step %d", int(np.max(state.step)))
    train_step = make_train_step(
        spec,
        optimizer,
        config,
        state_shardings=state_sh,
        batch_sharding=step_batch_sh,
        store_sharding=store_sh,
    )
    extra_items = lambda: {"fixed_points": {"z": store}} if reuse else None
    predict = make_eval_fn(spec)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    rows = parallel.process_rows(batch_sh, t.batch_size)

    step = resumed_from = int(np.max(state.step))
    # Records past the checkpoint (written before a crash) are rewritten by this run.
    records = [r for r in _read_metrics(metrics_path) if r.get("step", 0) <= step]
    _write_metrics(metrics_path, records)
    start_epoch = step // steps_per_epoch
    guard = parallel.PreemptionGuard()

    def stop(preempted):
        mngr.wait_until_finished()
        if main:
            print(
                f"{'SIGTERM: saved' if preempted else 'stopped at'} step {step} "
                f"(checkpoint in {workdir}); rerun the same command to resume",
                flush=True,
            )
        return {
            "step": step,
            "interrupted": True,
            "preempted": preempted,
            "resumed_from": resumed_from,
            "steps_run": step - resumed_from,
        }

    with guard:
        for epoch in range(start_epoch, t.epochs):
            start_batch = step - epoch * steps_per_epoch
            sums, count = {}, 0
            if (
                start_batch
                and progress
                and progress.get("epoch") == epoch
                and progress.get("count") == start_batch
            ):
                sums, count = _restore_sums(progress["sums"]), int(progress["count"])  # so far
            elif start_batch and main:
                log.warning(
                    "no running metric sums for epoch %d in the checkpoint: its train_* "
                    "metrics average only the batches after step %d",
                    epoch + 1,
                    step,
                )
            t0 = time.time()
            if n_seeds > 1:
                batches = seeds.host_seed_batches(
                    ds.train_images,
                    ds.train_labels,
                    t.batch_size,
                    seeds=seed_list,
                    epoch=epoch,
                    start_batch=start_batch,
                    rows=rows,
                )
            else:
                batches = parallel.host_epoch_batches(
                    ds.train_images,
                    ds.train_labels,
                    t.batch_size,
                    seed=config.seed,
                    epoch=epoch,
                    start_batch=start_batch,
                    rows=rows,
                    with_indices=reuse,
                )
            bar = tqdm(
                batches,
                total=steps_per_epoch - start_batch,
                desc=f"epoch {epoch + 1}/{t.epochs}",
                disable=not (t.progress and main),
                leave=False,
                file=sys.stderr,
            )
            for arrays in bar:
                arrays = arrays if reuse else arrays[:2]
                if n_seeds > 1:
                    arrays = seeds.global_seed_batch(arrays, step_batch_sh, t.batch_size)
                else:
                    arrays = parallel.global_batch(arrays, batch_sh, t.batch_size)
                if reuse:
                    state, aux, store = train_step(state, *arrays, store)
                else:
                    state, aux = train_step(state, *arrays)
                bad = np.flatnonzero(np.asarray(aux["nonfinite"]).reshape(-1))
                if not t.skip_nonfinite and len(bad):
                    raise FloatingPointError(
                        _nonfinite_message(
                            ds,
                            config,
                            epoch,
                            step - epoch * steps_per_epoch,
                            step + 1,
                            seed=seed_list[int(bad[0])],
                        )
                    )
                step += 1
                for k, v in aux.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if count % 10 == 0 and main and t.progress:
                    bar.set_postfix(
                        loss=f"{float(np.mean(aux['loss'])):.3f}",
                        acc=f"{float(np.mean(aux['accuracy'])):.3f}",
                    )
                if step == (epoch + 1) * steps_per_epoch:
                    break  # the epoch-end save below covers this step, after its record
                preempted = guard.reached(step)
                if step % t.checkpoint_every_steps == 0 or step == stop_at_step or preempted:
                    progress_now = {"epoch": epoch, "count": count, "sums": _saved_sums(sums)}
                    common.save_checkpoint(
                        mngr,
                        step,
                        state,
                        progress_now,
                        force=step == stop_at_step or preempted,
                        extra=extra_items(),
                    )
                if step == stop_at_step or preempted:
                    return stop(preempted)
            record = {"epoch": epoch + 1, "step": step, "seconds": time.time() - t0}
            per_seed = [
                {f"train_{k}": float(np.reshape(v, -1)[i]) / max(count, 1) for k, v in sums.items()}
                for i in range(n_seeds)
            ]
            for i, row in enumerate(per_seed):
                row.update(
                    {
                        f"test_{k}": v
                        for k, v in evaluate(
                            predict,
                            seeds.seed_state(state, i) if n_seeds > 1 else state,
                            ds.test_images,
                            ds.test_labels,
                            config.eval.batch_size,
                            mesh,
                        ).items()
                    }
                )
            record.update(_seed_mean(per_seed, seed_list))
            frac = record.get("train_nonconverged", 0.0)
            if frac > t.nonconvergence_warning and main:
                log.warning(
                    "epoch %d: %.1f%% of training solves did not reach tol=%g in %d steps "
                    "(mean relative residual %.3g)",
                    epoch + 1,
                    100 * frac,
                    config.deq.tol,
                    config.deq.max_iter,
                    record.get("train_forward_rel_residual", float("nan")),
                )
            records.append(record)
            _write_metrics(metrics_path, records)
            if main:
                print(
                    f"epoch {epoch + 1}: train loss {record.get('train_loss', float('nan')):.4f}  "
                    f"test accuracy {record['test_accuracy']:.4f}",
                    flush=True,
                )
            if mngr.latest_step() != step:
                common.save_checkpoint(
                    mngr,
                    step,
                    state,
                    {"epoch": epoch + 1, "count": 0, "sums": {}},
                    force=True,
                    extra=extra_items(),
                )
            preempted = guard.reached(step)
            if step == stop_at_step or (preempted and epoch + 1 < t.epochs):
                return stop(preempted)
    mngr.wait_until_finished()

    final = {"step": step}
    run_info = {"resumed_from": resumed_from, "steps_run": step - resumed_from}
    per_seed = [
        {
            f"test_{k}": v
            for k, v in evaluate(
                predict,
                seeds.seed_state(state, i) if n_seeds > 1 else state,
                ds.test_images,
                ds.test_labels,
                config.eval.batch_size,
                mesh,
            ).items()
        }
        for i in range(n_seeds)
    ]
    final.update(_seed_mean(per_seed, seed_list))
    if main:
        common.write_text(os.path.join(workdir, "final.json"), json.dumps(final, indent=2))
        print(f"test accuracy: {final['test_accuracy']:.4f}", flush=True)
    if config.robustness.after_training:
        if main:
            print("robustness report (experiments.evaluate):", flush=True)
        final["robustness"] = robustness_report(workdir, quiet=not (t.progress and main))
        if not t.progress and main:
            print(common.read_text(os.path.join(workdir, "report.md")), flush=True)
    return {**final, **run_info}  # final.json holds what does not depend on restarts


def main(argv):
    del argv  # logging is set up by cli (deqjax INFO on process 0, absl/orbax WARNING)
    train(
        cli.flag("config"),
        cli.flag("workdir"),
        skip_damaged_checkpoints=cli.flag("skip_damaged_checkpoints"),
    )


def _flags(flags) -> None:
    flags.DEFINE_bool(
        "skip_damaged_checkpoints",
        False,
        "resume from the newest checkpoint that restores, moving damaged newer steps to "
        "WORKDIR/checkpoints_damaged/ (default: a damaged latest checkpoint is an error)",
    )


if __name__ == "__main__":
    cli.run(main, _flags)
