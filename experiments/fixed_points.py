"""Fixed-point reuse in training (``config.train.reuse_fixed_points``).

A DEQ's training solve of example ``j`` starts from ``j``'s equilibrium of its previous
visit (last epoch) instead of zero. The store is one array of per-example states,
``(N, *state_shape)`` for ``N`` training examples (``(K, N, ...)`` with ``K`` seeds),
zeros at first, so the first epoch starts every solve from zero; after each step the
batch's new equilibria are written back at their dataset indices. It is sharded over
the data axis like the batch (rows padded to a multiple of the data-parallel devices)
and checkpointed with the train state (the ``fixed_points`` item).

Memory: ``N × prod(state_shape) × itemsize`` per seed; ``deq_mnist`` (MDEQ width 32,
state 14×14×32 float32 = 25 KB per example) on mnist_5k's 5,000 training images:
125 MB per seed.

A start from the last epoch can be stale (the weights moved since). With
``train.reuse_reset = "residual"`` an example whose stored start is worse than zero —
``‖f(z_prev) − z_prev‖ > ‖f(0) − 0‖`` at the current weights — starts from zero
(:class:`deqjax.models.DEQ`'s ``reset_stale``; two extra cell evaluations per example);
``"none"`` always uses the stored start. docs/howto/seeds_and_reuse.md has the
measurements behind the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import parallel

RESETS = ("residual", "none")


def enabled(config) -> bool:
    return bool(config.train.get("reuse_fixed_points", False))


def reset_stale(config) -> bool:
    """Whether stale starts are reset (``train.reuse_reset``)."""
    mode = config.train.get("reuse_reset", "residual")
    if mode not in RESETS:
        raise ValueError(f"unknown train.reuse_reset {mode!r}; choose one of {RESETS}")
    return mode == "residual"


def check_supported(spec, config) -> None:
    """Raise unless reusing fixed points leaves training's loss and gradient those of the
    equilibrium: a DEQ classifier with an equilibrium, a tolerance-stopped forward, an
    implicit or phantom gradient, and no random intermediate states."""
    module = spec.module
    if not (spec.is_deq and hasattr(module, "cold_state")):
        raise ValueError(
            f"train.reuse_fixed_points starts DEQ solves from stored equilibria; model "
            f"{config.model.name!r} has no warm-startable DEQ state (use mdeq)"
        )
    deq = config.deq
    if deq.backward not in ("implicit", "phantom"):
        raise ValueError(
            f"train.reuse_fixed_points needs deq.backward implicit or phantom (the "
            f"gradient then depends only on the solution); got {deq.backward!r}"
        )
    if not deq.tol > 0:
        raise ValueError(
            "train.reuse_fixed_points saves solver steps only when the forward stops at a "
            "tolerance; set deq.tol > 0 (e.g. --config.deq.tol=1e-3)"
        )
    if int(deq.get("random_states_max", 0)):
        raise ValueError(
            "train.reuse_fixed_points cannot be combined with deq.random_states_max > 0 "
            "(random intermediate states run a drawn number of steps from z0 = 0); set one off"
        )


def state_struct(spec, image_shape) -> jax.ShapeDtypeStruct:
    """One example's DEQ state (shape and dtype), without computing anything."""
    module = spec.module
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
    z = jax.eval_shape(lambda v, x: module.apply(v, x, method="cold_state"), variables, x)
    return jax.ShapeDtypeStruct(z.shape[1:], z.dtype)


def padded_rows(n: int, mesh) -> int:
    d = parallel.data_size(mesh)
    return -(-n // d) * d


def store_sharding(mesh, seeds: int = 1) -> NamedSharding:
    """Rows over the data axis (after an unsharded seed axis when ``seeds > 1``)."""
    return NamedSharding(mesh, P(None, parallel.DATA) if seeds > 1 else P(parallel.DATA))


def new_store(spec, image_shape, n: int, mesh, seeds: int = 1):
    """The zero store (``(N_pad, ...)``, or ``(K, N_pad, ...)``), placed sharded."""
    z = state_struct(spec, image_shape)
    shape = ((seeds,) if seeds > 1 else ()) + (padded_rows(n, mesh),) + z.shape
    sharding = store_sharding(mesh, seeds)
    return jax.jit(lambda: jnp.zeros(shape, z.dtype), out_shardings=sharding)()


def nbytes(spec, image_shape, n: int) -> int:
    """Bytes of one seed's store of ``n`` examples."""
    z = state_struct(spec, image_shape)
    return int(n * np.prod(z.shape) * np.dtype(z.dtype).itemsize)


def sown_state(fixed) -> tuple:
    """``(z, reset or None)`` from the ``"fixed_points"`` collection a DEQ sowed."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(fixed)[0]:
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        found[name] = value  # the last solve's (a training forward runs one)
    return found["z"], found.get("reset")
