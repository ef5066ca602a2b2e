"""The warm-started adjoint: ``deq_fixed_point(..., adjoint_init=u0)`` starts the
implicit backward's adjoint solve ``u = v + Jᵀu`` from ``u0`` where that beats the
default start, and returns the solved ``u`` as ``u0``'s gradient.

Checked against the dense solution ``(I − Jᵀ)⁻¹ v`` (float64), with the solve's step
count read from the backward probe; then threaded through an attack on a tiny MDEQ
(``warm_start_logits``'s ``(z*, u)`` state)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax.attacks._common import loss_grad_state
from deqjax.deq import DEQConfig, deq_fixed_point
from deqjax.solvers import SolverConfig
from tests.test_warm_start import config, robust, tiny  # noqa: F401  (fixture)

N = 40


def _problem():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = 0.9 * jax.random.normal(k1, (N, N)) / jnp.sqrt(N)
    return w, jax.random.normal(k2, (N,)), jax.random.normal(k3, (N,))


def _cell(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def _cfg(adjoint="anderson", backward="implicit"):
    return DEQConfig(
        forward=SolverConfig(method="anderson", tol=1e-12, max_iter=200),
        backward=backward,
        adjoint_solver=adjoint,
        adjoint_tol=1e-10,
        adjoint_max_iter=200,
    )


def _loss(w, x, c, adjoint_init, probe, cfg):
    z, _ = deq_fixed_point(
        _cell, jnp.zeros(N), (w, x), cfg, adjoint_init=adjoint_init, backward_probe=probe
    )
    return jnp.sum(c * z) + jnp.sum(z**2)


@functools.partial(jax.jit, static_argnums=(4,))
def _grads_jit(w, x, c, adjoint_init, cfg):
    argnums = (0, 1, 3, 4) if adjoint_init is not None else (0, 1, 4)
    return jax.grad(_loss, argnums=argnums)(w, x, c, adjoint_init, jnp.zeros(2), cfg)


def _grads(w, x, c, adjoint_init, cfg=None):
    """(dL/dw, dL/dx, solved adjoint or None, [adjoint residual, adjoint steps])."""
    g = _grads_jit(w, x, c, adjoint_init, cfg or _cfg())
    return g if adjoint_init is not None else (g[0], g[1], None, g[2])


@jax.jit
def _dense_adjoint(w, x, c):
    z = deq_fixed_point(_cell, jnp.zeros(N), (w, x), _cfg())[0]
    jac = jax.jacobian(lambda zz: _cell(zz, (w, x)))(z)
    return jnp.linalg.solve(jnp.eye(N) - jac.T, c + 2 * z)


@pytest.mark.parametrize("adjoint", ["anderson", "fixed_point", "dense"])
def test_the_adjoint_read_out_is_the_adjoint_solution(adjoint, x64):
    w, x, c = _problem()
    gw, gx, u, _ = _grads(w, x, c, jnp.zeros(N), _cfg(adjoint))
    np.testing.assert_allclose(u, _dense_adjoint(w, x, c), atol=1e-8)
    gw0, gx0, _, _ = _grads(w, x, c, None, _cfg(adjoint))
    np.testing.assert_allclose(gw, gw0, atol=1e-12)
    np.testing.assert_allclose(gx, gx0, atol=1e-12)


def test_an_exact_start_takes_one_step_a_garbage_one_falls_back(x64):
    w, x, c = _problem()
    *_, cold = _grads(w, x, c, None)
    assert cold[1] > 10, cold  # the cold solve does work (measured 42 steps)
    u = _dense_adjoint(w, x, c)
    gw, gx, _, exact = _grads(w, x, c, u)
    assert exact[1] <= 1 and exact[0] < 1e-10, exact
    # a start far worse than the default is not used: the cold solve's steps and result
    gw_g, gx_g, _, garbage = _grads(w, x, c, 1e3 * jnp.ones(N))
    assert garbage[1] == cold[1], (garbage, cold)
    gw0, gx0, _, _ = _grads(w, x, c, None)
    np.testing.assert_allclose(gw_g, gw0, atol=1e-12)
    np.testing.assert_allclose(gw, gw0, atol=1e-8)
    np.testing.assert_allclose(gx, gx0, atol=1e-8)


def test_the_previous_iterates_adjoint_saves_steps_at_a_nearby_input(x64):
    w, x, c = _problem()
    _, _, u_prev, _ = _grads(w, x, c, jnp.zeros(N))
    x2 = x + 0.01 * jax.random.normal(jax.random.PRNGKey(5), (N,))
    gw0, gx0, _, cold = _grads(w, x2, c, None)
    gw, gx, u, warm = _grads(w, x2, c, u_prev)
    assert warm[1] < cold[1], (warm, cold)  # measured 33 vs 43
    np.testing.assert_allclose(u, _dense_adjoint(w, x2, c), atol=1e-8)
    np.testing.assert_allclose(gx, gx0, atol=1e-8)


def test_pytree_state_and_vmap(x64):
    w, x, c = _problem()
    f = lambda z, a: {"p": jnp.tanh(a[0] @ z["p"] + a[1]), "q": 0.5 * z["q"] + 1.0}

    def loss(x, adj):
        z0 = {"p": jnp.zeros(N), "q": jnp.zeros(3)}
        z, _ = deq_fixed_point(f, z0, (w, x), _cfg(), adjoint_init=adj)
        return jnp.sum(c * z["p"]) + jnp.sum(z["p"] ** 2) + jnp.sum(z["q"])

    adj0 = {"p": jnp.zeros((2, N)), "q": jnp.zeros((2, 3))}
    xs = jnp.stack([x, -x])
    u = jax.jit(jax.vmap(jax.grad(loss, argnums=1)))(xs, adj0)  # (jit: compile time)
    np.testing.assert_allclose(u["p"][0], _dense_adjoint(w, x, c), atol=1e-8)
    np.testing.assert_allclose(u["q"], 2.0, atol=1e-8)  # u = 1 + 0.5 u


def test_adjoint_init_errors():
    w, x, c = _problem()
    with pytest.raises(ValueError, match="backward='phantom' runs none"):
        _loss(w, x, c, jnp.zeros(N), None, _cfg(backward="phantom"))
    with pytest.raises(ValueError, match="structure and shapes"):
        _loss(w, x, c, jnp.zeros(N + 1), None, _cfg())


def test_attacks_thread_the_adjoint_and_keep_their_result(tiny):  # noqa: F811
    """On the tiny MDEQ: the attack's state carries the solved adjoint, which restarts
    the same point's adjoint solve at its solution; PGD with and without the warm
    adjoint gives the same robust accuracy and nearly the same points."""
    from deqjax.models import warm_start_logits

    model, v, x, y = tiny
    cfg = config(1e-4)
    ws = warm_start_logits(model, v, config=cfg, warm_adjoint=True)
    z0, u0 = ws.init(x)
    assert not np.any(np.asarray(u0))
    _, _, _, (z1, u1) = loss_grad_state(ws, A.ce_loss)(x, y, (z0, u0))
    assert float(jnp.max(jnp.abs(u1))) > 0  # the solved adjoint, threaded

    def head_of_equilibrium(m, x, probe, adj):
        u = m.injection(x)
        return m.head(m.equilibrium(u, backward_probe=probe, adjoint_init=adj, config=cfg)[0])

    @jax.jit  # (one compile for both starts)
    def adjoint_steps(adj):
        def f(probe):
            logits = model.apply(v, x, probe, adj, method=head_of_equilibrium)
            return jnp.sum(A.ce_loss(logits, y))

        return jax.grad(f)(jnp.zeros((x.shape[0], 2)))[:, 1]

    cold, warm = np.asarray(adjoint_steps(jnp.zeros_like(u1))), np.asarray(adjoint_steps(u1))
    assert cold.mean() > 3 and warm.max() <= 1, (cold, warm)

    plain = warm_start_logits(model, v, config=cfg)  # the default: z* only
    assert plain.merge_gradient is None
    key = jax.random.PRNGKey(2)
    x_warm = A.pgd(ws, x, y, key, eps=0.3, steps=20)
    x_plain = A.pgd(plain, x, y, key, eps=0.3, steps=20)
    r_warm, r_plain = robust(model, v, cfg, y, x_warm, x_plain)  # (one compiled forward)
    assert r_warm == r_plain
    assert float(jnp.mean(jnp.abs(x_warm - x_plain) > 1e-4)) < 0.1
