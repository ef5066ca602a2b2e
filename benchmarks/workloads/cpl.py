"""CPL training step (Meunier et al. 2022), batch 128, MNIST shapes.

Four conv CPLs (input padded to 16 channels, inner 32 channels, 28×28, zero SAME
padding) → 1-Lipschitz sum-pool 4×4 (/4) → flatten (784) → two dense CPLs of width
784 → truncation to 10 logits → multi-class hinge loss (margin 0.7) → Adam. One
power iteration per layer per step on a persistent vector. deqjax:
:class:`deqjax.cpl.CPLNet`; torch: :class:`benchmarks.torch_models.TorchCPLNet`,
same weights and power-iteration vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from deqjax.cpl import CPLNet, multiclass_hinge_loss

MARGIN = 0.7


def setup(batch: int, seed: int = 0):
    from benchmarks.torch_models import TorchCPLNet

    net = CPLNet(
        depth=4,
        depth_linear=2,
        conv_channels=16,
        conv_inner=32,
        linear_width=784,
        num_classes=10,
        last_layer="truncate",
        pool=4,
    )
    x, y = common.mnist_like(batch, seed)
    variables = net.init(jax.random.PRNGKey(seed), jnp.asarray(x))
    tnet = TorchCPLNet().load_flax(jax.device_get(variables)).train()
    return net, variables, tnet, x, y


def _loss(net, params, pstate, x, y):
    logits, new = net.apply(
        {"params": params, "power_iteration": pstate}, x, mutable=["power_iteration"]
    )
    return jnp.mean(multiclass_hinge_loss(logits, y, MARGIN)), new["power_iteration"]


def _torch_loss(tnet, xt, yt):
    import torch

    return torch.nn.functional.multi_margin_loss(tnet(xt), yt, margin=MARGIN)


def workload(batch: int = 128, dev=None):
    import torch

    net, variables, tnet, x, y = setup(batch)
    opt = optax.adam(1e-3)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def step(p, ps, s):
        (l, ps), g = jax.value_and_grad(lambda p: _loss(net, p, ps, xj, yj), has_aux=True)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), ps, s, l

    st = {"p": variables["params"], "ps": variables["power_iteration"]}
    st["s"] = opt.init(st["p"])

    def jax_fn():
        st["p"], st["ps"], st["s"], l = step(st["p"], st["ps"], st["s"])
        return l

    dev = dev or torch.device("cpu")
    tnet.to(dev)
    topt = torch.optim.Adam(tnet.parameters(), lr=1e-3)
    xt, yt = common.to_nchw(x).to(dev), torch.from_numpy(y).long().to(dev)

    def torch_fn():
        topt.zero_grad(set_to_none=True)
        l = _torch_loss(tnet, xt, yt)
        l.backward()
        topt.step()
        return l.item()

    return jax_fn, torch_fn


def check(batch: int = 4):
    """Loss and parameter gradients of one step in each framework, same weights."""
    import torch

    net, variables, tnet, x, y = setup(batch)
    (lj, _), gj = jax.value_and_grad(
        lambda p: _loss(net, p, variables["power_iteration"], jnp.asarray(x), jnp.asarray(y)),
        has_aux=True,
    )(variables["params"])
    lt = _torch_loss(tnet, common.to_nchw(x), torch.from_numpy(y).long())
    lt.backward()
    pairs = {}
    for i, layer in enumerate(tnet.convs):
        pairs[f"convs_{i}"] = (
            np.transpose(np.asarray(gj[f"convs_{i}"]["kernel"]), (3, 2, 0, 1)),
            layer.kernel.grad.numpy(),
        )
    for i, layer in enumerate(tnet.denses):
        pairs[f"denses_{i}"] = (np.asarray(gj[f"denses_{i}"]["kernel"]), layer.weight.grad.numpy())
    return float(lj), float(lt.detach()), pairs
