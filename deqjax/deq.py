"""Deep equilibrium fixed points with implicit, phantom and unrolled gradients.

``deq_fixed_point(f, z0, args, config)`` returns ``z*`` with ``z* = f(z*, args)``
for ONE example (vmap for batches) and differentiates it with respect to ``args``
(any pytree: parameters, the input injection, the input) in one of three ways
(Bai, Kolter & Koltun 2019, "Deep Equilibrium Models"; Geng et al. 2021, "On
Training Implicit Models" for the phantom gradient):

* ``"implicit"`` — the implicit function theorem. With ``J = ∂f/∂z`` at ``z*`` and
  the incoming cotangent ``v = ∂ℓ/∂z*``, the adjoint ``u`` solves
  ``u = v + Jᵀ u`` (i.e. ``(I − J)ᵀ u = v``) and ``∂ℓ/∂args = uᵀ ∂f/∂args``. The
  adjoint is solved by a fixed-point/Anderson/Broyden solve of ``u ↦ v + Jᵀu`` (the
  solvers of :mod:`deqjax.solvers`), or by a Krylov solver from jaxopt (GMRES,
  BiCGSTAB, normal CG; see :mod:`deqjax._jaxopt`). A backward solve that fails is
  never silent: its relative residual ``‖u − v − Jᵀu‖ / ‖v‖`` and iteration count
  come out through the optional ``backward_probe`` argument (below).
* ``"phantom"`` — K damped steps ``z ← (1 − λ) z + λ f(z, args)`` from
  ``stop_gradient(z*)``, differentiated by autodiff. K = 1, λ = 1 is the one-step
  ("Jacobian-free") gradient. The returned value is the K-step state.
* ``"unroll"`` — backpropagation through every solver step (for checking).

**Backward statistics.** Pass ``backward_probe = jnp.zeros(2)`` and differentiate
with respect to it: its "gradient" is ``[relative residual, steps]`` of the adjoint
solve (zeros for the non-implicit modes). Under vmap give one probe per example.
This keeps the function pure: the backward's report travels in the backward pass.

Why not ``jaxopt.implicit_diff.custom_root`` directly: it offers no way to report
the adjoint residual. deqjax's ``custom_vjp`` is checked against ``custom_root`` in
the tests.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from deqjax import _jaxopt
from deqjax.solvers import SolverConfig, solve

BACKWARD_MODES = ("implicit", "phantom", "unroll")
ADJOINT_SOLVERS = ("fixed_point", "anderson", "broyden") + _jaxopt.KRYLOV_SOLVERS


@dataclasses.dataclass(frozen=True)
class DEQConfig:
    """Forward solver, backward mode and their settings (hashable, static).

    Attributes:
      forward: :class:`SolverConfig` of the forward solve.
      backward: ``"implicit"``, ``"phantom"`` or ``"unroll"``.
      adjoint_solver: solver of the implicit adjoint system: ``"fixed_point"``,
        ``"anderson"``, ``"broyden"`` (deqjax's solvers on ``u ↦ v + Jᵀu``) or
        ``"gmres"``, ``"bicgstab"``, ``"normal_cg"`` (jaxopt).
      adjoint_max_iter, adjoint_tol: its budget and tolerance (relative residual);
        ``adjoint_tol=0`` runs exactly ``adjoint_max_iter`` steps.
      phantom_steps, phantom_damping: K and λ of the phantom gradient.
    """

    forward: SolverConfig = SolverConfig()
    backward: str = "implicit"
    adjoint_solver: str = "anderson"
    adjoint_max_iter: int = 30
    adjoint_tol: float = 1e-4
    phantom_steps: int = 5
    phantom_damping: float = 0.5

    def __post_init__(self):
        if self.backward not in BACKWARD_MODES:
            raise ValueError(
                f"unknown backward mode {self.backward!r}; choose one of {BACKWARD_MODES}"
            )
        if self.adjoint_solver not in ADJOINT_SOLVERS:
            raise ValueError(
                f"unknown adjoint_solver {self.adjoint_solver!r}; choose one of {ADJOINT_SOLVERS}"
            )
        if int(self.phantom_steps) < 1:
            raise ValueError(f"phantom_steps must be >= 1, got {self.phantom_steps}")
        if not 0 < self.phantom_damping <= 1:
            raise ValueError(f"phantom_damping must be in (0, 1], got {self.phantom_damping}")

    def adjoint_config(self) -> SolverConfig:
        method = (
            self.adjoint_solver
            if self.adjoint_solver in ("fixed_point", "anderson", "broyden")
            else "fixed_point"
        )
        return dataclasses.replace(
            self.forward,
            method=method,
            max_iter=self.adjoint_max_iter,
            tol=self.adjoint_tol,
            stop_mode="rel",
            damping=1.0,
            return_state="best",
        )  # its residual is the returned iterate's

    def with_forward(self, **changes) -> DEQConfig:
        """This config with forward-solver settings changed, e.g.
        ``config.with_forward(max_iter=8)`` (another budget)."""
        return dataclasses.replace(self, forward=dataclasses.replace(self.forward, **changes))


def damped_steps(f: Callable, z: jax.Array, args: Any, steps: int, damping: float) -> jax.Array:
    """``steps`` damped iterations ``z ← (1 − λ) z + λ f(z, args)``, unrolled (differentiable)."""
    for _ in range(int(steps)):
        z = (1 - damping) * z + damping * f(z, args)
    return z


def adjoint_solve(f: Callable, z_star: jax.Array, args: Any, v: jax.Array, config: DEQConfig):
    """Solve ``u = v + J_f(z*)ᵀ u`` for one example.

    Returns ``(u, rel_residual, steps)`` with the residual ``‖u − v − Jᵀu‖ / ‖v‖``
    measured after the solve, whatever the solver.
    """
    _, vjp_z = jax.vjp(lambda z: f(z, args), z_star)
    return _solve_adjoint(lambda u: vjp_z(u)[0], v, config)


def _solve_adjoint(jt: Callable, v: jax.Array, config: DEQConfig):
    """:func:`adjoint_solve` given the map ``u ↦ Jᵀu``."""
    if config.adjoint_solver in _jaxopt.KRYLOV_SOLVERS:
        matvec = lambda u: u - jt(u)
        u = _jaxopt.krylov_solve(
            config.adjoint_solver,
            matvec,
            v,
            tol=config.adjoint_tol,
            maxiter=config.adjoint_max_iter,
        )
        steps = jnp.asarray(config.adjoint_max_iter, jnp.int32)
        res = jnp.linalg.norm(u - v - jt(u))
    else:
        u, st = solve(lambda u: v + jt(u), v, config.adjoint_config())
        steps = st.steps
        # the returned iterate's own residual ‖v + Jᵀu − u‖: no extra VJP needed
        res = st.abs_residual
    return u, res / (jnp.linalg.norm(v) + 1e-12), steps


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _implicit(f, z_star, args, probe, config):
    return z_star


def _implicit_fwd(f, z_star, args, probe, config):
    return z_star, (z_star, args)


def _implicit_bwd(f, config, res, v):
    z_star, args = res
    # one linearisation serves the adjoint iterations (their unused args-cotangent is
    # dead code XLA removes from the loop body) and the final args-VJP
    _, vjp_both = jax.vjp(f, z_star, args)
    u, rel, steps = _solve_adjoint(lambda u: vjp_both(u)[0], v, config)
    g_args = vjp_both(u)[1]
    probe_ct = jnp.stack([rel, steps.astype(rel.dtype)])
    return jnp.zeros_like(z_star), g_args, probe_ct


_implicit.defvjp(_implicit_fwd, _implicit_bwd)


def _is_fixed_point(g, z, args, forward: SolverConfig):
    """``‖g(z) − z‖ ≤ tol`` in the forward solver's stopping mode (abs or rel)."""
    gz = lax.stop_gradient(g(z, lax.stop_gradient(args)))
    res = jnp.linalg.norm(gz - z)
    if forward.stop_mode == "rel":
        res = res / (jnp.linalg.norm(gz) + 1e-12)
    return res <= forward.tol


def deq_fixed_point(
    f: Callable[[jax.Array, Any], jax.Array],
    z0: jax.Array,
    args: Any,
    config: DEQConfig = DEQConfig(),
    *,
    backward_probe: jax.Array | None = None,
    return_trajectory: bool = False,
    num_steps=None,
    implicit_f: Callable[[jax.Array, Any], jax.Array] | None = None,
):
    """Solve ``z* = f(z*, args)`` for one example and make it differentiable.

    Args:
      f: the equilibrium cell of ONE example, ``f(z, args) -> z``; ``args`` is any
        pytree (parameters, input injection, …) that gradients flow to.
      z0: the initial state (no gradient flows to it).
      args: the pytree passed to ``f``.
      config: a :class:`DEQConfig` (static).
      backward_probe: optional ``jnp.zeros(2)``; its gradient is the adjoint
        solve's ``[relative residual, steps]`` (implicit mode).
      return_trajectory: return the iterates ``z_1 … z_n`` in ``stats.trajectory``.
      num_steps: optional traced step budget (≤ ``config.forward.max_iter``).
      implicit_f: optional map whose fixed points include those of ``f`` that count
        as equilibria, and whose Jacobian the implicit backward uses (default ``f``).
        For dynamics modified only away from their equilibria — LyaDEQ's projection
        at α = 0, not differentiable at its roots — the IFT needs the smooth original
        map. The solve then counts as converged only if ``z*`` is also a fixed point
        of ``implicit_f`` to the same tolerance (other roots of ``f`` are reported).

    Returns:
      ``(z, stats)``: the equilibrium (after K phantom steps in phantom mode) and
      the forward :class:`~deqjax.solvers.SolverStats`.
    """
    if backward_probe is None:
        backward_probe = jnp.zeros(2, jnp.result_type(z0))
    f_nograd = lambda z: f(z, lax.stop_gradient(args))
    if config.backward == "unroll":
        z, stats = solve(
            lambda z: f(z, args),
            lax.stop_gradient(z0),
            config.forward,
            return_trajectory=return_trajectory,
            differentiable=True,
            num_steps=num_steps,
        )
        if implicit_f is not None:
            stats = stats._replace(
                converged=stats.converged
                & _is_fixed_point(implicit_f, lax.stop_gradient(z), args, config.forward)
            )
        return z + 0.0 * jnp.sum(backward_probe), stats
    z_star, stats = solve(
        f_nograd,
        lax.stop_gradient(z0),
        config.forward,
        return_trajectory=return_trajectory,
        num_steps=num_steps,
    )
    z_star = lax.stop_gradient(z_star)
    if implicit_f is not None:
        stats = stats._replace(
            converged=stats.converged & _is_fixed_point(implicit_f, z_star, args, config.forward)
        )
    if config.backward == "phantom":
        z = damped_steps(f, z_star, args, config.phantom_steps, config.phantom_damping)
        return z + 0.0 * jnp.sum(backward_probe), stats
    return _implicit(implicit_f or f, z_star, args, backward_probe, config), stats


def jacobian_frobenius_sq(
    f: Callable, z_star: jax.Array, args: Any, key: jax.Array, num_samples: int = 1
) -> jax.Array:
    """Hutchinson estimate of ``‖J_f(z*)‖_F²`` for one example (Bai et al. 2021,
    "Stabilizing Equilibrium Models by Jacobian Regularization").

    ``‖J‖_F² = E_ε ‖εᵀ J‖²`` with ``ε ~ N(0, I)``; each sample is one VJP. The
    estimate is differentiable with respect to ``args`` (the regulariser's use).
    """
    _, vjp_z = jax.vjp(lambda z: f(z, args), z_star)
    eps = jax.random.normal(key, (num_samples,) + z_star.shape, z_star.dtype)
    sq = jax.vmap(lambda e: jnp.sum(vjp_z(e)[0] ** 2))(eps)
    return jnp.mean(sq)
