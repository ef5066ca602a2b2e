"""The DEQ layer: any cell ``f(z, u)`` plus solver settings, as a Flax module.

The module is a thin wrapper over :func:`deqjax.deq.deq_fixed_point`: it owns the
cell's parameters, and solves ``z* = f(z*, u)`` per example with ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.deq import DEQConfig, damped_steps, deq_fixed_point, jacobian_frobenius_sq
from deqjax.deq_gradients import (
    DEFENCES,
    GRADIENTS,
    defended_state,
    estimate_state,
    straight_through,
)


def cell_as_function(cell: nn.Module, method: str | None = None):
    """``f(z, (params, u))`` of ONE example from a batched Flax cell ``cell(z, u)``
    (or its method ``method(z, u)``)."""
    cell = cell.clone(parent=None)

    def f(z, args):
        params, u = args
        return cell.apply({"params": params}, z[None], u[None], method=method)[0]

    return f


def refuse_implicit(cell: nn.Module, implicit_gradient: bool) -> None:
    """Raise if the implicit gradient is asked of a cell that has no equilibrium.

    A cell with ``has_equilibrium = False`` — a LyaDEQ, which SPEC §2 defines as a
    finite-time system (K steps from z₀ = 0, output z_K), not a fixed point — has
    nothing for the implicit function theorem to differentiate."""
    if implicit_gradient and not getattr(cell, "has_equilibrium", True):
        raise ValueError(
            f"{type(cell).__name__} defines a finite-time system (K steps from z0 = 0, "
            "output z_K; SPEC §2), not an equilibrium: there is no fixed point to "
            "differentiate implicitly. Use backward='unroll' (the exact gradient of the "
            "K steps) or 'phantom', and attack views other than 'implicit'"
        )


class DEQ(nn.Module):
    """Equilibrium layer ``z* = cell(z*, u)`` with the state shaped like ``u``.

    ``cell`` is a Flax module mapping a batch ``(z, u)`` to the next ``z``.
    Call with ``u`` of shape ``(B, ...)``; returns ``(z*, stats)`` with per-example
    :class:`~deqjax.solvers.SolverStats`. ``backward_probe`` (shape ``(B, 2)``, zeros)
    carries the adjoint solve's ``[relative residual, steps]`` out as its gradient.
    """

    cell: nn.Module
    config: DEQConfig = DEQConfig()

    @nn.compact
    def __call__(
        self,
        u,
        *,
        z0=None,
        backward_probe=None,
        return_trajectory: bool = False,
        config: DEQConfig | None = None,
        jacobian_key=None,
        jacobian_samples: int = 1,
        gradient: str | None = None,
        state_index: int = -1,
        attack_steps: int = 5,
        attack_damping: float = 0.5,
        defence: str = "none",
        exit_state: int = -1,
        random_steps_key=None,
        random_steps_max: int = 0,
    ):
        """Solve per example.

        ``gradient`` (one of :data:`deqjax.deq_gradients.GRADIENTS`) picks the
        gradient path attacks see (value unchanged, see :mod:`deqjax.deq_gradients`):
        ``state_index``, ``attack_steps`` (K_a) and ``attack_damping`` (λ) configure
        the intermediate-state estimators. ``defence`` (``"early_exit"`` at
        ``exit_state``, or ``"state_ensemble"``) changes the state that is returned.

        ``random_steps_key`` with ``random_steps_max = n_max`` (training only): draw
        ``n ~ U{1, …, n_max}`` once for the batch, run exactly n solver steps and
        return ``z_n`` with the phantom gradient (K = ``config.phantom_steps``,
        λ = ``config.phantom_damping``) — the "random intermediate states" of Yang
        et al. 2023 (SPEC §5).

        With ``jacobian_key``, also sow the Hutchinson estimate of
        ``‖J_f(z*)‖_F² / dim(z)`` (batch mean) into the ``"losses"`` collection
        under ``"jacobian_frobenius_sq"`` (apply with ``mutable=["losses"]``)."""
        config = config or self.config
        z0 = jnp.zeros_like(u) if z0 is None else z0
        if z0.shape != u.shape:
            raise ValueError(f"z0 must have the injection's shape {u.shape}, got {z0.shape}")
        if self.is_initializing():
            self.cell(z0, u)  # create the cell's parameters
        params = self.cell.variables["params"]
        f = cell_as_function(self.cell)
        if backward_probe is None:
            backward_probe = jnp.zeros((u.shape[0], 2), u.dtype)

        num_steps = None
        if random_steps_key is not None:
            if random_steps_max < 1:
                raise ValueError("random intermediate states need random_steps_max >= 1")
            num_steps = jax.random.randint(random_steps_key, (), 1, random_steps_max + 1)
            fwd = dataclasses.replace(
                config.forward, max_iter=random_steps_max, tol=0.0, return_state="last"
            )
            config = dataclasses.replace(config, forward=fwd, backward="phantom")

        refuse_implicit(self.cell, config.backward == "implicit")

        def one(z0_i, u_i, probe_i):
            return deq_fixed_point(
                f,
                z0_i,
                (params, u_i),
                config,
                backward_probe=probe_i,
                return_trajectory=return_trajectory,
                num_steps=num_steps,
            )

        if gradient is not None or defence != "none":
            z, stats = self._attack_view(
                f,
                params,
                u,
                z0,
                config,
                gradient or config.backward,
                state_index,
                attack_steps,
                attack_damping,
                defence,
                exit_state,
            )
        else:
            z, stats = jax.vmap(one)(z0, u, backward_probe)
        if jacobian_key is not None:
            keys = jax.random.split(jacobian_key, u.shape[0])
            est = jax.vmap(
                lambda z_i, u_i, k: jacobian_frobenius_sq(
                    f, jax.lax.stop_gradient(z_i), (params, u_i), k, jacobian_samples
                )
            )(z, u, keys)
            self.sow("losses", "jacobian_frobenius_sq", jnp.mean(est) / z[0].size)
        return z, stats

    def _attack_view(
        self, f, params, u, z0, config, gradient, state_index, steps, damping, defence, exit_state
    ):
        if gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {gradient!r}; choose one of {GRADIENTS}")
        if defence not in DEFENCES:
            raise ValueError(f"unknown defence {defence!r}; choose one of {DEFENCES}")

        refuse_implicit(self.cell, gradient == "implicit")

        def one(z0_i, u_i):
            args = (params, u_i)
            need_traj = defence != "none" or gradient in (
                "intermediate",
                "ensemble",
                "simultaneous_adjoint",
            )
            if gradient in ("implicit", "unroll"):
                cfg = dataclasses.replace(config, backward=gradient)
                z_sur, stats = deq_fixed_point(f, z0_i, args, cfg, return_trajectory=need_traj)
                z_star = jax.lax.stop_gradient(z_sur)
            else:
                cfg = dataclasses.replace(
                    config, backward="implicit"
                )  # forward only: args are stopped
                z_star, stats = deq_fixed_point(
                    f,
                    z0_i,
                    jax.lax.stop_gradient(args),
                    cfg,
                    return_trajectory=need_traj,
                )
                z_sur = None
            z_value = defended_state(z_star, stats.trajectory, defence, exit_state)
            if z_sur is not None:
                return straight_through(z_value, z_sur), stats
            return estimate_state(
                f,
                z_value,
                z_star,
                stats.trajectory,
                args,
                gradient,
                state_index=state_index,
                steps=steps,
                damping=damping,
            ), stats

        return jax.vmap(one)(z0, u)

    def damped(self, u, z, steps: int, damping: float):
        """``steps`` damped cell steps from ``stop_gradient(z)`` (a differentiable
        phantom state; used by input entropy reduction)."""
        params = self.cell.variables["params"]
        f = cell_as_function(self.cell)
        return jax.vmap(
            lambda z_i, u_i: damped_steps(
                f, jax.lax.stop_gradient(z_i), (params, u_i), steps, damping
            )
        )(z, u)

    def cell_function(self):
        """The per-example cell ``f(z, (params, u))`` (for attacks on intermediate states)."""
        return cell_as_function(self.cell)
