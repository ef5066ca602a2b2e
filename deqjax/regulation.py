"""Regulating the neural dynamics of DEQs: random intermediate states (training) and
input entropy reduction (inference).

Yang et al. 2023, "Improving Adversarial Robustness of Deep Equilibrium Models with
Explicit Regulations Along the Neural Dynamics" (ICML; docs/methods/regulation.md).

**Random intermediate states.** At every training forward draw ``n ~ U{1, …, n_max}``,
run exactly n solver steps and use ``z_n`` with the phantom gradient instead of the
final state: :class:`RandomSteps`, passed as ``random_steps=`` to
:class:`deqjax.models.DEQ` (one draw per batch).

Input entropy reduction splits the solver budget into ``R`` rounds of ``T_f`` steps.
Between rounds the input is moved to lower the prediction entropy
``H(x′) = −Σ_c p_c log p_c``, ``p = softmax(h(z(x′)))``, by sign-gradient steps

    x′ ← clip_[0,1](Π_{B∞(x, ε)}(x′ − η · sign(∇_{x′} H(x′))))

and the solve then continues from the current state with the new input. Choices
(documented): ``z(x′)`` inside the entropy is ``phantom_steps`` damped cell steps
from the stopped current state (the phantom gradient of training); every round
starts a fresh solver from the current state, so Anderson's history and Broyden's
inverse-Jacobian estimate are restarted (no Broyden correction); the updates happen
between rounds and the last round's state is classified.

The function is pure in its callables (closures over model variables), so the
defended prediction is an ordinary JAX function: jit-able, and differentiable end to
end for the adaptive attack (``sign`` has zero derivative, so the exact gradient only
flows through the projection and the final solve; BPDA — the identity in place of the
input purification — is :func:`deqjax.bpda.bpda_purified`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class RandomSteps(NamedTuple):
    """One draw of the random intermediate state for a batch: ``key`` (a PRNG key) and
    ``max_steps`` = n_max (a static int >= 1)."""

    key: jax.Array
    max_steps: int

    def draw(self) -> jax.Array:
        """``n ~ U{1, …, max_steps}`` (an int32 scalar)."""
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(
                f"random intermediate states need max_steps >= 1 (an int), got {self.max_steps!r}"
            )
        return jax.random.randint(self.key, (), 1, self.max_steps + 1)


def prediction_entropy(logits: jax.Array) -> jax.Array:
    """Per-example entropy ``−Σ p log p`` of ``softmax(logits)``."""
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


def entropy_reduction(
    inject: Callable,
    solve_from: Callable,
    phantom_from: Callable,
    head: Callable,
    x: jax.Array,
    *,
    rounds: int = 3,
    steps: int = 10,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
):
    """Defended logits and purified inputs of a batch.

    Args:
      inject: ``x -> u`` (batched input injection).
      solve_from: ``(u, z0) -> z`` — ``T_f`` solver steps from ``z0`` (batched).
      phantom_from: ``(u, z) -> z′`` — a few damped cell steps from ``stop_gradient(z)``
        (the differentiable state used inside the entropy).
      head: ``z -> logits``.
      x: inputs in [0, 1].
      rounds: R; steps: sign-gradient steps between rounds; eps: the L∞ radius around
        ``x`` the purified input stays in; step_size: η.

    Returns:
      ``(logits, x_purified)``.
    """
    if rounds < 1 or steps < 0:
        raise ValueError(f"need rounds >= 1 and steps >= 0, got rounds={rounds}, steps={steps}")
    x = jnp.asarray(x)
    x_p = x
    z = jnp.zeros_like(inject(x))
    for r in range(int(rounds)):
        z = solve_from(inject(x_p), z)
        if r == rounds - 1:
            break
        z_round = lax.stop_gradient(z)

        def total_entropy(xp, z_round=z_round):
            return jnp.sum(prediction_entropy(head(phantom_from(inject(xp), z_round))))

        def update(_, xp):
            g = jax.grad(total_entropy)(xp)
            xp = xp - step_size * jnp.sign(g)
            return jnp.clip(jnp.clip(xp, x - eps, x + eps), 0.0, 1.0)

        x_p = lax.fori_loop(0, int(steps), update, x_p)
    return head(z), x_p
