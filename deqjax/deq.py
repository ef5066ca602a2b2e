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
    StateLayout,
    apply_inverse_jacobian,
    check_config,
    check_int,
    check_real,
    is_array,
    manual_axes,
    solve,
    vary_over,
    varying_axes,
)

SHINE_MODES = ("shine", "shine_refine")
BACKWARD_MODES = ("implicit", "phantom", "unroll") + SHINE_MODES
ITERATIVE_ADJOINT_SOLVERS = ("fixed_point", "anderson", "broyden")
ADJOINT_SOLVERS = ("auto", "dense") + ITERATIVE_ADJOINT_SOLVERS + _jaxopt.KRYLOV_SOLVERS


@dataclasses.dataclass(frozen=True)
class DEQConfig:
    """Forward solver, backward mode and their settings (hashable, static).

    Attributes:
      forward: :class:`SolverConfig` of the forward solve.
      backward: ``"implicit"``, ``"shine"`` or ``"shine_refine"`` (these two need
        ``forward.method="broyden"``), ``"phantom"`` or ``"unroll"``.
      adjoint_solver: solver of the implicit adjoint system: ``"auto"`` (the
        default: ``"dense"`` for states of at most :data:`DENSE_ADJOINT_MAX_SIZE`
        unknowns, else ``"anderson"``), ``"dense"`` (the Jacobian from one batched
        VJP, then an LU solve), ``"fixed_point"``, ``"anderson"``, ``"broyden"``
        (deqjax's solvers on ``u ↦ v + Jᵀu``) or ``"gmres"``, ``"bicgstab"``,
        ``"normal_cg"`` (jaxopt).
      adjoint_max_iter, adjoint_tol: its budget (>= 1) and tolerance (relative
        residual, >= 0); ``adjoint_tol=0`` runs exactly ``adjoint_max_iter`` steps.
      adjoint_ridge_mode: Anderson's ridge in the adjoint solve, ``"relative"`` (the
        default) or ``"absolute"`` (see :class:`~deqjax.solvers.SolverConfig`); the
        adjoint solve otherwise inherits the forward's Anderson settings. The adjoint
        system ``u = v + Jᵀu`` is linear in the cotangent ``v``, so its solution must
        scale with ``v``: with the absolute ridge it does not — a small cotangent (a
        batch-mean loss, a confidently classified example) makes ``λ = ridge``
        dominate the Gram matrix and the solve inaccurate (docs/concepts/solvers.md,
        "Anderson's ridge"). ``"absolute"`` reproduces runs made before this option existed.
      phantom_steps, phantom_damping: K and λ of the phantom gradient.
    """

    forward: SolverConfig = SolverConfig()
    backward: str = "implicit"
    adjoint_solver: str = "auto"
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

    def adjoint_config(self, method: str | None = None) -> SolverConfig:
        """The :class:`SolverConfig` of an iterative adjoint solve (``method``: one of
        ``fixed_point``, ``anderson``, ``broyden``; default: this config's adjoint
        solver if it is one of them, else ``fixed_point``)."""
        method = method or self.adjoint_solver
        if method not in ITERATIVE_ADJOINT_SOLVERS:
            method = "fixed_point"
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


def damped_steps(f: Callable, z: Any, args: Any, steps: int, damping: float) -> Any:
    """``steps`` damped iterations ``z ← (1 − λ) z + λ f(z, args)`` (differentiable to
    any order); ``z`` may be a pytree. A ``lax.scan`` unrolled 8 steps at a time: the
    compile time no longer grows with ``steps`` (200 Python-unrolled steps took a
    minute to compile)."""

    def step(z, _):
        return jax.tree.map(lambda a, b: (1 - damping) * a + damping * b, z, f(z, args)), None

    steps = int(steps)
    return lax.scan(step, z, None, length=steps, unroll=min(steps, 8))[0]


# Below this many unknowns the adjoint (and tangent) systems are solved directly: the
# Jacobian is built with one batched VJP and factorised (adjoint_solver="auto").
DENSE_ADJOINT_MAX_SIZE = 48


def _mesh_in_context() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not getattr(mesh, "empty", True) and mesh.size > 1


def adjoint_method(config: DEQConfig, size: int) -> str:
    """The adjoint solver ``config`` uses for a state of ``size`` unknowns (resolves
    ``"auto"``: ``"dense"`` up to :data:`DENSE_ADJOINT_MAX_SIZE` unknowns outside a
    multi-device mesh, else ``"anderson"``).

    Under ``jax.set_mesh`` of several devices the dense solve (a batched LU inside the
    sharded, vmapped backward) hung XLA:CPU's SPMD program (2 forced devices, Explicit
    and Auto axes): ``"auto"`` avoids it there and an explicit ``"dense"`` is refused."""
    if config.adjoint_solver == "dense" and _mesh_in_context():
        raise ValueError(
            "adjoint_solver='dense' is not supported under a multi-device mesh "
            "(jax.set_mesh): its batched LU hung the sharded program in our tests; use "
            "adjoint_solver='auto' or 'anderson'"
        )
    if config.adjoint_solver != "auto":
        return config.adjoint_solver
    if size <= DENSE_ADJOINT_MAX_SIZE and not _mesh_in_context():
        return "dense"
    return "anderson"


def adjoint_solve(f: Callable, z_star: Any, args: Any, v: Any, config: DEQConfig):
    """Solve ``u = v + J_f(z*)ᵀ u`` for one example (``z_star``, ``v`` pytrees of the
    state's structure).

    Returns ``(u, rel_residual, steps)`` with the residual ``‖u − v − Jᵀu‖ / ‖v‖``
    measured after the solve, whatever the solver.
    """
    layout = StateLayout.of(z_star)
    flat_f = lambda zf: layout.ravel(f(layout.unravel(zf), args))
    _, vjp_z = jax.vjp(flat_f, layout.ravel(z_star))
    u, rel, steps = _solve_adjoint(lambda u: vjp_z(u)[0], layout.ravel(v), config)
    return layout.unravel(u), rel, steps


def _solve_adjoint(jt: Callable, v: jax.Array, config: DEQConfig, u0=None):
    """Solve ``u = v + jt(u)`` (``jt`` linear: ``u ↦ Jᵀu``, or ``u ↦ Ju`` for the
    tangent system; ``v`` a flat vector) by ``config``'s adjoint solver started from
    ``u0`` (default ``v``); ``(u, rel_residual, steps)``."""
    u0 = v if u0 is None else u0
    method = adjoint_method(config, v.size)
    if method == "dense":
        # (inside shard_map the basis must vary over the mesh axes v varies over)
        eye = vary_over(jnp.eye(v.size, dtype=v.dtype), varying_axes(v))
        # rows jt(e_i) stack to the matrix of jt transposed
        u = jnp.linalg.solve(eye - jax.vmap(jt)(eye).T, v)
        steps = jnp.asarray(1, jnp.int32)
        res = jnp.linalg.norm(u - v - jt(u))
    elif method in _jaxopt.KRYLOV_SOLVERS:
        if varying_axes(v) | varying_axes(jax.eval_shape(jt, v)):
            raise ValueError(
                f"adjoint_solver={config.adjoint_solver!r} (jaxopt's Krylov solvers, "
                "built on jax.scipy) does not type-check inside jax.shard_map with "
                "check_vma=True (its loop carry does not vary over the mesh); use "
                "adjoint_solver='fixed_point', 'anderson', 'broyden' or 'dense' there, "
                "or shard_map(..., check_vma=False)"
            )
        matvec = lambda u: u - jt(u)
        u = _jaxopt.krylov_solve(
            method, matvec, v, tol=config.adjoint_tol, maxiter=config.adjoint_max_iter, init=u0
        )
        steps = jnp.asarray(config.adjoint_max_iter, jnp.int32)
        res = jnp.linalg.norm(u - v - jt(u))
    else:
        u, st = solve(lambda u: v + jt(u), u0, config.adjoint_config(method))
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


def _better_start(k: Callable, b, start, candidate):
    """``candidate`` where it is a better start than ``start`` for ``x = b + K x``
    (smaller residual ``‖x − b − K x‖``), else ``start``; one batched product."""
    both = jnp.stack([start, vary_over(candidate.astype(start.dtype), varying_axes(start))])
    kx = jax.vmap(k)(both)
    res = jnp.linalg.norm((both - b - kx).reshape(2, -1), axis=-1)
    return jnp.where(res[1] < res[0], both[1], both[0])


def _linear_solvers(config: DEQConfig, factors, jt: Callable | None = None, adjoint_start=None):
    """``(tangent_solve, adjoint_solve)`` for ``lax.custom_linear_solve``: solvers of
    ``(I − J) ż = b`` and of ``(I − J)ᵀ u = v`` given the matvec ``x ↦ x − K x``
    (``K = J`` or ``Jᵀ``); each returns ``(x, (rel_residual, steps))``. With ``jt``
    (``u ↦ Jᵀu``) the adjoint solve iterates it directly rather than
    ``x − matvec(x)`` (the same map, without its rounding). ``adjoint_start``: a
    candidate start for the adjoint solve (used where it beats the default start)."""

    def one(transpose: bool):
        def run(matvec, b):  # solve x = b + K x
            if transpose and jt is not None:
                k = jt
            else:
                k = lambda x: x - matvec(x)
            start = _shine_start(factors, b, transpose=transpose)
            # (only the implicit backward passes an adjoint_start; the dense solve needs none)
            warm = transpose and adjoint_start is not None
            if warm and adjoint_method(config, b.size) != "dense":
                start = _better_start(k, b, b if start is None else start, adjoint_start)
            if config.backward == "shine":
                rel = jnp.linalg.norm(start - b - k(start)) / (jnp.linalg.norm(b) + 1e-12)
                x, steps = start, jnp.asarray(0, jnp.int32)
            else:
                x, rel, steps = _solve_adjoint(k, b, config, start)
            # inside shard_map every output of the linear solve varies like x
            return x, vary_over((rel, steps), varying_axes(x))

        return run

    return one(False), one(True)


def _partition_leaves(tree, keep: Callable[[Any], bool]):
    """``(kept, indices, merge)``: the leaves of ``tree`` for which ``keep`` holds, their
    positions, and ``merge(new_kept)`` putting replacements back among the others."""
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if keep(x)]

    def merge(kept):
        full = list(leaves)
        for i, x in zip(where, kept):
            full[i] = x
        return jax.tree.unflatten(treedef, full)

    return [leaves[i] for i in where], where, merge


def _is_inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


# --- forward and reverse mode, any order: custom_jvp + custom_linear_solve ----------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4))
def _implicit_jvp(g, z_star, params, factors, config):
    return z_star


@_implicit_jvp.defjvp
def _implicit_jvp_rule(g, config, primals, tangents):
    z_star, params, factors = primals
    params_dot = tangents[1]  # z* and the Broyden factors are constants (stopped)
    # The primal output is the implicit function itself, called again: under an outer
    # transformation (a Hessian, grad of grad, jvp of grad) it is differentiated by this
    # rule once more, so derivatives of every order are implicit ones.
    z = _implicit_jvp(g, z_star, params, factors, config)
    # Both Jacobian products come from ONE VJP of g at z*: J t and ∂g/∂params·ṗ as
    # transposes of the (linear) VJP. So g only needs reverse-mode rules (a cell with
    # custom_vjp pieces, e.g. deqjax.conv2d, works), and under reverse mode JAX
    # transposes them back to that VJP: grad costs what the custom_vjp path costs.
    # (integer leaves of params have float0 tangents and no place in a linear map)
    diff_leaves, diff, merge = _partition_leaves(params, _is_inexact)
    _, vjp_both = jax.vjp(lambda zz, d: g(zz, merge(d)), z, diff_leaves)
    jt = lambda u: vjp_both(u)[0]
    j_z = lambda t: jax.linear_transpose(jt, z)(t)[0]
    dots = jax.tree.leaves(params_dot)
    b = jax.linear_transpose(lambda u: vjp_both(u)[1], z)([dots[i] for i in diff])[0]
    tangent_solve, adjoint_solve_ = _linear_solvers(config, factors)
    z_dot, _ = lax.custom_linear_solve(
        lambda t: t - j_z(t), b, solve=tangent_solve, transpose_solve=adjoint_solve_, has_aux=True
    )
    return z, z_dot


# --- reverse mode with diagnostics: custom_vjp --------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _implicit_vjp(g, z_star, params, factors, probe, adjoint_init, config):
    return z_star


def _implicit_vjp_fwd(g, z_star, params, factors, probe, adjoint_init, config):
    # the implicit custom_jvp, so an outer transformation sees z*'s true derivative
    z = _implicit_jvp(g, z_star, params, factors, config)
    return z, (z, params, factors, probe, adjoint_init)


def _implicit_vjp_bwd(g, config, res, v):
    z, params, factors, probe, adjoint_init = res
    # One linearisation serves the adjoint iterations (their unused params-cotangent
    # is dead code XLA removes from the loop body) and the final params-VJP. The
    # adjoint is a custom_linear_solve, so this backward is itself differentiable
    # (grad of grad, Hessians through a probe or the Flax DEQ).
    _, vjp_both = jax.vjp(g, z, params)
    if config.backward == "shine":  # no solve: u = −Hᵀv, and ONE VJP also gives Jᵀu
        u = _shine_start(factors, v, transpose=True)
        jt_u, g_params = vjp_both(u)
        rel = jnp.linalg.norm(u - v - jt_u) / (jnp.linalg.norm(v) + 1e-12)
        steps = jnp.asarray(0, jnp.int32)
    else:
        jt = lambda u: vjp_both(u)[0]
        tangent_solve, adjoint_solve_ = _linear_solvers(config, factors, jt, adjoint_init)
        u, (rel, steps) = lax.custom_linear_solve(
            lambda u: u - jt(u),
            v,
            solve=adjoint_solve_,
            transpose_solve=tangent_solve,
            has_aux=True,
        )
        g_params = vjp_both(u)[1]
    probe_ct = lax.stop_gradient(jnp.stack([rel, steps.astype(rel.dtype)]))
    factors_ct = jax.tree.map(jnp.zeros_like, factors)
    # the adjoint's "cotangent" is the solved adjoint: the next call's start
    adjoint_ct = None if adjoint_init is None else lax.stop_gradient(u).astype(adjoint_init.dtype)
    return jnp.zeros_like(z), g_params, factors_ct, probe_ct.astype(probe.dtype), adjoint_ct


_implicit_vjp.defvjp(_implicit_vjp_fwd, _implicit_vjp_bwd)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool)."""
    leaves = [
        jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if is_array(x) and _is_inexact(x)
    ]
    # a chain of ands, not jnp.all(jnp.stack(...)): under vmap on an Explicit-axis mesh
    # stacking a batched (sharded) flag with an unbatched one is a sharding type error
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def _as_flat_cell(f, z0, args, layout: StateLayout, has_aux: bool):
    """``(g, g_aux, params)``: the user's ``f(z, args)`` as ``g(z_flat, params)`` on
    the flat compute-dtype state, with every array it depends on — the array leaves
    of ``args`` AND the tracers it closes over (``jax.closure_convert``) — in the
    pytree ``params``, so that each is differentiated exactly as ``args`` are."""
    # the array leaves (traced, differentiable); functions, strings and Python numbers
    # stay constants, closed over
    arrays, _, rebuild = _partition_leaves(args, is_array)

    def f_arrays(z, arrays):
        out = f(z, rebuild(arrays))
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "with has_aux=True, f must return a pair (next state, aux), got "
                    f"{type(out).__name__}"
                )
            return out
        return out, None

    # Inside jax.shard_map the traced function is replayed with the state varying over
    # the mesh axes (the solver's carry does): trace and call it with the state and
    # args cast to vary over every manual axis in scope, so the replay type-checks.
    axes = manual_axes()
    vary = lambda tree: vary_over(tree, axes)
    converted, hoisted = jax.closure_convert(f_arrays, vary(z0), vary(arrays))
    params = (arrays, list(hoisted))

    def g_tree(z, params):
        arrays, hoisted = params
        return converted(vary(z), vary(arrays), *hoisted)

    def g(zf, params):
        out, _ = g_tree(layout.unravel(zf), params)
        layout.check_output(out)
        return layout.ravel(out)

    def g_aux(zf, params):
        return g_tree(layout.unravel(zf), params)[1]

    return g, g_aux, params


def _check_adjoint_init(adjoint_init, z0, config: DEQConfig) -> None:
    if config.backward != "implicit":
        raise ValueError(
            f"adjoint_init starts the implicit backward's adjoint solve; backward="
            f"{config.backward!r} runs none. Use backward='implicit' or drop adjoint_init"
        )
    shapes = lambda t: jax.tree.map(jnp.shape, t)
    if jax.tree.structure(adjoint_init) != jax.tree.structure(z0) or shapes(adjoint_init) != shapes(
        z0
    ):
        raise ValueError(
            f"adjoint_init must have z0's structure and shapes {shapes(z0)}, got "
            f"{shapes(adjoint_init)}"
        )


def deq_fixed_point(
    f: Callable[[Any, Any], Any],
    z0: Any,
    args: Any,
    config: DEQConfig = DEQConfig(),
    *,
    has_aux: bool = False,
    backward_probe: jax.Array | None = None,
    return_trajectory: bool = False,
    num_steps=None,
    adjoint_init: Any = None,
):
    """Solve ``z* = f(z*, args)`` for one example and make it differentiable.

    Args:
      f: the equilibrium cell of ONE example, ``f(z, args) -> z`` with the state's
        structure, shapes and dtypes (``f(z, args) -> (z, aux)`` with
        ``has_aux=True``). Arrays it closes over are differentiated exactly as
        ``args`` are (closure conversion), so ``lambda z, _: jnp.tanh(W @ z + x)``
        gets the gradients of ``W`` and ``x``.
      z0: the initial state: an array or any pytree of real float arrays (no gradient
        flows to it). bfloat16/float16 states are iterated in float32.
      args: any pytree passed to ``f``; its array leaves are differentiable (integer
        ones have float0 tangents), other leaves (functions, strings, numbers) are
        constants.
      config: a :class:`DEQConfig` (static).
      has_aux: ``f`` returns ``(z, aux)``; ``aux`` at the fixed point is returned.
      backward_probe: optional ``jnp.zeros(2)``; its gradient is the adjoint
        solve's ``[relative residual, steps]`` (implicit and SHINE modes). With a
        probe the implicit/SHINE backward is a ``custom_vjp`` (reverse mode, any order;
        ``jax.jvp`` of it is refused by JAX); without one it supports forward mode too.
      return_trajectory: return the iterates ``z_1 … z_n`` in ``stats.trajectory``.
      num_steps: optional traced step budget (≤ ``config.forward.max_iter``).
      adjoint_init: optional candidate start of the adjoint solve, structured like
        ``z0`` (implicit backward only; reverse mode: the backward is then a
        ``custom_vjp``). Its gradient is the solved adjoint ``u`` of
        ``u = ∂L/∂z* + Jᵀu``: pass it back in at the next, nearby call (module
        docstring, "Warm-started adjoint").

    Returns:
      ``(z, stats)`` — ``((z, aux), stats)`` with ``has_aux`` — : the equilibrium (after
      K phantom steps in phantom mode; all NaN when ``z0`` or ``args`` hold a
      non-finite value) and the forward :class:`~deqjax.solvers.SolverStats`.
    """
    check_config(config, DEQConfig, "deq_fixed_point's config")
    if adjoint_init is not None:
        _check_adjoint_init(adjoint_init, z0, config)
    layout = StateLayout.of(z0)
    g, g_aux, params = _as_flat_cell(f, z0, args, layout, has_aux)
    zf0 = layout.ravel(z0)
    # non-finite in => non-finite out: a NaN start state makes the solver return NaN
    zf0 = jnp.where(all_finite(params), lax.stop_gradient(zf0), jnp.nan)
    probe_term = 0.0 if backward_probe is None else 0.0 * jnp.sum(backward_probe)
    stopped = lax.stop_gradient(params)
    trajectory_stats = lambda st: st._replace(
        trajectory=None if st.trajectory is None else jax.vmap(layout.unravel)(st.trajectory)
    )

    def finish(zf, stats):
        z = layout.unravel(zf + probe_term)
        stats = trajectory_stats(stats)
        return ((z, g_aux(zf, params)) if has_aux else z), stats

    if config.backward == "unroll":
        zf, stats = solve(
            lambda zf: g(zf, params),
            zf0,
            config.forward,
            return_trajectory=return_trajectory,
            differentiable=True,
            num_steps=num_steps,
        )
        return finish(zf, stats)
    shine = config.backward in SHINE_MODES
    z_star, stats = solve(
        lambda zf: g(zf, stopped),
        zf0,
        config.forward,
        return_trajectory=return_trajectory,
        num_steps=num_steps,
        return_inverse_jacobian=shine,
    )
    factors = lax.stop_gradient(stats.inverse_jacobian)
    stats = stats._replace(inverse_jacobian=None)
    z_star = lax.stop_gradient(z_star)
    if config.backward == "phantom":
        zf = damped_steps(g, z_star, params, config.phantom_steps, config.phantom_damping)
        return finish(zf, stats)
    if adjoint_init is not None:
        adjoint_init = vary_over(layout.ravel(adjoint_init), varying_axes(z_star))
        if backward_probe is None:
            backward_probe = jnp.zeros(2, zf0.dtype)
    elif backward_probe is None:
        return finish(_implicit_jvp(g, z_star, params, factors, config), stats)
    # inside shard_map the probe's cotangent varies like z*: so must the probe
    probe = vary_over(jnp.asarray(backward_probe), varying_axes(z_star))
    zf = _implicit_vjp(g, z_star, params, factors, probe, adjoint_init, config)
    return finish(zf, stats)


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
