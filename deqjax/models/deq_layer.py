"""The DEQ layer: any cell ``f(z, u)`` plus solver settings, as a Flax module.

The module is a thin wrapper over :func:`deqjax.deq.deq_fixed_point`: it owns the
cell's parameters, and solves ``z* = f(z*, u)`` per example with ``jax.vmap``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deqjax.bpda import straight_through
from deqjax.deq import (
    SHINE_MODES,
    DEQConfig,
    damped_steps,
    deq_fixed_point,
    jacobian_frobenius_sq,
)
from deqjax.deq_gradients import AttackView, defended_state, estimate_state
from deqjax.regulation import RandomSteps
from deqjax.solvers import batch_sharded_like, compute_dtype


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

    A cell with ``has_equilibrium = False`` — a LyaDEQ, which deqjax defines as a
    finite-time system (K steps from z₀ = 0, output z_K), not a fixed point — has
    nothing for the implicit function theorem to differentiate."""
    if implicit_gradient and not getattr(cell, "has_equilibrium", True):
        raise ValueError(
            f"{type(cell).__name__} defines a finite-time system (K steps from z0 = 0, "
            "output z_K), not an equilibrium: there is no fixed point to "
            "differentiate implicitly. Use backward='unroll' (the exact gradient of the "
            "K steps) or 'phantom', and attack views other than 'implicit'"
        )


# gradients whose value and derivative depend only on the solution z* (not on the steps
# the solver ran, the states it visited or the inverse-Jacobian estimate it built): a
# warm-started solve that converges gives them
WARM_START_GRADIENTS = ("implicit", "phantom")


def attack_gradient(config: DEQConfig, view: AttackView | None) -> str:
    """The gradient an attack through ``view`` follows: the view's, else ``config``'s
    backward mode."""
    return (view.gradient if view is not None else None) or config.backward


def warm_start_refusal(cell: nn.Module, config: DEQConfig, view: AttackView | None) -> str | None:
    """Why starting the solve elsewhere would change the model's output or the attack's
    gradient (``None`` when it leaves both those of the solution ``z*``): the cell must
    have an equilibrium, the gradient be implicit or phantom, no defence classify a
    trajectory state, and the forward solve stop at a tolerance (``tol > 0``; with
    ``tol = 0`` every solve runs ``max_iter`` steps, so a warm start saves nothing and
    only changes the result)."""
    if not getattr(cell, "has_equilibrium", True):
        return (
            f"{type(cell).__name__} has no equilibrium (a finite-time system: its output "
            "is the state after K steps from z0 = 0, which a warm start changes); attack "
            "it with its plain (cold) logits function"
        )
    gradient = attack_gradient(config, view)
    if gradient not in WARM_START_GRADIENTS:
        how = (
            "it applies the inverse-Jacobian estimate the Broyden solver built along its "
            "steps, which a warm-started solve of a few steps barely builds"
            if gradient in SHINE_MODES
            else "it differentiates the steps the solver ran or the states it visited"
        )
        return (
            f"a warm start changes the {gradient!r} gradient ({how}); warm starts support "
            f"the gradients {WARM_START_GRADIENTS}, which depend only on the solution z*. "
            "Use one of those, or attack with the plain (cold) logits function"
        )
    if view is not None and view.defence != "none":
        return (
            f"the {view.defence!r} defence classifies a state of the solver trajectory, "
            "which a warm start changes; attack it with the plain (cold) logits function"
        )
    if not config.forward.tol > 0:
        return (
            "a warm start saves solver steps only when the forward solve stops at a "
            "tolerance; this config has forward.tol = 0 (every solve runs max_iter steps, "
            "and a warm start only changes the result). Use e.g. "
            "config.with_forward(tol=1e-3)"
        )
    return None


def check_warm_start(cell: nn.Module, config: DEQConfig, view: AttackView | None) -> None:
    """Raise :func:`warm_start_refusal`'s reason as a ``ValueError``, if there is one."""
    refusal = warm_start_refusal(cell, config, view)
    if refusal is not None:
        raise ValueError(refusal)


def _reset_stale_starts(f, params, z0, u):
    """``(z0', reset)``: per example, ``z0`` where ``‖f(z0) − z0‖ ≤ ‖f(0) − 0‖``, else
    zeros (``reset`` True there). Computed without gradient."""
    params, z0, u = jax.lax.stop_gradient((params, z0, u))

    def one(z0_i, u_i):
        zero = jnp.zeros_like(z0_i)
        r_prev = jnp.linalg.norm((f(z0_i, (params, u_i)) - z0_i).astype(jnp.float32).ravel())
        r_zero = jnp.linalg.norm(f(zero, (params, u_i)).astype(jnp.float32).ravel())
        # a non-finite residual is stale too; a zero start is zero's (never "reset")
        stale = ~(r_prev <= r_zero) & jnp.any(z0_i != 0)
        return jnp.where(stale, zero, z0_i), stale

    return jax.vmap(one)(z0, u)


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
        view: AttackView | None = None,
        random_steps: RandomSteps | None = None,
        reset_stale: bool = False,
        adjoint_init=None,
    ):
        """Solve per example.

        ``z0`` (shaped like ``u``; default zeros) is where each solve starts. With
        ``reset_stale`` an example whose start is worse than zero —
        ``‖f(z0) − z0‖ > ‖f(0) − 0‖`` — starts from zero instead (two extra cell
        evaluations per example; used to reuse last epoch's fixed points in training,
        where a stale start can be far from the new equilibrium). The solution (no
        gradient) and the per-example reset mask are sown into the ``"fixed_points"``
        collection as ``z`` and ``reset`` (kept when the caller makes it mutable).

        ``view`` (an :class:`~deqjax.deq_gradients.AttackView`) picks the gradient
        path attacks see — the value is unchanged, see :mod:`deqjax.deq_gradients` —
        and the state that is returned (``defence``: early exit or state ensemble).

        ``random_steps`` (training only, :class:`~deqjax.regulation.RandomSteps`):
        draw ``n ~ U{1, …, max_steps}`` once for the batch, run exactly n solver steps
        and return ``z_n`` with the phantom gradient (K = ``config.phantom_steps``,
        λ = ``config.phantom_damping``) — the "random intermediate states" of Yang
        et al. 2023 (docs/methods/regulation.md).

        ``adjoint_init`` (shaped like ``u``; implicit gradient only): candidate starts
        of the per-example adjoint solves; its gradient is the solved adjoints, the
        next call's candidates (:func:`~deqjax.deq.deq_fixed_point`).

        With ``jacobian_key``, also sow the Hutchinson estimate of
        ``‖J_f(z*)‖_F² / dim(z)`` (batch mean) into the ``"losses"`` collection
        under ``"jacobian_frobenius_sq"`` (apply with ``mutable=["losses"]``)."""
        config = config or self.config
        if not isinstance(config, DEQConfig):
            raise TypeError(f"config must be a deqjax.DEQConfig, got {type(config).__name__}")
        if view is not None and not isinstance(view, AttackView):
            raise TypeError(f"view must be a deqjax.deq_gradients.AttackView, got {view!r}")
        z0 = jnp.zeros_like(u) if z0 is None else z0
        if z0.shape != u.shape:
            raise ValueError(f"z0 must have the injection's shape {u.shape}, got {z0.shape}")
        if self.is_initializing():
            self.cell(z0, u)  # create the cell's parameters
        params = self.cell.variables["params"]
        f = cell_as_function(self.cell)
        # the probe carries [relative residual, steps]: at least float32 (bf16 states)
        stats_dtype = compute_dtype(u.dtype)
        if backward_probe is None:
            backward_probe = batch_sharded_like(jnp.zeros((u.shape[0], 2), stats_dtype), u)
        z0 = batch_sharded_like(z0, u)
        if adjoint_init is not None:
            if adjoint_init.shape != u.shape:
                raise ValueError(
                    f"adjoint_init must have the injection's shape {u.shape}, got "
                    f"{adjoint_init.shape}"
                )
            adjoint_init = batch_sharded_like(adjoint_init, u)
        reset = None
        if reset_stale:
            z0, reset = _reset_stale_starts(f, params, z0, u)

        num_steps = None
        if random_steps is not None:
            num_steps = random_steps.draw()
            config = dataclasses.replace(
                config.with_forward(max_iter=random_steps.max_steps, tol=0.0, return_state="last"),
                backward="phantom",
            )

        if view is not None:
            z, stats = self._attack_view(f, params, u, z0, config, view, adjoint_init)
        else:
            refuse_implicit(self.cell, config.backward in ("implicit", "shine", "shine_refine"))

            def one(z0_i, u_i, probe_i, adj_i):
                return deq_fixed_point(
                    f,
                    z0_i,
                    (params, u_i),
                    config,
                    backward_probe=probe_i,
                    return_trajectory=return_trajectory,
                    num_steps=num_steps,
                    adjoint_init=adj_i,
                )

            z, stats = jax.vmap(one)(z0, u, backward_probe, adjoint_init)
        if jacobian_key is not None:
            keys = batch_sharded_like(jax.random.split(jacobian_key, u.shape[0]), u)
            est = jax.vmap(
                lambda z_i, u_i, k: jacobian_frobenius_sq(
                    f, jax.lax.stop_gradient(z_i), (params, u_i), k, jacobian_samples
                )
            )(z, u, keys)
            est = est.astype(stats_dtype)  # a loss term: at least float32
            self.sow("losses", "jacobian_frobenius_sq", jnp.mean(est) / z[0].size)
        # (not at init: the solution is a result, not a variable of the model)
        if self.is_mutable_collection("fixed_points") and not self.is_initializing():
            self.sow("fixed_points", "z", jax.lax.stop_gradient(z))
            if reset is not None:
                self.sow("fixed_points", "reset", reset)
        return z, stats

    def _attack_view(self, f, params, u, z0, config, view: AttackView, adjoint_init=None):
        gradient = attack_gradient(config, view)
        refuse_implicit(self.cell, gradient == "implicit")
        need_traj = view.needs_trajectory(gradient)
        if adjoint_init is not None and gradient != "implicit":
            raise ValueError(
                f"adjoint_init starts the implicit gradient's adjoint solve; the view's "
                f"gradient is {gradient!r}, which solves none"
            )

        def one(z0_i, u_i, adj_i):
            args = (params, u_i)
            if gradient in ("implicit", "unroll"):
                # the solve itself is differentiated (IFT, or backprop through its steps)
                z_sur, stats = deq_fixed_point(
                    f,
                    z0_i,
                    args,
                    dataclasses.replace(config, backward=gradient),
                    return_trajectory=need_traj,
                    adjoint_init=adj_i,
                )
                z_star = jax.lax.stop_gradient(z_sur)
            else:  # forward only (args stopped); the estimator supplies the gradient
                z_star, stats = deq_fixed_point(
                    f,
                    z0_i,
                    jax.lax.stop_gradient(args),
                    dataclasses.replace(config, backward="implicit"),
                    return_trajectory=need_traj,
                )
                z_sur = None
            z_value = defended_state(z_star, stats.trajectory, view.defence, view.exit_state)
            if z_sur is not None:
                return straight_through(z_value, z_sur), stats
            z = estimate_state(
                f,
                z_value,
                z_star,
                stats.trajectory,
                args,
                gradient,
                state_index=view.state_index,
                steps=view.steps,
                damping=view.damping,
            )
            return z, stats

        return jax.vmap(one)(z0, u, adjoint_init)

    def check_warm_start(self, config: DEQConfig | None = None, view: AttackView | None = None):
        """:func:`check_warm_start` for this layer's cell (and config, by default)."""
        check_warm_start(self.cell, config or self.config, view)

    def warm_start_refusal(
        self, config: DEQConfig | None = None, view: AttackView | None = None
    ) -> str | None:
        """:func:`warm_start_refusal` for this layer's cell (and config, by default)."""
        return warm_start_refusal(self.cell, config or self.config, view)

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
