"""The DEQ core on Explicit-axis (``jax.make_mesh``'s default) and Auto-axis meshes with
the batch sharded over 8 forced CPU devices: a vmapped ``deq_fixed_point`` (every
solver, value and gradient) and the Flax MDEQ classifier (apply and parameter
gradient) equal the computation without a mesh (tests/_mesh_worker.py). The worker
builds a 1-D ``data`` mesh over all devices with 2 examples per device, so a 2-device
run takes no code path the 8-device run does not (it was dropped: 24 s)."""

import pytest

from deqjax.solvers import SOLVERS
from tests.helpers import run_forced_device_worker


@pytest.mark.slow
@pytest.mark.parametrize("devices", [8])
def test_deq_and_flax_deq_on_explicit_and_auto_meshes(devices):
    res = run_forced_device_worker("_mesh_worker.py", devices)
    assert res["devices"] == devices
    for kind in ("explicit", "auto"):
        for method in SOLVERS:
            assert res[f"{kind}_{method}"] < 1e-5, (kind, method, res)
        assert res[f"{kind}_mdeq"] < 1e-5, (kind, res)
    assert res["mdeq_grad_scale"] > 1e-2  # a non-trivial gradient was compared
