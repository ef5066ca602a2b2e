"""Configs and small utilities the test files share (kept here so no test file imports
another)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import ml_collections

from experiments.configs import deq_mnist, explicit_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_or_skip(name: str):
    """``pytest.importorskip(name)``, except under ``CI=true``: CI installs the PyTorch
    peers (``.ci/run``), so there a missing one is a failure naming it, never a silent
    skip of the cross-checks."""
    import pytest

    if os.environ.get("CI", "").strip().lower() != "true":
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(
            f"CI=true but {name!r} cannot be imported ({e}): CI must install it (.ci/run "
            "installs torch, torchdeq, torchattacks) or the cross-checks would be skipped",
            pytrace=False,
        )


def tiny_config(epochs: int = 2, name: str = "deq") -> ml_collections.ConfigDict:
    """A DEQ (or its explicit twin) small enough to train in seconds on 256 examples."""
    c = deq_mnist.get_config() if name == "deq" else explicit_mnist.get_config()
    c.limit_train, c.limit_test = 256, 100
    c.model.width, c.model.inner, c.model.groups = 8, 8, 4
    c.deq.max_iter, c.deq.adjoint_max_iter, c.deq.eval_max_iter = 6, 6, 8
    c.deq.jac_reg = 0.0  # deq_mnist's Jacobian regulariser: tested on its own
    c.train.epochs, c.train.batch_size, c.train.progress = epochs, 32, False
    c.train.warmup_steps, c.train.checkpoint_every_steps = 2, 5
    c.eval.batch_size = 100
    c.robustness.after_training = False
    return c


# A tiny DEQ for the scale-out tests; the same values go to train() and, as
# --config.K=V, to the CLI.
PARALLEL_OVERRIDES = {
    "limit_train": 64,
    "limit_test": 32,
    "model.width": 8,
    "model.inner": 8,
    "model.groups": 4,
    "deq.max_iter": 4,
    "deq.adjoint_max_iter": 4,
    "deq.eval_max_iter": 4,
    # The weakly regularised Anderson system of the relative ridge amplifies the float32
    # reduction-order differences of the model-sharded program (shard_params) to ~1% in
    # these 4-step, non-converged gradients (measured: 1.1% on one leaf); the tests look
    # for partitioning errors (O(1)), so they use the better-conditioned absolute ridge.
    "deq.anderson_ridge_mode": "absolute",
    "deq.adjoint_ridge_mode": "absolute",
    "deq.eval_adjoint_ridge_mode": "absolute",
    "deq.jac_reg": 0.0,
    "train.batch_size": 16,
    "train.progress": False,
    "train.warmup_steps": 1,
    "train.checkpoint_every_steps": 2,
    "adv.steps": 2,
    "eval.batch_size": 32,
    "robustness.after_training": False,
    "robustness.n_examples": 20,
    "robustness.batch_size": 20,
    "robustness.attacks": "pgd",
    "robustness.n_iter": 2,
    "robustness.eps": "0.1",
    "robustness.gradients": "implicit",
    "robustness.restarts": 1,
}


def set_path(config: ml_collections.ConfigDict, key: str, value) -> None:
    """``config[a][b] = value`` for ``key = "a.b"``."""
    *path, last = key.split(".")
    target = config
    for part in path:
        target = target[part]
    target[last] = value


def parallel_tiny_config(epochs=1, loss="pgd_at", shard_params=False):
    """:data:`PARALLEL_OVERRIDES` on ``deq_mnist``."""
    c = deq_mnist.get_config()
    for key, value in PARALLEL_OVERRIDES.items():
        set_path(c, key, value)
    c.train.epochs, c.train.loss = epochs, loss
    if shard_params:
        c.parallel = ml_collections.ConfigDict({"shard_params": True, "model_axis_size": 2})
    return c


def read_metrics(workdir) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def loss_gradients(workdir: str) -> list:
    """The training-loss gradient at a workdir's restored parameters on its first training
    batch, computed on the config's mesh (batch sharded as in training; every process
    reads only its rows) — so runs on different device/process counts can be compared
    gradient by gradient, not only after Adam has normalised them away."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import parallel, train
    from experiments.workdir import load_run

    run = load_run(workdir)
    mesh, _ = parallel.mesh_from_config(run.config)
    sharding, bs = parallel.batch_sharding(mesh), run.config.train.batch_size
    ds = run.dataset
    batch = next(
        parallel.host_epoch_batches(
            ds.train_images,
            ds.train_labels,
            bs,
            seed=run.config.seed,
            epoch=0,
            rows=parallel.process_rows(sharding, bs),
        )
    )
    x, y = parallel.global_batch(batch, sharding, bs)
    loss_fn = train.make_loss_fn(run.spec, run.config)
    key, probe = jax.random.PRNGKey(0), jnp.zeros((bs, 2))
    grad = jax.jit(  # the batch is an argument: traced, as in the train step
        jax.grad(lambda p, xx, yy: loss_fn(p, run.state.model_state, xx, yy, key, probe)[0]),
        out_shardings=parallel.replicated(mesh),
    )(run.state.params, x, y)
    return [np.asarray(g) for g in jax.tree.leaves(grad)]


def forced_device_xla_flags(devices: int | None) -> str:
    """This process's XLA flags (tests/conftest.py's compile setting included) for a
    subprocess with ``devices`` forced CPU devices (``None``: the default single device);
    a device count already in the flags is replaced."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def run_forced_device_worker(script: str, devices: int, *args: str, timeout: int = 600) -> dict:
    """Run ``tests/<script>`` in a subprocess with ``devices`` forced CPU devices (the
    XLA flag must be set before JAX starts) and return the JSON of its last output line;
    the worker's failure fails the caller with its stderr."""
    env = dict(os.environ, XLA_FLAGS=forced_device_xla_flags(devices))
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_command(workdir, *overrides: str) -> list[str]:
    """The ``experiments.train`` command line of a ``deq_mnist`` run in ``workdir`` with
    ``--config.*`` overrides (run it with ``cwd=ROOT``)."""
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--config",
        "experiments/configs/deq_mnist.py",
        "--workdir",
        str(workdir),
        *overrides,
    ]
