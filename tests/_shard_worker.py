"""Run in a subprocess with 2 forced CPU devices (tests/test_transforms.py): every
solver and backward mode inside jax.shard_map (default check_vma=True), value and
gradient, against the same computation without shard_map. Prints one JSON line."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deqjax.deq import DEQConfig, deq_fixed_point
from deqjax.solvers import SolverConfig

jax.config.update("jax_enable_x64", True)
N = 6
A = 0.7 * jax.random.normal(jax.random.PRNGKey(0), (N, N)) / jnp.sqrt(N)
BS = jax.random.normal(jax.random.PRNGKey(1), (4, N))


def cell(z, args):
    return jnp.tanh(args[0] @ z + args[1])


def modes(method):
    """Every solver's while loop (forward and adjoint: implicit) and scan (unroll);
    the solver-independent wrappers (probe, phantom, SHINE) once each."""
    fwd = SolverConfig(method=method, max_iter=60, tol=1e-10)
    kw = dict(forward=fwd, adjoint_tol=1e-10, adjoint_max_iter=60, adjoint_solver=method)
    out = {
        "implicit": (DEQConfig(**kw), False),
        "unroll": (DEQConfig(backward="unroll", **kw), False),
    }
    if method == "anderson":
        out["implicit_probe"] = (DEQConfig(**kw), True)
        out["phantom"] = (DEQConfig(backward="phantom", **kw), False)
    if method == "broyden":
        out["shine_probe"] = (DEQConfig(backward="shine", **kw), True)
        out["shine_refine"] = (DEQConfig(backward="shine_refine", **kw), False)
    return out


def losses(a, bs, method):
    """Per mode: the batch loss, the examples' steps and the probes' gradients."""
    out = {}
    for name, (cfg, probe) in modes(method).items():

        def one(b, p, cfg=cfg):
            z, st = deq_fixed_point(cell, jnp.zeros(N), (a, b), cfg, backward_probe=p)
            return jnp.sum(jnp.sin(z)), st.steps

        probes = jnp.zeros((bs.shape[0], 2)) if probe else None
        vals, steps = jax.vmap(one)(bs, probes)
        out[name] = (jnp.sum(vals), steps)
    return out


def check(method):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))

    def total(a, bs, sharded):
        out = losses(a, bs, method)
        loss = sum(v for v, _ in out.values())
        if sharded:
            loss = jax.lax.psum(loss, "x")
        return loss, {k: s for k, (_, s) in out.items()}

    vg = lambda sharded: jax.value_and_grad(
        lambda a, bs: total(a, bs, sharded), argnums=(0, 1), has_aux=True
    )
    (l0, s0), g0 = jax.jit(vg(False))(A, BS)
    specs = ((P(), P("x")), (P(), P("x")))
    f = jax.shard_map(vg(True), mesh=mesh, in_specs=(P(), P("x")), out_specs=specs)
    (l1, s1), g1 = jax.jit(f)(A, BS)
    out = {}
    if method == "anderson":  # forward mode inside shard_map too (the tangent solve)
        cfg = modes(method)["implicit"][0]
        z_of_b = lambda b: deq_fixed_point(cell, jnp.zeros(N), (A, b), cfg)[0]
        jac = jax.vmap(jax.jacfwd(z_of_b))
        jac0 = jac(BS)
        jac1 = jax.jit(jax.shard_map(jac, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(BS)
        out = {"jacfwd": float(jnp.abs(jac1 - jac0).max()), "jac_scale": float(jnp.abs(jac0).max())}
    return out | {
        "devices": len(jax.devices()),
        "loss": abs(float(l1 - l0)),
        "grad_a": float(jnp.abs(g1[0] - g0[0]).max()),
        "grad_b": float(jnp.abs(g1[1] - g0[1]).max()),
        "grad_scale": float(jnp.abs(g0[1]).max()),
        "steps_equal": all(np.array_equal(s0[k], s1[k]) for k in s0),
        "modes": sorted(s0),
    }


if __name__ == "__main__":
    print(json.dumps({m: check(m) for m in sys.argv[1:]}))
