"""The DEQ core on Explicit-axis (``jax.make_mesh``'s default) and Auto-axis meshes with
the batch sharded over 2 and 8 forced CPU devices: a vmapped ``deq_fixed_point`` (every
solver, value and gradient) and the Flax MDEQ classifier (apply and parameter
gradient) equal the computation without a mesh (tests/_mesh_worker.py)."""

import json
import os
import subprocess
import sys

import pytest

from deqjax.solvers import SOLVERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_mesh_worker.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 8])
def test_deq_and_flax_deq_on_explicit_and_auto_meshes(devices):
    res = run_worker(devices)
    assert res["devices"] == devices
    for kind in ("explicit", "auto"):
        for method in SOLVERS:
            assert res[f"{kind}_{method}"] < 1e-5, (kind, method, res)
        assert res[f"{kind}_mdeq"] < 1e-5, (kind, res)
    assert res["mdeq_grad_scale"] > 1e-2  # a non-trivial gradient was compared
