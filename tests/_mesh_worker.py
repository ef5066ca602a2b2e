"""Run in a subprocess with N forced CPU devices (tests/test_meshes.py): the DEQ core
on Explicit-axis and Auto-axis meshes (``jax.make_mesh`` + ``jax.set_mesh``, the batch
sharded over ``data``) against the same computation without a mesh — a vmapped
``deq_fixed_point`` (value and gradient, every solver) and the Flax MDEQ classifier
(apply and parameter gradient). Prints one JSON line of largest differences."""

import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deqjax import DEQConfig, SolverConfig, deq_fixed_point
from deqjax.models import MDEQClassifier
from deqjax.solvers import SOLVERS

N = 6
A = 0.7 * jax.random.normal(jax.random.PRNGKey(0), (N, N)) / jnp.sqrt(N)


def deq_loss(method):
    # an iterative adjoint on and off the mesh ("auto" is dense off a mesh only)
    cfg = DEQConfig(
        forward=SolverConfig(method=method, max_iter=60, tol=1e-5), adjoint_solver="anderson"
    )

    def loss(a, bs):
        z = jax.vmap(
            lambda b: deq_fixed_point(
                lambda z, p: jnp.tanh(p[0] @ z + p[1]), jnp.zeros(N), (a, b), cfg
            )[0]
        )(bs)
        return jnp.sum(jnp.sin(z))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def mdeq():
    cfg = DEQConfig(forward=SolverConfig(max_iter=15, tol=1e-3), adjoint_solver="anderson")
    model = MDEQClassifier(width=8, inner=8, groups=4, deq=cfg)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2 * len(jax.devices()), 8, 8, 1))
    params = model.init(jax.random.PRNGKey(2), x)

    def loss(params, x):
        logits, _ = model.apply(params, x)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    return jax.jit(jax.value_and_grad(loss)), params, x


def maxdiff(a, b):
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def main():
    n = len(jax.devices())
    bs = jax.random.normal(jax.random.PRNGKey(1), (2 * n, N))
    fn_mdeq, params, x = mdeq()
    ref = {m: deq_loss(m)(A, bs) for m in SOLVERS}
    ref_mdeq = fn_mdeq(params, x)
    out = {"devices": n}
    for kind in ("explicit", "auto"):
        mesh = jax.make_mesh(
            (n,),
            ("data",),
            axis_types=(AxisType.Explicit if kind == "explicit" else AxisType.Auto,),
        )
        with jax.set_mesh(mesh):
            shard = lambda t, mesh=mesh: jax.device_put(t, NamedSharding(mesh, P("data")))
            for m in SOLVERS:
                out[f"{kind}_{m}"] = maxdiff(deq_loss(m)(A, shard(bs)), ref[m])
            got = fn_mdeq(params, shard(x))
            out[f"{kind}_mdeq"] = maxdiff(got, ref_mdeq)
            out[f"{kind}_mdeq_sharded"] = str(
                got[1]["params"]["injection"]["conv"]["kernel"].sharding.spec
            )
    out["mdeq_grad_scale"] = float(max(jnp.abs(g).max() for g in jax.tree.leaves(ref_mdeq[1])))
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
