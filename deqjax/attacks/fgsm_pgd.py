"""FGSM and PGD (L∞ / L2) as pure, jit-able functions.

* FGSM (Goodfellow et al., "Explaining and harnessing adversarial examples",
  ICLR 2015): x_adv = Π(x + eps · s(∇ₓ ℓ(f(x), y))), s = sign for L∞ and
  g/‖g‖₂ for L2 (the "fast gradient method").
* PGD (Madry et al., "Towards deep learning models resistant to adversarial
  attacks", ICLR 2018): from a uniform random start in the ball,
  x_{k+1} = Π_{B_eps(x) ∩ [0,1]}(x_k + α_k · s(∇ₓ ℓ(f(x_k), y))),
  with step-size schedule α_k (constant, cosine, or step decay ×0.1 at 50 % and
  75 % of the steps **(choice)**). ℓ is CE or DLR (Croce & Hein 2020). The
  per-example best iterate is returned (misclassified with the lowest margin if
  any, else the highest attack loss) **(choice)**, so more steps never hurt.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.restarts import run_with_restarts

SCHEDULES = ("constant", "cosine", "step")


@C.attack_api(needs_key=False)
def fgsm(logits_fn, x, y, key=None, *, eps, norm="linf", loss="ce"):
    """Fast gradient (sign) method; one step of size ``eps``. ``key`` is unused
    (kept for the common attack signature)."""
    del key
    nc = C.num_classes(logits_fn, x)
    _, _, g = C.loss_and_grad(logits_fn, C.get_loss(loss, nc))(x, y)
    return C.project(x + eps * C.ascent_direction(g, norm), x, eps, norm)


def step_sizes(step_size, steps, schedule):
    """Static per-iteration step sizes α_k, k = 0 … steps−1, as a (steps,) array."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}; use one of {SCHEDULES}.")
    k = jnp.arange(steps, dtype=jnp.float32)
    if schedule == "constant":
        f = jnp.ones_like(k)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + jnp.cos(math.pi * k / steps))
    else:
        f = jnp.where(k >= 0.75 * steps, 0.01, jnp.where(k >= 0.5 * steps, 0.1, 1.0))
    return step_size * f


def _pgd_single(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm,
    steps,
    step_size,
    schedule,
    rand_init,
    loss,
    return_trace,
    select_fn=None,
):
    nc = C.num_classes(logits_fn, x)
    steps = C.check_positive_int("steps", steps)
    loss_fn = C.get_loss(loss, nc)
    lg = C.loss_grad_state(logits_fn, loss_fn)
    if step_size is None:
        step_size = 2.5 * eps / steps  # Madry et al.: 2.5·eps/steps
    alphas = step_sizes(step_size, steps, schedule).astype(x.dtype)

    x0 = C.random_start(key, x, eps, norm) if rand_init else x

    def keep_best(xn, fn, zn, bx, bf, bm):
        mn = C.margin(zn, y)
        # best: misclassified with lowest margin, else highest attack loss
        better = jnp.where((mn < 0) | (bm < 0), mn < bm, fn > bf)
        return C.bwhere(better, xn, bx), jnp.where(better, fn, bf), jnp.where(better, mn, bm)

    def selected(xk, fk, zk):
        """Loss and logits that choose the returned iterate (select_fn's, if given)."""
        if select_fn is None:
            return fk, zk
        zs = select_fn(lax.stop_gradient(xk))
        return loss_fn(zs, y), zs

    def body(carry, alpha):
        # the gradient at x_k moves to x_{k+1}; x_k's loss/logits update the best point;
        # st: the solver state a WarmStartLogits starts x_k's solve from (else ())
        xk, bx, bf, bm, st = carry
        fk, zk, gk, st = lg(xk, y, st)
        bx, bf, bm = keep_best(xk, *selected(xk, fk, zk), bx, bf, bm)
        xn = C.project(xk + alpha * C.ascent_direction(gk, norm), x, eps, norm)
        return (xn, bx, bf, bm, st), fk

    init_loss = C.batch_full(x, -jnp.inf, x.dtype)
    init = (x0, x0, init_loss, C.batch_full(x, jnp.inf, x.dtype), C.initial_state(logits_fn, x0))
    (x_last, bx, bf, bm, st), trace = C.scan(body, init, alphas)
    # the last iterate needs its loss and logits only: no unused final gradient
    z_last, _ = C.logits_and_state(logits_fn, x_last, st)
    f_last = loss_fn(z_last, y)
    bx, _, _ = keep_best(x_last, *selected(x_last, f_last, z_last), bx, bf, bm)
    trace = jnp.concatenate([trace, f_last[None]], axis=0)
    if return_trace:
        return bx, trace
    return bx


@C.attack_api(nonnegative=("step_size",))
def pgd(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    steps=10,
    step_size=None,
    schedule="constant",
    rand_init=True,
    loss="ce",
    restarts=1,
    return_trace=False,
    select_fn=None,
):
    """Projected gradient descent attack (Madry et al. 2018).

    Args:
      logits_fn: ``x (B, ...) -> logits (B, C)``, any JAX function; a
        :class:`~deqjax.attacks.WarmStartLogits` starts each iterate's solve from the
        previous iterate's solution.
      x: inputs in [0, 1], shape (B, ...). y: int labels (B,).
      key: PRNG key for the random start (and restarts).
      eps: radius. norm: "linf" or "l2". steps: number of gradient steps (static).
      step_size: α >= 0 (default 2.5·eps/steps). schedule: "constant" | "cosine" | "step".
      rand_init: uniform random start in the ball. loss: "ce" | "dlr".
      restarts: independent vmapped restarts, per-example worst case kept.
      return_trace: also return the attack loss at every iterate, shape (steps+1, B).
      select_fn: logits function that chooses the returned iterate and restart (default
        ``logits_fn``). The iterates depend on ``logits_fn`` only, so an attack guided by
        a surrogate keeps the iterate best for the model ``select_fn`` computes
        (:func:`deqjax.bpda.guided`); one extra forward of ``select_fn`` per iterate.

    Returns:
      x_adv (B, ...) in [0, 1] with ‖x_adv − x‖ ≤ eps, in x's dtype (and the trace if
      asked).
    """
    return run_with_restarts(
        _pgd_single,
        restarts,
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step_size,
        schedule=schedule,
        rand_init=rand_init,
        loss=loss,
        return_trace=return_trace,
        select_fn=select_fn,
    )
