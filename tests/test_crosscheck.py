"""deqjax's attacks vs torchattacks' ports of the reference attacks on the same conv net
and images (a small version of ``python -m benchmarks.crosscheck``; skipped without
torch / torchattacks, except under ``CI=true``, where their absence fails)."""

import numpy as np
import pytest

from tests.helpers import import_or_skip

torch = import_or_skip("torch")  # under CI=true a missing peer fails instead
import_or_skip("torchattacks")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import crosscheck as X  # noqa: E402
from deqjax import data as data_lib  # noqa: E402

FAST = {"xla_backend_optimization_level": 0}
EPS = 0.1
TOL = 2  # examples of 64 (3 %): the attacks differ in their random draws only


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    net, params = X.train_convnet(n_train=1000, epochs=1)
    from benchmarks.torch_models import TorchConvNet

    tnet = TorchConvNet().load_flax(jax.device_get(params)).eval()
    ds = data_lib.mnist_5k()
    x, y = ds.test_images[:64], ds.test_labels[:64].astype(np.int32)
    f = lambda xb: net.apply(params, xb)
    yield f, tnet, x, y
    torch.set_num_threads(n)


def _torch_acc(name, tnet, x, y, correct, eps):
    atk = X.torch_attack(name, tnet, X.BUDGETS["quick"], eps, "linf")
    rob, _ = X.run_torch(atk, tnet, x, y, correct, train_mode=False)
    return int(rob.sum())


@pytest.mark.parametrize("name", ["pgd", "apgd-ce", "apgd-t", "fab-t"])
def test_attack_agrees_with_torchattacks(setup, name):
    f, tnet, x, y = setup
    correct = np.asarray(jnp.argmax(f(jnp.asarray(x)), -1) == y)
    att = X.jax_attack(name, X.BUDGETS["quick"], EPS, "linf")
    rob, _, _ = X.run_jax(
        lambda xx, yy, k: att(f, xx, yy, k),
        f,
        jnp.asarray(x),
        jnp.asarray(y),
        correct,
        jax.random.PRNGKey(0),
        FAST,
    )
    ours = int(rob.sum())
    theirs = _torch_acc(name, tnet, x, y, correct, EPS)
    assert 5 < ours < correct.sum() - 5  # a radius where the attack matters
    assert abs(ours - theirs) <= TOL, (name, ours, theirs)
    if name == "apgd-ce":  # negative control: the tolerance detects a weaker attack
        assert abs(ours - _torch_acc(name, tnet, x, y, correct, 0.75 * EPS)) > TOL
