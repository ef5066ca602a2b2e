"""Gradient estimators for attacking DEQs through their intermediate states.

Yang et al. 2023, "Improving Adversarial Robustness of DEQs with Explicit Regulations"
and "A Closer Look at the Adversarial Robustness of Deep Equilibrium Models"
(docs/methods/deq_attacks.md):
ready-made attacks differentiate a DEQ with the implicit gradient at the solver's final
state, which is misaligned with the black-box forward when the solve has not converged
(gradient obfuscation). Gradients through intermediate states expose it.

Every estimator here returns a state whose **value is the model's state** ``z_out``
(the final solve, or the state a defence classifies) and whose **gradient is the
estimator's**, by the straight-through construction

    z = z_out + (ẑ − stop_gradient(ẑ))

so any attack (PGD, APGD, …) that evaluates logits and their gradient works unchanged:
the logits it sees and scores are the true model's, the direction it follows is the
estimator's. Estimators (for one example; ``trajectory`` holds ``z_1 … z_n``):

* ``"implicit"``: the IFT gradient at ``z*`` (what ready-made attacks use).
* ``"phantom"``: K damped steps ``z ← (1−λ)z + λ f(z, args)`` from ``sg(z*)``.
* ``"unroll"``: backpropagation through every solver step (computed by the caller).
* ``"intermediate"``: K_a damped steps from ``sg(z_i)`` for a chosen state ``i``.
* ``"ensemble"``: the sum over all intermediate states ``i`` of the ``"intermediate"``
  estimator (the input gradients of all states added up).
* ``"simultaneous_adjoint"``: the adjoint iteration run alongside the forward iterates,
  ``u_{k+1} = v + J_f(z_k)ᵀ u_k`` for ``k = 0 … n−1`` (each step linearised at the
  forward iterate of that step, not at the final state), then ``uᵀ ∂f/∂args`` at ``z_n``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.bpda import straight_through
from deqjax.deq import damped_steps

GRADIENTS = ("implicit", "phantom", "unroll", "intermediate", "ensemble", "simultaneous_adjoint")
DEFENCES = ("none", "early_exit", "state_ensemble")
# estimators that need the solver trajectory z_1 … z_n
TRAJECTORY_GRADIENTS = ("intermediate", "ensemble", "simultaneous_adjoint")


@dataclasses.dataclass(frozen=True)
class AttackView:
    """How an attack sees a DEQ: the gradient estimator it follows and the state the
    model classifies (hashable, static; validated at construction).

    Attributes:
      gradient: one of :data:`GRADIENTS`; ``None`` = the model config's own backward.
      state_index: ``i`` of the ``"intermediate"`` estimator (``z_i``, 0-based, negative
        counts from the end).
      steps: K_a, damped steps of the intermediate/phantom/ensemble estimators.
      damping: λ of those steps.
      defence: ``"none"``, ``"early_exit"`` (classify ``z_{exit_state}``) or
        ``"state_ensemble"`` (classify the average state).
      exit_state: the early-exit state index.
    """

    gradient: str | None = None
    state_index: int = -1
    steps: int = 5
    damping: float = 0.5
    defence: str = "none"
    exit_state: int = -1

    def __post_init__(self):
        if self.gradient is not None and self.gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {self.gradient!r}; choose one of {GRADIENTS}")
        if self.defence not in DEFENCES:
            raise ValueError(f"unknown defence {self.defence!r}; choose one of {DEFENCES}")
        for name in ("state_index", "steps", "exit_state"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"AttackView.{name} must be an int, got {v!r}")
        if self.steps < 1:
            raise ValueError(f"AttackView.steps (K_a) must be >= 1, got {self.steps}")
        if not 0 < self.damping <= 1:
            raise ValueError(f"AttackView.damping (λ) must be in (0, 1], got {self.damping}")

    def needs_trajectory(self, gradient: str) -> bool:
        return self.defence != "none" or gradient in TRAJECTORY_GRADIENTS


def intermediate_state_surrogate(
    f: Callable, z_i: jax.Array, args: Any, steps: int, damping: float
):
    """K_a damped steps from ``stop_gradient(z_i)``: the estimator's differentiable state."""
    return damped_steps(f, lax.stop_gradient(z_i), args, steps, damping)


def ensemble_surrogate(f: Callable, trajectory: jax.Array, args: Any, steps: int, damping: float):
    """Sum over every state of the trajectory of the K_a-step surrogate (vmapped)."""
    outs = jax.vmap(lambda z: intermediate_state_surrogate(f, z, args, steps, damping))(trajectory)
    return jnp.sum(outs, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def simultaneous_adjoint(f: Callable, trajectory: jax.Array, args: Any) -> jax.Array:
    """The last state, differentiated by the adjoint iteration run along the trajectory.

    Forward: ``trajectory[-1]``. Backward with cotangent ``v``: ``u_0 = v``,
    ``u_{k+1} = v + J_f(z_k)ᵀ u_k`` over the stored iterates, then ``uᵀ ∂f/∂args``.
    """
    return trajectory[-1]


def _sa_fwd(f, trajectory, args):
    return trajectory[-1], (trajectory, args)


def _sa_bwd(f, res, v):
    trajectory, args = res

    def step(u, z_k):
        _, vjp_z = jax.vjp(lambda z: f(z, args), z_k)
        return v + vjp_z(u)[0], None

    u, _ = lax.scan(step, v, trajectory[:-1])
    _, vjp_args = jax.vjp(lambda a: f(trajectory[-1], a), args)
    return jnp.zeros_like(trajectory), vjp_args(u)[0]


simultaneous_adjoint.defvjp(_sa_fwd, _sa_bwd)


def defended_state(z_star: jax.Array, trajectory: jax.Array | None, defence: str, exit_state: int):
    """The state a defence classifies: the final one, an early exit ``z_i``, or the
    average of all states (Yang et al.'s "ensemble of states" defence)."""
    if defence == "none":
        return z_star
    if trajectory is None:
        raise ValueError(
            f"defence {defence!r} needs the solver trajectory (return_trajectory=True)"
        )
    if defence == "early_exit":
        check_state_index(exit_state, trajectory.shape[0])
        return trajectory[exit_state]
    if defence == "state_ensemble":
        return jnp.mean(trajectory, axis=0)
    raise ValueError(f"unknown defence {defence!r}; choose one of {DEFENCES}")


def check_state_index(i: int, n: int) -> None:
    if not -n <= int(i) < n:
        raise ValueError(
            f"state index {i} is outside the trajectory of {n} states; choose 0 … {n - 1}"
        )


def estimate_state(
    f: Callable,
    z_value: jax.Array,
    z_star: jax.Array,
    trajectory: jax.Array | None,
    args: Any,
    gradient: str,
    *,
    state_index: int = -1,
    steps: int = 5,
    damping: float = 0.5,
) -> jax.Array:
    """A state with value ``z_value`` and the gradient of the chosen estimator.

    ``z_star`` is the (stopped-gradient) solver output; ``"implicit"`` and ``"unroll"``
    are produced by the DEQ solve itself and are not handled here.
    """
    if gradient == "phantom":
        sur = intermediate_state_surrogate(f, z_star, args, steps, damping)
    elif gradient == "intermediate":
        check_state_index(state_index, trajectory.shape[0])
        sur = intermediate_state_surrogate(f, trajectory[state_index], args, steps, damping)
    elif gradient == "ensemble":
        sur = ensemble_surrogate(f, trajectory, args, steps, damping)
    elif gradient == "simultaneous_adjoint":
        sur = simultaneous_adjoint(f, lax.stop_gradient(trajectory), args)
    else:
        raise ValueError(f"gradient {gradient!r} is not a surrogate; choose one of {GRADIENTS}")
    return straight_through(z_value, sur)
