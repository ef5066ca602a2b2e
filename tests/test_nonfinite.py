"""Non-finite inputs through every backward mode of a Broyden-solved DEQ, SHINE's
included: a NaN in one example's ``args`` (or an Inf in its ``z0``) makes that
example's state all NaN, not converged, and its loss and gradient NaN, while the other
examples' values and gradients are those of a batch without it (deqjax.deq,
"Non-finite values"). ``tests/test_deq.py`` covers the Anderson-solved modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.deq import DEQConfig, deq_fixed_point
from deqjax.solvers import SolverConfig

N = 6


def _problem():
    a = jax.random.normal(jax.random.PRNGKey(0), (N, N))
    a = 0.7 * a / jnp.linalg.norm(a, 2)  # a contraction: the solve converges
    b = jax.random.normal(jax.random.PRNGKey(1), (N,))
    return a, b


def _cell(z, args):
    a, b = args
    return jnp.tanh(a @ z + b)


BACKWARDS = ("shine_refine", "shine", "implicit", "phantom", "unroll")


@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_non_finite_args_give_nan_for_that_example_only_broyden(backward, probe, x64):
    cfg = DEQConfig(
        forward=SolverConfig(method="broyden", max_iter=100, tol=1e-10),
        backward=backward,
        adjoint_tol=1e-12,
        adjoint_max_iter=100,
    )
    a, b = _problem()
    bs = jnp.stack([b, b.at[2].set(jnp.nan), b])  # example 1: a NaN in its args
    z0s = jnp.zeros((3, N)).at[2, 1].set(jnp.inf)  # example 2: an Inf in its z0

    def one(a, b, z0):
        p = jnp.zeros(2) if probe else None
        z, st = deq_fixed_point(_cell, z0, (a, b), cfg, backward_probe=p)
        return jnp.sum(jnp.sin(z)), (z, st)

    (vals, (zs, st)), grads = jax.vmap(jax.value_and_grad(one, has_aux=True), (None, 0, 0))(
        a, bs, z0s
    )
    (v0, (z_ref, st_ref)), g_ref = jax.value_and_grad(one, has_aux=True)(a, b, jnp.zeros(N))
    # the clean example: as if alone (SHINE's gradient carries the rounding of its
    # secant pairs, Δz ~ tol, between batched and single matmuls)
    rtol = 1e-5 if backward.startswith("shine") else 1e-10
    np.testing.assert_allclose(zs[0], z_ref, rtol=1e-12)
    np.testing.assert_allclose(vals[0], v0, rtol=1e-12)
    np.testing.assert_allclose(grads[0], g_ref, rtol=rtol, atol=1e-14)
    assert bool(st.converged[0]) and bool(st_ref.converged)
    assert bool(jnp.all(jnp.isfinite(grads[0])))
    for i in (1, 2):  # the non-finite examples: NaN state, loss and gradient
        assert bool(jnp.all(jnp.isnan(zs[i]))), (i, zs[i])
        assert not bool(st.converged[i]), i
        assert bool(jnp.isnan(vals[i])), i
        assert bool(jnp.all(jnp.isnan(grads[i]))), (i, grads[i])
