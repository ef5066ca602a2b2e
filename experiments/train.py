r"""Train a model from a config file.

    python -m experiments.train --config experiments/configs/deq_mnist.py \
        --workdir runs/deq_mnist [--config.train.epochs=3 ...]

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
orbax checkpoints under ``checkpoints/`` (resumed from automatically) and
``final.json``; prints the test accuracy.
"""

from __future__ import annotations

import dataclasses
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
from experiments import common, models

log = logging.getLogger("deqjax.train")


LOSSES = ("ce", "hinge", "pgd_at", "trades", "mixed")


def _classification_loss(kind, logits, y, margin):
    if kind == "hinge":
        from deqjax.cpl import multiclass_hinge_loss

        return jnp.mean(multiclass_hinge_loss(logits, y, margin))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_loss_fn(spec: models.ModelSpec, config):
    """``loss(params, model_state, x, y, key, probe) -> (loss, (aux, new_model_state))``.

    ``train.loss``: ``ce`` / ``hinge`` on clean inputs, or adversarial training with
    an inner attack inside the step: ``pgd_at`` (Madry et al. 2018), ``trades``
    (Zhang et al. 2019, β = ``adv.beta``) or ``mixed`` (clean/adversarial weight
    ``adv.mixed_weight``). For DEQs the inner attack differentiates the model with
    ``adv.attack_gradient`` (``implicit`` or ``phantom``) while the weight update uses
    ``deq.backward``. With ``deq.random_states_max = n_max > 0`` every training
    forward uses random intermediate states (one draw for the inner attack, one for
    the weight update, per batch; SPEC §5). Sown regularisers are added with their weights
    (``deq.jac_reg`` for the Hutchinson Jacobian term, and any family-specific ones).
    """
    kind = config.train.loss
    if kind not in LOSSES:
        raise ValueError(f"unknown train.loss {kind!r}; available: {LOSSES}")
    model, deq = spec.module, spec.is_deq
    reg_weights = {"jacobian_frobenius_sq": float(config.deq.jac_reg) if deq else 0.0}
    reg_weights.update(spec.regularizers)
    call_kwargs = dict(spec.train_kwargs)
    mutable = ["losses", *spec.mutable]
    base = "hinge" if kind == "hinge" else "ce"
    margin = float(config.train.get("hinge_margin", 0.7))
    adv = config.get("adv")
    attack_kwargs = dict(call_kwargs)
    if deq and adv is not None:
        attack_kwargs["config"] = dataclasses.replace(models.deq_config(config.deq),
                                                      backward=adv.attack_gradient)

    n_random = int(config.deq.random_states_max) if deq else 0

    def attack_apply(model_state, key):
        extra = {"random_steps_key": key, "random_steps_max": n_random} if n_random else {}

        def fn(params, x):
            return model.apply({"params": params, **model_state}, x, **attack_kwargs, **extra)[0]
        return fn

    def forward(params, model_state, x, key, probe):
        kwargs = dict(call_kwargs)
        if deq:
            kwargs["backward_probe"] = probe
            if n_random:
                kwargs.update(random_steps_key=jax.random.fold_in(key, 1), random_steps_max=n_random)
            if reg_weights["jacobian_frobenius_sq"] > 0:
                kwargs["jacobian_key"] = key
        (logits, stats), new_vars = model.apply({"params": params, **model_state}, x, mutable=mutable, **kwargs)
        new_vars = dict(new_vars)
        sown = new_vars.pop("losses", {})
        reg = {name: jnp.sum(jnp.asarray(jax.tree.leaves(tree))) for name, tree in sown.items()}
        return logits, stats, reg, new_vars

    def loss_fn(params, model_state, x, y, key, probe):
        attack_key, reg_key, states_key = jax.random.split(key, 3)
        aux = {}
        if kind in ("pgd_at", "mixed"):
            x_adv = adversarial.pgd_adversarial_examples(
                attack_apply(model_state, states_key), params, x, y, attack_key, eps=adv.eps, step=adv.step,
                steps=adv.steps, norm=adv.norm)
        elif kind == "trades":
            x_adv = adversarial.trades_adversarial_examples(
                attack_apply(model_state, states_key), params, x, attack_key, eps=adv.eps, step=adv.step,
                steps=adv.steps, norm=adv.norm)
        if kind in ("ce", "hinge"):
            logits, stats, reg, new_vars = forward(params, model_state, x, reg_key, probe)
            loss = _classification_loss(base, logits, y, margin)
        elif kind == "pgd_at":
            logits, stats, reg, new_vars = forward(params, model_state, x_adv, reg_key, probe)
            loss = _classification_loss(base, logits, y, margin)
        else:
            both = jnp.concatenate([x, x_adv])
            probe2 = jnp.concatenate([probe, jnp.zeros_like(probe)])
            logits2, stats, reg, new_vars = forward(params, model_state, both, reg_key, probe2)
            logits, logits_adv = logits2[: len(x)], logits2[len(x):]
            clean = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if kind == "trades":
                lp, lq = jax.nn.log_softmax(logits), jax.nn.log_softmax(logits_adv)
                kl = jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
                loss = clean + adv.beta * kl
            else:
                adv_ce = optax.softmax_cross_entropy_with_integer_labels(logits_adv, y).mean()
                loss = (1 - adv.mixed_weight) * clean + adv.mixed_weight * adv_ce
            aux["adversarial_accuracy"] = jnp.mean(jnp.argmax(logits_adv, -1) == y)
        for name, value in reg.items():
            w = reg_weights.get(name, 0.0)
            loss = loss + w * value
            aux[name] = value
        aux.update(loss=loss, accuracy=jnp.mean(jnp.argmax(logits[: len(y)], -1) == y))
        if stats is not None:
            aux.update(forward_steps=jnp.mean(stats.steps), forward_rel_residual=jnp.mean(stats.rel_residual),
                       nonconverged=jnp.mean(1.0 - stats.converged))
        return loss, (aux, new_vars)

    return loss_fn


def make_train_step(spec: models.ModelSpec, optimizer, config):
    loss_fn = make_loss_fn(spec, config)

    def train_step(state: common.TrainState, x, y):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        probe = jnp.zeros((x.shape[0], 2), x.dtype)
        (_, (aux, new_vars)), (grads, probe_grad) = jax.value_and_grad(
            loss_fn, argnums=(0, 5), has_aux=True)(state.params, state.model_state, x, y, key, probe)
        if spec.is_deq:
            # The probe's gradient is the adjoint solve's [relative residual, steps] per example.
            aux["backward_rel_residual"] = jnp.mean(probe_grad[:, 0])
            aux["backward_steps"] = jnp.mean(probe_grad[:, 1])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        aux["grad_norm"] = optax.global_norm(grads)
        model_state = {**state.model_state, **new_vars}
        return common.TrainState(params, model_state, opt_state, state.step + 1, state.key), aux

    return jax.jit(train_step, donate_argnums=0)


def make_eval_fn(spec: models.ModelSpec):
    @jax.jit
    def predict(params, model_state, x):
        logits, stats = spec.module.apply({"params": params, **model_state}, x, **spec.eval_kwargs)
        return logits, stats

    return predict


def evaluate(predict, state, images, labels, batch_size):
    """Accuracy and solver statistics on a split."""
    correct, steps, res, nonconv, n = 0, 0.0, 0.0, 0.0, 0
    for x, y in data_lib.eval_batches(images, labels, batch_size):
        logits, stats = predict(state.params, state.model_state, x)
        correct += int(jnp.sum(jnp.argmax(logits, -1) == y))
        if stats is not None:
            steps += float(jnp.sum(stats.steps))
            res += float(jnp.sum(stats.rel_residual))
            nonconv += float(jnp.sum(1 - stats.converged))
        n += len(y)
    out = {"accuracy": correct / n}
    if steps:
        out.update(forward_steps=steps / n, forward_rel_residual=res / n, nonconverged=nonconv / n)
    return out


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> dict:
    """Run (or resume) training; returns the final metrics.

    ``stop_at_step`` saves a checkpoint and returns at that step, as an
    interrupted run would (used to test exact resumption)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(config.to_json(indent=2))
    ds = data_lib.load_dataset(config.dataset, config.data_dir or None, config.limit_train, config.limit_test)
    data_lib.validate_images(ds.train_images[:1000], "training images")
    t = config.train
    steps_per_epoch = data_lib.batches_per_epoch(len(ds.train_images), t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    spec = models.build(config, ds.num_classes)
    optimizer = common.build_optimizer(t, total_steps)
    state = common.init_state(spec.module, optimizer, ds.image_shape, config.seed)
    mngr = common.checkpoint_manager(workdir, keep=t.keep_checkpoints)
    restored = common.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        log.info("resumed from step %d", int(state.step))
    train_step = make_train_step(spec, optimizer, config)
    predict = make_eval_fn(spec)
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    step = int(state.step)
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, t.epochs):
        start_batch = step - epoch * steps_per_epoch
        batches = data_lib.epoch_batches(ds.train_images, ds.train_labels, t.batch_size,
                                         seed=config.seed, epoch=epoch, start_batch=start_batch)
        sums, count, t0 = {}, 0, time.time()
        bar = tqdm(batches, total=steps_per_epoch - start_batch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not t.progress, leave=False, file=sys.stderr)
        for x, y in bar:
            state, aux = train_step(state, x, y)
            step += 1
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{float(aux['loss']):.3f}", acc=f"{float(aux['accuracy']):.3f}")
            if step % t.checkpoint_every_steps == 0 or step == stop_at_step:
                mngr.save(step, args=common.ocp.args.StandardSave(state), force=step == stop_at_step)
            if step == stop_at_step:
                mngr.wait_until_finished()
                return {"step": step, "interrupted": True}
        record = {"epoch": epoch + 1, "step": step, "seconds": time.time() - t0}
        record.update({f"train_{k}": float(v) / max(count, 1) for k, v in sums.items()})
        record.update({f"test_{k}": v for k, v in evaluate(predict, state, ds.test_images,
                                                            ds.test_labels, config.eval.batch_size).items()})
        frac = record.get("train_nonconverged", 0.0)
        if frac > t.nonconvergence_warning:
            log.warning("epoch %d: %.1f%% of training solves did not reach tol=%g in %d steps "
                        "(mean relative residual %.3g)", epoch + 1, 100 * frac, config.deq.tol,
                        config.deq.max_iter, record.get("train_forward_rel_residual", float("nan")))
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"epoch {epoch + 1}: train loss {record.get('train_loss', float('nan')):.4f}  "
              f"test accuracy {record['test_accuracy']:.4f}", flush=True)
        if mngr.latest_step() != step:  # the in-loop save may have just written this step
            mngr.save(step, args=common.ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()

    final = {"step": step}
    final.update({f"test_{k}": v for k, v in evaluate(predict, state, ds.test_images,
                                                       ds.test_labels, config.eval.batch_size).items()})
    with open(os.path.join(workdir, "final.json"), "w") as fh:
        json.dump(final, fh, indent=2)
    print(f"test accuracy: {final['test_accuracy']:.4f}", flush=True)
    if config.robustness.after_training:
        from experiments.evaluate import evaluate as robustness_report

        print("robustness report (experiments.evaluate):", flush=True)
        final["robustness"] = robustness_report(workdir, quiet=not t.progress)
        if not t.progress:
            print(open(os.path.join(workdir, "report.md")).read(), flush=True)
    return final


def main(argv):
    from absl import flags

    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from experiments import cli

    cli.run(main)
