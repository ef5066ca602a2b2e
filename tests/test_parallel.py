"""Scale-out: sharded training / attacks equal one device, two processes equal one,
SIGTERM + restart equals an uninterrupted run, and the TPU/SLURM scripts are sound.

Multi-device runs happen in subprocesses: ``XLA_FLAGS`` (simulated CPU devices) and
``jax.distributed.initialize`` must come before JAX starts its backend.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import evaluate as evaluate_lib
from experiments import train as train_lib
from experiments.workdir import load_run
from tests.helpers import PARALLEL_OVERRIDES as OVERRIDES
from tests.helpers import ROOT, forced_device_xla_flags, loss_gradients, train_command
from tests.helpers import parallel_tiny_config as tiny_config

TIMEOUT = 240

STEPS = 4  # warmup_steps=1: the first update has learning rate 0, the next three do not

# Runs in a subprocess: [nproc, pid, port] then train STEPS steps (+ robustness report),
# and save the loss gradient at the trained parameters (process 0 writes it).
WORKER = r"""
import json, sys
import jax
import numpy as np
nproc, pid, port, workdir, shard, report = json.loads(sys.argv[1])
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=60)
from experiments import evaluate as evaluate_lib, train as train_lib
from tests.helpers import loss_gradients, parallel_tiny_config as tiny_config
print("devices", jax.device_count(), "processes", jax.process_count(), flush=True)
train_lib.train(tiny_config(epochs=2, shard_params=bool(shard)), workdir, stop_at_step=STEPS)
grads = loss_gradients(workdir)
if jax.process_index() == 0:
    np.savez(workdir + "/grads.npz", *grads)
if report:
    evaluate_lib.evaluate(workdir, quiet=True)
print("done", flush=True)
""".replace("STEPS", str(STEPS))


def _env(n_devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = forced_device_xla_flags(n_devices)
    return env


def _run_workers(args_list, n_devices):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(a)],
            cwd=ROOT,
            env=_env(n_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for a in args_list
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def _params(workdir):
    import jax

    state = load_run(str(workdir)).state
    assert int(state.step) == STEPS
    return [np.asarray(v) for v in jax.tree.leaves(state.params)]


def _grads(workdir):
    with np.load(os.path.join(str(workdir), "grads.npz")) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: STEPS adversarial-training steps, the loss gradient at the result
    and a PGD report, on one device."""
    workdir = tmp_path_factory.mktemp("one")
    train_lib.train(tiny_config(epochs=2), str(workdir), stop_at_step=STEPS)
    grads = loss_gradients(str(workdir))
    report = evaluate_lib.evaluate(str(workdir), quiet=True)
    return workdir, _params(workdir), report, grads


def _assert_same_params(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(
            u, v, rtol=1e-4, atol=1e-5
        )  # reduction order differs across devices


def _assert_same_grads(a, b):
    """Gradient by gradient, relative to each leaf's scale (a wrong gradient scale —
    e.g. a sum over devices where a mean belongs — fails here, though Adam hides it in
    the parameters)."""
    assert len(a) == len(b)
    for u, v in zip(a, b):
        scale = max(float(np.abs(u).max()), 1e-12)
        np.testing.assert_allclose(u / scale, v / scale, atol=1e-3)
    assert any(float(np.abs(u).max()) > 0 for u in a)


# The cell convolution's kernel gradient (deqjax.conv.conv2d, a custom_vjp under
# jax.vmap) is a patch contraction: the conv-based form was mis-partitioned by XLA when
# the batch is sharded (wrong weight gradients on several devices). These tests caught it.


@pytest.mark.slow
def test_eight_devices_match_one_device(one_device, tmp_path):
    """Data-parallel PGD adversarial training (inner attack sharded) and the sharded
    attack report on 8 simulated devices equal one device; so does shard_params on a
    (4 data × 2 model) mesh. The report's 20 examples are padded to 24 on 8 devices.
    Compared after several real Adam steps, and gradient by gradient."""
    _, ref, ref_report, ref_grads = one_device
    dp, sp = tmp_path / "dp", tmp_path / "sp"
    out = _run_workers([[1, 0, 0, str(dp), 0, 1], [1, 0, 0, str(sp), 1, 0]], 8)
    assert "devices 8" in out[0]
    _assert_same_params(_params(dp), ref)
    _assert_same_params(_params(sp), ref)
    _assert_same_grads(_grads(dp), ref_grads)
    _assert_same_grads(_grads(sp), ref_grads)
    report = json.load(open(dp / "report.json"))
    for key in ("clean_accuracy", "robust_accuracy", "worst_case", "n_examples"):
        assert report[key] == ref_report[key], key
    assert report["sanity"]["flags"] == ref_report["sanity"]["flags"]
    np.testing.assert_allclose(report["solver"]["mean_steps"], ref_report["solver"]["mean_steps"])


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    from experiments import parallel

    mesh = parallel.make_mesh()
    parallel.check_batch_size(16, mesh)  # one device divides anything
    fake = type("M", (), {"shape": {"data": 8, "model": 1}})()
    with pytest.raises(ValueError, match="divisible by the 8 data-parallel devices"):
        parallel.check_batch_size(20, fake, "train.batch_size")


@pytest.mark.slow
def test_two_processes_match_one_process(one_device, tmp_path):
    """Two processes (2 CPU devices each, gloo collectives) on 127.0.0.1, each reading
    only its half of every batch, train like one process and share one checkpoint."""
    _, ref, _, ref_grads = one_device
    workdir, port = tmp_path / "mp", _free_port()
    out = _run_workers([[2, i, port, str(workdir), 0, 0] for i in range(2)], 2)
    assert "devices 4 processes 2" in out[0]
    _assert_same_params(_params(workdir), ref)
    _assert_same_grads(_grads(workdir), ref_grads)


def _cli(workdir, epochs):
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    epochs = f"--config.train.epochs={epochs}"
    return train_command(workdir, epochs, "--config.train.loss=ce", *overrides)


@pytest.mark.slow
def test_sigterm_then_restart_equals_uninterrupted_run(tmp_path):
    """SIGTERM as soon as the first checkpoint (step 2) exists: the run saves at the
    next step boundary and exits 0; rerunning the command ends with bitwise the same
    parameters and the same metrics.jsonl (bar wall-clock seconds) as a run that was
    never interrupted (same device count, same XLA program, same data order)."""
    full, part = tmp_path / "full", tmp_path / "part"
    train_lib.train(tiny_config(epochs=3, loss="ce"), str(full))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = forced_device_xla_flags(None)
    proc = subprocess.Popen(
        _cli(part, 3),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + TIMEOUT
        while not (part / "checkpoints" / "2").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "SIGTERM: saved step" in out, out[-3000:]
    assert not (part / "final.json").exists()
    out = subprocess.run(
        _cli(part, 3), cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the rerun resumed from the SIGTERM checkpoint: it logged so and ran only the rest
    restored = int(re.search(r"resumed from step (\d+)", out.stdout + out.stderr).group(1))
    assert 2 <= restored < 12, out.stdout[-2000:]
    for a, b in zip(_params_final(full), _params_final(part)):
        np.testing.assert_array_equal(a, b)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    m_full, m_part = (
        strip(train_lib._read_metrics(str(d / "metrics.jsonl"))) for d in (full, part)
    )
    assert len(m_full) == 3 and m_part == m_full
    assert json.load(open(full / "final.json")) == json.load(open(part / "final.json"))


def _params_final(workdir):
    import jax

    state = load_run(str(workdir)).state
    return [np.asarray(v) for v in jax.tree.leaves(state.params)]


SCRIPTS = ["create.sh", "install.sh", "launch.sh", "logs.sh", "delete.sh"]


def test_tpu_scripts_parse_and_dry_run():
    folder = os.path.join(ROOT, "tpu_scripts")
    paths = [os.path.join(folder, s) for s in SCRIPTS + ["_common.sh", "slurm_example.sbatch"]]
    for p in paths:
        assert subprocess.run(["bash", "-n", p], capture_output=True).returncode == 0, p
    common = ["--name", "tpu1", "--zone", "us-central2-b", "--project", "proj"]
    runs = {
        "create.sh": common + ["--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"],
        "install.sh": common,
        "logs.sh": common,
        "delete.sh": common,
        "launch.sh": common
        + [
            "--config",
            "experiments/configs/deq_mnist.py",
            "--workdir",
            "gs://b/run",
            "--",
            "--config.train.epochs=5",
        ],
    }
    expect = {
        "create.sh": "tpu-vm create tpu1",
        "install.sh": "--worker=all",
        "logs.sh": "tpu-vm ssh tpu1",
        "delete.sh": "tpu-vm delete tpu1",
        "launch.sh": "--workdir=gs://b/run",
    }
    env = dict(os.environ, PATH="/usr/bin:/bin")  # a dry run must not need gcloud
    for script, args in runs.items():
        out = subprocess.run(
            ["bash", os.path.join(folder, script), "--dry-run", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert out.returncode == 0, (script, out.stderr)
        assert "gcloud compute tpus tpu-vm" in out.stdout and expect[script] in out.stdout, (
            script,
            out.stdout,
        )
        assert "--project=proj" in out.stdout and "--zone=us-central2-b" in out.stdout
    assert (
        "--config.train.epochs=5"
        in subprocess.run(
            ["bash", os.path.join(folder, "launch.sh"), "--dry-run", *runs["launch.sh"]],
            capture_output=True,
            text=True,
        ).stdout
    )
    bad = subprocess.run(
        ["bash", os.path.join(folder, "create.sh"), "--dry-run"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "usage" in bad.stderr.lower()
    if shutil.which("shellcheck") is None:
        pytest.skip(
            "shellcheck not installed (apt-get install shellcheck): bash -n and dry runs passed"
        )
    out = subprocess.run(
        ["shellcheck", "-x", "-s", "bash", *paths], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout
