"""Deep equilibrium fixed points with implicit, SHINE, phantom and unrolled gradients.

``deq_fixed_point(f, z0, args, config)`` returns ``z*`` with ``z* = f(z*, args)``
for ONE example (vmap for batches) and differentiates it with respect to ``args``
(any pytree: parameters, the input injection, the input) in one of four ways
(Bai, Kolter & Koltun 2019, "Deep Equilibrium Models"; Geng et al. 2021, "On
Training Implicit Models" for the phantom gradient; Ramzi et al. 2022, "SHINE:
SHaring the INverse Estimate from the forward pass for bi-level optimization and
implicit models"):

* ``"implicit"`` — the implicit function theorem. With ``J = ∂f/∂z`` at ``z*`` and
  the incoming cotangent ``v = ∂ℓ/∂z*``, the adjoint ``u`` solves
  ``u = v + Jᵀ u`` (i.e. ``(I − J)ᵀ u = v``) and ``∂ℓ/∂args = uᵀ ∂f/∂args``. The
  adjoint is solved by a fixed-point/Anderson/Broyden solve of ``u ↦ v + Jᵀu`` (the
  solvers of :mod:`deqjax.solvers`), or by a Krylov solver from jaxopt (GMRES,
  BiCGSTAB, normal CG; see :mod:`deqjax._jaxopt`). A backward solve that fails is
  never silent: its relative residual ``‖u − v − Jᵀu‖ / ‖v‖`` and iteration count
  come out through the optional ``backward_probe`` argument (below).
* ``"shine"`` — (Broyden forward only) the forward Broyden solve already holds a
  low-rank estimate ``H ≈ (J − I)⁻¹`` of the inverse Jacobian of ``g(z) = f(z) − z``;
  SHINE takes the adjoint ``u = (I − J)⁻ᵀ v ≈ −Hᵀ v`` from it: no adjoint solve, one
  VJP in all (the parameter gradient, which also gives the reported residual).
  ``"shine_refine"`` starts the adjoint solver (``adjoint_solver``,
  ``adjoint_max_iter``, ``adjoint_tol``) at ``−Hᵀ v`` instead of at ``v``.
* ``"phantom"`` — K damped steps ``z ← (1 − λ) z + λ f(z, args)`` from
  ``stop_gradient(z*)``, differentiated by autodiff. K = 1, λ = 1 is the one-step
  ("Jacobian-free") gradient. The returned value is the K-step state.
* ``"unroll"`` — backpropagation through every solver step (for checking).

**Forward and reverse mode.** Without a ``backward_probe``, ``implicit`` and the
SHINE modes are a ``jax.custom_jvp``: the tangent of ``z*`` in the direction ``ȧ``
of ``args`` solves the linear system ``(I − J) ż = b``, ``b = ∂f/∂args · ȧ``, written
as ``lax.custom_linear_solve`` with ``solve`` = the adjoint solver's iterative solve
of ``ż = b + J ż`` (SHINE: ``−H b``; ``shine_refine`` starts there) and
``transpose_solve`` = the adjoint solve of ``u = v + Jᵀ u`` (SHINE: ``−Hᵀ v``). ``J ż``
and ``b`` are the transposes of ONE VJP of ``f`` at ``z*``, so ``f`` needs only
reverse-mode rules (a cell with ``custom_vjp`` pieces such as :func:`deqjax.conv2d`
works), and reverse mode transposes them back into that VJP: ``jax.jvp``,
``jax.jacfwd``, ``jax.grad``, ``jax.jacrev`` and ``vmap`` all work, and ``grad``
runs the same adjoint solve, at the same cost, as the probe path. With a
``backward_probe`` the backward is a ``jax.custom_vjp`` (reverse mode only) whose
cotangent for the probe carries the adjoint solve's statistics — a
``custom_linear_solve`` transpose can emit no non-linear output. ``phantom`` and
``unroll`` are plain autodiff in both modes.

**Backward statistics.** Pass ``backward_probe = jnp.zeros(2)`` and differentiate
with respect to it: its "gradient" is ``[relative residual, steps]`` of the adjoint
solve (zeros for the phantom and unroll modes). Under vmap give one probe per
example. This keeps the function pure: the backward's report travels in the
backward pass.

**Non-finite values.** A NaN or Inf anywhere in ``z0`` or in the floating-point
leaves of ``args`` (a NaN image, a diverged parameter) makes that example's state
all NaN with ``converged=False`` in every mode (the solver then does not run for
it); a solve in which ``f`` produces a non-finite value does the same (see
:mod:`deqjax.solvers`). Under vmap only the examples concerned are NaN.

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
from deqjax.solvers import (
    SolverConfig,
    apply_inverse_jacobian,
    check_config,
    check_int,
    check_real,
    solve,
    vary_over,
    varying_axes,
)

SHINE_MODES = ("shine", "shine_refine")
BACKWARD_MODES = ("implicit", "phantom", "unroll") + SHINE_MODES
ADJOINT_SOLVERS = ("fixed_point", "anderson", "broyden") + _jaxopt.KRYLOV_SOLVERS


@dataclasses.dataclass(frozen=True)
class DEQConfig:
    """Forward solver, backward mode and their settings (hashable, static).

    Attributes:
      forward: :class:`SolverConfig` of the forward solve.
      backward: ``"implicit"``, ``"shine"`` or ``"shine_refine"`` (these two need
        ``forward.method="broyden"``), ``"phantom"`` or ``"unroll"``.
      adjoint_solver: solver of the implicit adjoint system: ``"fixed_point"``,
        ``"anderson"``, ``"broyden"`` (deqjax's solvers on ``u ↦ v + Jᵀu``) or
        ``"gmres"``, ``"bicgstab"``, ``"normal_cg"`` (jaxopt).
      adjoint_max_iter, adjoint_tol: its budget (>= 1) and tolerance (relative
        residual, >= 0); ``adjoint_tol=0`` runs exactly ``adjoint_max_iter`` steps.
      adjoint_ridge_mode: Anderson's ridge in the adjoint solve, ``"relative"`` (the
        default) or ``"absolute"`` (see :class:`~deqjax.solvers.SolverConfig`); the
        adjoint solve otherwise inherits the forward's Anderson settings. The adjoint
        system ``u = v + Jᵀu`` is linear in the cotangent ``v``, so its solution must
        scale with ``v``: with the absolute ridge it does not — a small cotangent (a
        batch-mean loss, a confidently classified example) makes ``λ = ridge``
        dominate the Gram matrix and the solve inaccurate (README, "The adjoint's
        ridge"). ``"absolute"`` reproduces runs made before this option existed.
      phantom_steps, phantom_damping: K and λ of the phantom gradient.
    """

    forward: SolverConfig = SolverConfig()
    backward: str = "implicit"
    adjoint_solver: str = "anderson"
    adjoint_max_iter: int = 30
    adjoint_tol: float = 1e-4
    adjoint_ridge_mode: str = "relative"
    phantom_steps: int = 5
    phantom_damping: float = 0.5

    def __post_init__(self):
        check_config(self.forward, SolverConfig, "DEQConfig.forward")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(
                f"unknown backward mode {self.backward!r}; choose one of {BACKWARD_MODES}"
            )
        if self.adjoint_solver not in ADJOINT_SOLVERS:
            raise ValueError(
                f"unknown adjoint_solver {self.adjoint_solver!r}; choose one of {ADJOINT_SOLVERS}"
            )
        if self.adjoint_ridge_mode not in ("relative", "absolute"):
            raise ValueError(
                f"adjoint_ridge_mode must be 'relative' or 'absolute', "
                f"got {self.adjoint_ridge_mode!r}"
            )
        for name in ("adjoint_max_iter", "phantom_steps"):
            check_int(name, getattr(self, name))
        for name in ("adjoint_tol", "phantom_damping"):
            check_real(name, getattr(self, name))
        if self.adjoint_max_iter < 1:
            raise ValueError(
                f"adjoint_max_iter must be >= 1, got {self.adjoint_max_iter} (for no "
                "adjoint iterations at all use backward='shine' (Broyden) or 'phantom')"
            )
        if not 0 <= self.adjoint_tol < float("inf"):
            raise ValueError(
                f"adjoint_tol must be finite and >= 0 (0 = run exactly adjoint_max_iter "
                f"steps), got {self.adjoint_tol}"
            )
        if self.phantom_steps < 1:
            raise ValueError(f"phantom_steps must be >= 1, got {self.phantom_steps}")
        if not 0 < self.phantom_damping <= 1:
            raise ValueError(f"phantom_damping must be in (0, 1], got {self.phantom_damping}")
        if self.backward in SHINE_MODES and self.forward.method != "broyden":
            raise ValueError(
                f"backward={self.backward!r} reuses the forward Broyden solver's inverse-Jacobian "
                f"estimate: it needs forward.method='broyden', got {self.forward.method!r}"
            )

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
            anderson_ridge_mode=self.adjoint_ridge_mode,
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


def _solve_adjoint(jt: Callable, v: jax.Array, config: DEQConfig, u0=None):
    """Solve ``u = v + jt(u)`` (``jt`` linear: ``u ↦ Jᵀu``, or ``u ↦ Ju`` for the
    tangent system) by ``config``'s adjoint solver started from ``u0`` (default ``v``);
    ``(u, rel_residual, steps)``."""
    u0 = v if u0 is None else u0
    if config.adjoint_solver in _jaxopt.KRYLOV_SOLVERS:
        if varying_axes(v) | varying_axes(jax.eval_shape(jt, v)):
            raise ValueError(
                f"adjoint_solver={config.adjoint_solver!r} (jaxopt's Krylov solvers, "
                "built on jax.scipy) does not type-check inside jax.shard_map with "
                "check_vma=True (its loop carry does not vary over the mesh); use "
                "adjoint_solver='fixed_point', 'anderson' or 'broyden' there, or "
                "shard_map(..., check_vma=False)"
            )
        matvec = lambda u: u - jt(u)
        u = _jaxopt.krylov_solve(
            config.adjoint_solver,
            matvec,
            v,
            tol=config.adjoint_tol,
            maxiter=config.adjoint_max_iter,
            init=u0,
        )
        steps = jnp.asarray(config.adjoint_max_iter, jnp.int32)
        res = jnp.linalg.norm(u - v - jt(u))
    else:
        u, st = solve(lambda u: v + jt(u), u0, config.adjoint_config())
        steps = st.steps
        # the returned iterate's own residual ‖v + Jᵀu − u‖: no extra VJP needed
        res = st.abs_residual
    return u, res / (jnp.linalg.norm(v) + 1e-12), steps


def _shine_start(factors, x, transpose: bool):
    """SHINE's estimate ``−H x`` of ``(I − J)⁻¹ x`` (``−Hᵀ x`` of ``(I − J)⁻ᵀ x``),
    or ``None`` (start from ``x``) without Broyden factors."""
    if factors is None:
        return None
    return -apply_inverse_jacobian(factors, x, transpose=transpose)


# --- reverse mode with diagnostics: custom_vjp ------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _implicit_vjp(f, z_star, args, factors, probe, config):
    return z_star


def _implicit_vjp_fwd(f, z_star, args, factors, probe, config):
    return z_star, (z_star, args, factors)


def _implicit_vjp_bwd(f, config, res, v):
    z_star, args, factors = res
    # one linearisation serves the adjoint iterations (their unused args-cotangent is
    # dead code XLA removes from the loop body) and the final args-VJP
    _, vjp_both = jax.vjp(f, z_star, args)
    u0 = _shine_start(factors, v, transpose=True)
    if config.backward == "shine":  # no solve: the args-VJP also gives Jᵀu
        u = u0
        jt_u, g_args = vjp_both(u)
        rel = jnp.linalg.norm(u - v - jt_u) / (jnp.linalg.norm(v) + 1e-12)
        steps = jnp.asarray(0, jnp.int32)
    else:
        u, rel, steps = _solve_adjoint(lambda u: vjp_both(u)[0], v, config, u0)
        g_args = vjp_both(u)[1]
    probe_ct = jnp.stack([rel, steps.astype(rel.dtype)])
    factors_ct = jax.tree.map(jnp.zeros_like, factors)
    return jnp.zeros_like(z_star), g_args, factors_ct, probe_ct


_implicit_vjp.defvjp(_implicit_vjp_fwd, _implicit_vjp_bwd)


# --- forward and reverse mode: custom_jvp + custom_linear_solve --------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4))
def _implicit_jvp(f, z_star, args, factors, config):
    return z_star


@_implicit_jvp.defjvp
def _implicit_jvp_rule(f, config, primals, tangents):
    z_star, args, factors = primals
    args_dot = tangents[1]  # z* and the Broyden factors are constants (stopped)
    # Both Jacobian products come from ONE VJP of f at z*: J t and ∂f/∂args·ȧ as
    # transposes of the (linear) VJP. So f only needs reverse-mode rules (a cell with
    # custom_vjp pieces, e.g. deqjax.conv2d, works), and under reverse mode JAX
    # transposes them back to that VJP: grad costs what the custom_vjp path costs.
    # (integer leaves of args have float0 tangents and no place in a linear map)
    leaves, treedef = jax.tree.flatten(args)
    diff = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]

    def f_diff(z, diff_leaves):
        full = list(leaves)
        for i, x in zip(diff, diff_leaves):
            full[i] = x
        return f(z, jax.tree.unflatten(treedef, full))

    _, vjp_both = jax.vjp(f_diff, z_star, [leaves[i] for i in diff])
    jt = lambda u: vjp_both(u)[0]
    j_z = lambda t: jax.linear_transpose(jt, z_star)(t)[0]
    dots = jax.tree.leaves(args_dot)
    b = jax.linear_transpose(lambda u: vjp_both(u)[1], z_star)([dots[i] for i in diff])[0]

    def tangent_solve(matvec, b):  # (I − J) ż = b  as  ż = b + J ż
        start = _shine_start(factors, b, transpose=False)
        if config.backward == "shine":
            return start
        return _solve_adjoint(lambda t: t - matvec(t), b, config, start)[0]

    def adjoint_solve_(vecmat, v):  # (I − J)ᵀ u = v  as  u = v + Jᵀ u
        start = _shine_start(factors, v, transpose=True)
        if config.backward == "shine":
            return start
        return _solve_adjoint(lambda u: u - vecmat(u), v, config, start)[0]

    z_dot = lax.custom_linear_solve(
        lambda t: t - j_z(t), b, solve=tangent_solve, transpose_solve=adjoint_solve_
    )
    return z_star, z_dot


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def deq_fixed_point(
    f: Callable[[jax.Array, Any], jax.Array],
    z0: jax.Array,
    args: Any,
    config: DEQConfig = DEQConfig(),
    *,
    backward_probe: jax.Array | None = None,
    return_trajectory: bool = False,
    num_steps=None,
):
    """Solve ``z* = f(z*, args)`` for one example and make it differentiable.

    Args:
      f: the equilibrium cell of ONE example, ``f(z, args) -> z`` (one array of z's
        shape and dtype); ``args`` is any pytree (parameters, input injection, …)
        that gradients flow to.
      z0: the initial state (no gradient flows to it).
      args: the pytree passed to ``f``.
      config: a :class:`DEQConfig` (static).
      backward_probe: optional ``jnp.zeros(2)``; its gradient is the adjoint
        solve's ``[relative residual, steps]`` (implicit and SHINE modes). With a
        probe the implicit/SHINE backward is reverse-mode only (``custom_vjp``);
        without one it supports forward mode too (see the module docstring).
      return_trajectory: return the iterates ``z_1 … z_n`` in ``stats.trajectory``.
      num_steps: optional traced step budget (≤ ``config.forward.max_iter``).

    Returns:
      ``(z, stats)``: the equilibrium (after K phantom steps in phantom mode; all NaN
      when ``z0`` or ``args`` hold a non-finite value) and the forward
      :class:`~deqjax.solvers.SolverStats`.
    """
    check_config(config, DEQConfig, "deq_fixed_point's config")
    z0 = jnp.asarray(z0)
    if not jnp.issubdtype(z0.dtype, jnp.floating):
        raise ValueError(f"the initial state must be a float array, got dtype {z0.dtype}")
    # non-finite in => non-finite out: a NaN start state makes the solver return NaN
    z0 = jnp.where(all_finite(args), lax.stop_gradient(z0), jnp.nan)
    probe_term = 0.0 if backward_probe is None else 0.0 * jnp.sum(backward_probe)
    f_nograd = lambda z: f(z, lax.stop_gradient(args))
    if config.backward == "unroll":
        z, stats = solve(
            lambda z: f(z, args),
            z0,
            config.forward,
            return_trajectory=return_trajectory,
            differentiable=True,
            num_steps=num_steps,
        )
        return z + probe_term, stats
    shine = config.backward in SHINE_MODES
    z_star, stats = solve(
        f_nograd,
        z0,
        config.forward,
        return_trajectory=return_trajectory,
        num_steps=num_steps,
        return_inverse_jacobian=shine,
    )
    factors = lax.stop_gradient(stats.inverse_jacobian)
    stats = stats._replace(inverse_jacobian=None)
    z_star = lax.stop_gradient(z_star)
    if config.backward == "phantom":
        z = damped_steps(f, z_star, args, config.phantom_steps, config.phantom_damping)
        return z + probe_term, stats
    if backward_probe is None:
        return _implicit_jvp(f, z_star, args, factors, config), stats
    # inside shard_map the probe's cotangent varies like z*: so must the probe
    probe = vary_over(jnp.asarray(backward_probe), varying_axes(z_star))
    return _implicit_vjp(f, z_star, args, factors, probe, config), stats


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
