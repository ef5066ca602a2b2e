"""DEQ workloads: the training step, PGD-10 through the implicit backward, restarts.

Model: :class:`deqjax.models.MDEQClassifier` (``head_kind="gap"``) vs
:class:`benchmarks.torch_models.TorchMDEQ` (torchdeq), same weights. Solver
settings (:func:`benchmarks.common.deq_config` / ``torchdeq_kwargs``): Anderson m=5,
ridge 1e-4, exactly ``iters`` forward evaluations, implicit (IFT) backward by a
fixed-point adjoint of exactly ``iters`` steps (Bai, Kolter & Koltun 2019).

Per-iteration work (stated in the report): both sides evaluate the cell ``iters``
times forward (no graph) and do ``iters`` vector–Jacobian products backward.
Around that, torchdeq re-evaluates ``f`` once with a graph after the solve
(``new_z = f(z*)``) and once more in the backward (``f(h)`` to build the VJP), then
one VJP to the parameters; deqjax linearises ``f`` at ``z*`` once for the adjoint
(``jax.vjp``), once for the parameter VJP, and does one extra ``Jᵀu`` to report the
adjoint residual. Anderson: torchdeq's first two steps are plain fixed-point steps,
deqjax's first is (Anderson with one slot ≡ fixed-point step); both solve the same
bordered (m+1)×(m+1) system per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from deqjax.attacks import pgd


def _ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def contractive(params, inj_scale: float = 10.0, cell_scale: float = 0.1):
    """Rescale the weights so the cell is strongly contractive (a large injection
    dominates the GroupNorm input): both solvers then reach the same fixed point to
    float precision, so equal-work checks can compare values (tests only)."""
    p = jax.tree.map(lambda a: a, params)
    inj = p["params"]["injection"]["conv"]
    inj["kernel"] = inj["kernel"] * inj_scale
    cell = p["params"]["equilibrium"]["cell"]
    for name in ("conv_a", "conv_b"):
        cell[name]["kernel"] = cell[name]["kernel"] * cell_scale
    return p


def setup(
    batch: int, iters: int = 12, backward: str = "implicit", seed: int = 0, contract: bool = False
):
    """Both models with the same weights, data, and the pieces the workloads need."""
    model = common.mdeq(iters, backward)
    params = common.init_mdeq(model, seed=seed)
    if contract:
        params = contractive(params)
    tmodel = common_torch_mdeq(params, iters)
    x, y = common.mnist_like(batch, seed)
    return model, params, tmodel, x, y


def common_torch_mdeq(params, iters: int, unroll: bool = False):
    from benchmarks.torch_models import TorchMDEQ

    m = TorchMDEQ(deq_kwargs=common.torchdeq_kwargs(iters), unroll_iters=iters if unroll else 0)
    m.load_flax(jax.device_get(params))
    return m.train()  # torchdeq only builds the backward graph in training mode


def loss_and_grads(batch: int = 4, iters: int = 12, seed: int = 0, contract: bool = True):
    """(jax loss, jax grads pytree, torch loss, torch model) at the same weights."""
    import torch

    model, params, tmodel, x, y = setup(batch, iters, seed=seed, contract=contract)
    loss = lambda p: _ce(model.apply(p, jnp.asarray(x))[0], jnp.asarray(y))
    lj, gj = jax.value_and_grad(loss)(params)
    lt = torch.nn.functional.cross_entropy(tmodel(common.to_nchw(x)), torch.from_numpy(y).long())
    lt.backward()
    return float(lj), gj, float(lt.detach()), tmodel


def train_step(batch: int = 64, iters: int = 12, dev=None):
    """One Adam step on the mean cross-entropy (lr 1e-3) in each framework."""
    import torch

    model, params, tmodel, x, y = setup(batch, iters)
    opt = optax.adam(1e-3)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(lambda p: _ce(model.apply(p, xj)[0], yj))(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, l

    state = {"p": params, "s": opt.init(params)}

    def jax_fn():
        state["p"], state["s"], l = step(state["p"], state["s"])
        return l

    dev = dev or torch.device("cpu")
    tmodel.to(dev)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-3)
    xt, yt = common.to_nchw(x).to(dev), torch.from_numpy(y).long().to(dev)

    def torch_fn():
        topt.zero_grad(set_to_none=True)
        l = torch.nn.functional.cross_entropy(tmodel(xt), yt)
        l.backward()
        topt.step()
        return l.item()

    return jax_fn, torch_fn


def _torch_pgd(tmodel, steps=10, eps=0.3, alpha=0.03):
    import torchattacks

    atk = torchattacks.PGD(tmodel, eps=eps, alpha=alpha, steps=steps, random_start=True)
    atk.set_model_training_mode(model_training=True)  # keep torchdeq's IFT backward
    return atk


def pgd_attack(batch: int = 64, iters: int = 12, restarts: int = 1, dev=None):
    """PGD-10 (L∞, eps 0.3, step 0.03) through the implicit backward.

    deqjax: ``deqjax.attacks.pgd`` (``restarts`` vmapped). torch: ``torchattacks.PGD``
    (``restarts`` sequential calls, torchattacks has no PGD restarts)."""
    import torch

    model, params, tmodel, x, y = setup(batch, iters)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    logits_fn = lambda xb: model.apply(params, xb)[0]
    attack = jax.jit(
        lambda k: pgd(logits_fn, xj, yj, k, eps=0.3, steps=10, step_size=0.03, restarts=restarts)
    )
    key = jax.random.PRNGKey(0)
    jax_fn = lambda: attack(key)
    dev = dev or torch.device("cpu")
    tmodel.to(dev)
    atk = _torch_pgd(tmodel)
    xt, yt = common.to_nchw(x).to(dev), torch.from_numpy(y).long().to(dev)

    def torch_fn():
        return [atk(xt, yt) for _ in range(restarts)][-1].sum().item()

    return jax_fn, torch_fn


def input_gradients(batch: int = 4, iters: int = 12, seed: int = 0, contract: bool = True):
    """∂CE/∂x through each framework's implicit backward (NHWC numpy arrays)."""
    import torch

    model, params, tmodel, x, y = setup(batch, iters, seed=seed, contract=contract)
    gj = jax.grad(lambda xb: _ce(model.apply(params, xb)[0], jnp.asarray(y)))(jnp.asarray(x))
    xt = common.to_nchw(x).requires_grad_()
    lt = torch.nn.functional.cross_entropy(tmodel(xt), torch.from_numpy(y).long())
    (gt,) = torch.autograd.grad(lt, xt)
    return np.asarray(gj), np.transpose(gt.numpy(), (0, 2, 3, 1))
