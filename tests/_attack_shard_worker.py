"""Run in a subprocess with 2 forced CPU devices (tests/test_attack_transforms.py): every
attack and the ensemble on a batch sharded over a mesh axis, against the same program
unsharded. Modes: an Explicit-axis mesh (``jax.set_mesh``) under jit, an Auto-axis mesh
under jit (PGD and the compacting ensemble), and ``jax.shard_map`` with its default
``check_vma=True`` (batch and per-example keys sharded). Prints one JSON line: per mode
and output, the largest difference to the unsharded run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deqjax import attacks as A

B, C = 8, 5
rng = np.random.default_rng(0)
W = jnp.asarray(rng.normal(size=(16, C)), jnp.float32)
X = jnp.asarray(rng.uniform(0.1, 0.9, size=(B, 4, 4, 1)), jnp.float32)
Y = jnp.argmax(X.reshape(B, -1) @ W, -1)  # clean accuracy 1
KEY = jax.random.PRNGKey(0)
KEYS = A.example_keys(KEY, B)
EPS = 0.2
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})


def model(x):
    return x.reshape(x.shape[0], 16) @ W


ATTACKS = {
    "fgsm": lambda x, y, k: A.fgsm(model, x, y, eps=EPS),
    "pgd": lambda x, y, k: A.pgd(model, x, y, k, eps=EPS, steps=2, restarts=2),
    "apgd": lambda x, y, k: A.apgd(model, x, y, k, eps=EPS, steps=2, loss="dlr"),
    "apgd_t": lambda x, y, k: A.apgd_targeted(model, x, y, k, eps=EPS, steps=2, n_target_classes=2),
    "fab": lambda x, y, k: A.fab(model, x, y, k, eps=EPS, steps=2, restarts=2),
    "fab_t": lambda x, y, k: A.fab_targeted(model, x, y, k, eps=EPS, steps=2, n_target_classes=2),
    "square": lambda x, y, k: A.square(model, x, y, k, eps=1.0, norm="l2", n_queries=3),
    "ensemble": lambda x, y, k: (
        A.evaluate_ensemble(model, x, y, k, eps=EPS, attacks=["fgsm", "square"], n_queries=3).x_adv
    ),
    "ensemble_compact": lambda x, y, k: (
        A.evaluate_ensemble(
            model,
            x,
            y,
            k,
            eps=EPS,
            attacks=["fab-t"],
            n_iter=2,
            n_target_classes=2,
            compact=True,
            bucket_size=4,
        ).robust
    ),
    # restarts from ONE key (not under shard_map, where one key draws per shard)
    "pgd_one_key": lambda x, y, k: A.pgd(model, x, y, KEY, eps=EPS, steps=2, restarts=2),
}


def run_all(x, y, keys, names=tuple(ATTACKS)):
    """The attacks ``names`` (tiny budgets) on (x, y) with per-example ``keys``."""
    return {n: ATTACKS[n](x, y, keys) for n in names}


def diffs(out, ref):
    return {
        k: float(np.max(np.abs(np.asarray(out[k], np.float32) - np.asarray(ref[k], np.float32))))
        for k in ref
        if k in out
    }


def main():
    assert len(jax.devices()) == 2
    ref = jax.jit(run_all, **FAST)(X, Y, KEYS)
    res = {}

    mesh = jax.make_mesh((2,), ("data",))  # Explicit axes (the default)
    with jax.set_mesh(mesh):
        xs, ys, ks = (jax.device_put(a, P("data")) for a in (X, Y, KEYS))
        out = jax.jit(run_all, **FAST)(xs, ys, ks)
        res["explicit"] = diffs(out, ref)
        res["explicit_batch_sharded"] = jax.typeof(out["pgd"]).sharding.spec[0] == "data"

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        xs, ys, ks = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (X, Y, KEYS))
        auto = functools.partial(run_all, names=("pgd", "ensemble_compact"))
        res["auto"] = diffs(jax.jit(auto, **FAST)(xs, ys, ks), ref)

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    f = jax.shard_map(
        lambda x, y, k: run_all(x, y, k, tuple(ATTACKS)[:-1]),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )  # check_vma=True by default
    res["shard_map"] = diffs(jax.jit(f, **FAST)(X, Y, KEYS), ref)
    res["broken"] = int(np.sum(np.asarray(jnp.argmax(model(ref["pgd"]), -1) != Y)))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
