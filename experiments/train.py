r"""Train a model from a config file.

    python -m experiments.train --config experiments/configs/deq_mnist.py \
        --workdir runs/deq_mnist [--config.train.epochs=3 ...]

Writes into ``--workdir``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
orbax checkpoints under ``checkpoints/`` (resumed from automatically) and
``final.json``; prints the test accuracy.
"""

from __future__ import annotations

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

from deqjax import data as data_lib
from experiments import common

log = logging.getLogger("deqjax.train")


def make_loss_fn(model, config):
    """``loss(params, x, y, key, probe) -> (loss, aux)`` for the configured loss."""
    deq = common.is_deq(model)
    jac_reg = float(config.deq.jac_reg) if deq else 0.0
    if config.train.loss != "ce":
        raise ValueError(f"unknown train.loss {config.train.loss!r}; available: 'ce'")

    def loss_fn(params, x, y, key, probe):
        kwargs = {}
        if deq:
            kwargs["backward_probe"] = probe
            if jac_reg > 0:
                kwargs["jacobian_key"] = key
        (logits, stats), extra = model.apply({"params": params}, x, mutable=["losses"], **kwargs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss = ce
        jac = jnp.zeros(())
        if jac_reg > 0:
            jac = jax.tree.leaves(extra["losses"])[0]
            loss = loss + jac_reg * jac
        aux = {"loss": loss, "ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
               "jacobian_frobenius_sq": jac}
        if stats is not None:
            aux.update(forward_steps=jnp.mean(stats.steps), forward_rel_residual=jnp.mean(stats.rel_residual),
                       nonconverged=jnp.mean(1.0 - stats.converged))
        return loss, aux

    return loss_fn


def make_train_step(model, optimizer, config):
    loss_fn = make_loss_fn(model, config)

    def train_step(state: common.TrainState, x, y):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        probe = jnp.zeros((x.shape[0], 2), x.dtype)
        (_, aux), (grads, probe_grad) = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)(
            state.params, x, y, key, probe)
        # The probe's gradient is the adjoint solve's [relative residual, steps] per example.
        aux["backward_rel_residual"] = jnp.mean(probe_grad[:, 0])
        aux["backward_steps"] = jnp.mean(probe_grad[:, 1])
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        aux["grad_norm"] = optax.global_norm(grads)
        return common.TrainState(params, opt_state, state.step + 1, state.key), aux

    return jax.jit(train_step, donate_argnums=0)


def make_eval_fn(model, config):
    kwargs = {"config": common.deq_config(config.deq, evaluation=True)} if common.is_deq(model) else {}

    @jax.jit
    def predict(params, x):
        logits, stats = model.apply({"params": params}, x, **kwargs)
        return logits, stats

    return predict


def evaluate(predict, params, images, labels, batch_size):
    """Accuracy and solver statistics on a split."""
    correct, steps, res, nonconv, n = 0, 0.0, 0.0, 0.0, 0
    for x, y in data_lib.eval_batches(images, labels, batch_size):
        logits, stats = predict(params, x)
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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) training; returns the final metrics."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(config.to_json(indent=2))
    ds = data_lib.load_dataset(config.dataset, config.data_dir or None, config.limit_train, config.limit_test)
    data_lib.validate_images(ds.train_images[:1000], "training images")
    t = config.train
    steps_per_epoch = data_lib.batches_per_epoch(len(ds.train_images), t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    model = common.build_model(config, ds.num_classes)
    optimizer = common.build_optimizer(t, total_steps)
    state = common.init_state(model, optimizer, ds.image_shape, config.seed)
    mngr = common.checkpoint_manager(workdir, keep=t.keep_checkpoints)
    restored = common.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        log.info("resumed from step %d", int(state.step))
    train_step = make_train_step(model, optimizer, config)
    predict = make_eval_fn(model, config)
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
            if step % t.checkpoint_every_steps == 0:
                mngr.save(step, args=common.ocp.args.StandardSave(state))
        record = {"epoch": epoch + 1, "step": step, "seconds": time.time() - t0}
        record.update({f"train_{k}": float(v) / max(count, 1) for k, v in sums.items()})
        record.update({f"test_{k}": v for k, v in evaluate(predict, state.params, ds.test_images,
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
        mngr.save(step, args=common.ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()

    final = {"step": step}
    final.update({f"test_{k}": v for k, v in evaluate(predict, state.params, ds.test_images,
                                                       ds.test_labels, config.eval.batch_size).items()})
    with open(os.path.join(workdir, "final.json"), "w") as fh:
        json.dump(final, fh, indent=2)
    print(f"test accuracy: {final['test_accuracy']:.4f}", flush=True)
    return final


def main(argv):
    from absl import flags

    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from experiments import cli

    cli.run(main)
