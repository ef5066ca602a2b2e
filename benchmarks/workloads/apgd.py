"""APGD-CE (Croce & Hein 2020), 100 iterations, L∞ eps 0.3, on a small explicit conv net.

deqjax: :func:`deqjax.attacks.apgd` (one ``lax.scan``, jitted). torch:
``torchattacks.APGD`` (the PyTorch port of the reference implementation). Both do
1 + ``steps`` forward+backward passes. Labels are the network's own clean
predictions, so every example starts correctly classified: torchattacks attacks only
those (it skips already-misclassified points), and this makes both attack the full
batch — equal work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from deqjax.attacks import apgd


def setup(batch: int, seed: int = 0):
    from benchmarks.torch_models import TorchConvNet

    net = common.SmallConvNet()
    x, _ = common.mnist_like(batch, seed)
    params = net.init(jax.random.PRNGKey(seed), jnp.asarray(x))
    y = np.asarray(jnp.argmax(net.apply(params, jnp.asarray(x)), -1)).astype(np.int32)
    tnet = TorchConvNet().load_flax(jax.device_get(params)).eval()
    return net, params, tnet, x, y


def workload(batch: int = 128, steps: int = 100, dev=None):
    import torch
    import torchattacks

    net, params, tnet, x, y = setup(batch)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    logits_fn = lambda xb: net.apply(params, xb)
    attack = jax.jit(lambda k: apgd(logits_fn, xj, yj, k, eps=0.3, steps=steps, loss="ce"))
    key = jax.random.PRNGKey(0)
    dev = dev or torch.device("cpu")
    tnet.to(dev)
    atk = torchattacks.APGD(
        tnet, norm="Linf", eps=0.3, steps=steps, n_restarts=1, loss="ce", seed=0
    )
    xt, yt = common.to_nchw(x).to(dev), torch.from_numpy(y).long().to(dev)
    return (lambda: attack(key)), (lambda: atk(xt, yt).sum().item())


def check(batch: int = 8, steps: int = 5):
    """Logits and ∂CE/∂x of both nets at the same weights, and both attacks' outputs."""
    import torch
    import torchattacks

    net, params, tnet, x, y = setup(batch)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def ce(xb):
        z = net.apply(params, xb)
        return jnp.sum(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, yj[:, None], -1)[:, 0])

    gj = jax.grad(ce)(xj)
    xt = common.to_nchw(x).requires_grad_()
    zt = tnet(xt)
    lt = torch.nn.functional.cross_entropy(zt, torch.from_numpy(y).long(), reduction="sum")
    (gt,) = torch.autograd.grad(lt, xt)
    adv_j = apgd(
        lambda xb: net.apply(params, xb), xj, yj, jax.random.PRNGKey(0), eps=0.3, steps=steps
    )
    adv_t = torchattacks.APGD(tnet, eps=0.3, steps=steps)(
        common.to_nchw(x), torch.from_numpy(y).long()
    )
    return dict(
        logits=(np.asarray(net.apply(params, xj)), zt.detach().numpy()),
        grad=(np.asarray(gj), np.transpose(gt.numpy(), (0, 2, 3, 1))),
        adv=(np.asarray(adv_j), np.transpose(adv_t.detach().numpy(), (0, 2, 3, 1))),
        x=x,
    )
