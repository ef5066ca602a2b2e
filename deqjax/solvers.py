"""Per-sample fixed-point solvers: damped iteration, Anderson acceleration, Broyden.

Every solver finds ``z* = f(z*)`` for ONE example: ``f`` maps an array of any shape
to an array of the same shape. Batching is ``jax.vmap`` over the solve; under vmap a
``lax.while_loop`` keeps iterating while any example is unconverged, but every
example's state is frozen from the step its own residual passed the tolerance, so a
slow example never changes the answer of a fast one and every example reports its
own iteration count and residual (docs/concepts/solvers.md).

Stopping: the residual of the evaluated iterate ``z_k``,
``abs = ‖f(z_k) − z_k‖`` and ``rel = ‖f(z_k) − z_k‖ / ‖f(z_k)‖``, is compared with
``tol`` (``stop_mode`` picks which). ``tol=0`` never stops early: the solver runs
exactly ``max_iter`` evaluations of ``f`` (what benchmarks need). The returned state
is the evaluated iterate with the lowest residual (as in Bai et al.'s DEQ solvers),
so a solver that starts to diverge still returns its best point, and the statistics
are exact for the point returned.

**Non-finite values** (non-finite in => non-finite out, never a made-up
finite answer). A non-finite ``z0``, or a non-finite value in any ``f(z_k)`` the
solver evaluates for an example still running, ends that example's solve: its
returned state is all NaN, its residuals NaN and ``converged`` False (under vmap the
other examples are unaffected). No finite "best" iterate is returned from such a
solve: ``solve`` only sees ``f``, and cannot tell a NaN input closed over by ``f``
from an iteration that ran off to overflow, so both are reported the same way.
A breakdown of the solver's own update (e.g. an exactly singular Anderson system
at ``anderson_ridge=0`` once the residuals vanish) is not ``f``'s: that step falls
back to the plain step ``z ← f(z)``.

Solvers (one "step" is one evaluation of ``f`` and one update):

* ``"fixed_point"``: ``z ← (1 − λ) z + λ f(z)`` (λ = ``damping``).
* ``"anderson"`` (Walker & Ni 2011; the DEQ form of Bai et al. 2019): keep the last
  ``m`` pairs ``(z_i, f(z_i))``, ``G_i = f(z_i) − z_i``; solve
  ``min_α ‖Σ α_i G_i‖² + λ‖α‖²`` s.t. ``Σ α_i = 1`` and set
  ``z ← β Σ α_i f(z_i) + (1 − β) Σ α_i z_i``. The regulariser is relative to the
  problem: ``λ = ridge · tr(GGᵀ)/m'`` (``m'`` the number of stored pairs, i.e. ridge
  times their mean squared residual), so it stays a fixed fraction of the Gram
  matrix as the residuals shrink. An absolute ``λ = ridge`` (Bai et al.'s code,
  ``anderson_ridge_mode="absolute"``) dominates the Gram matrix once
  ``‖G‖² ≪ ridge`` and turns Anderson into a slow averaging of recent iterates.
  ``ridge = 0`` is unregularised Anderson in either mode.
* ``"broyden"`` (Broyden 1965, "good" update, as used by Bai et al. 2019): root of
  ``g(z) = f(z) − z`` with an inverse-Jacobian estimate ``H = −I + U Vᵀ`` kept as
  low-rank factors, ``z ← z − H g(z)``, Sherman–Morrison update
  ``H ← H + (Δz − H Δg) Δzᵀ H / (Δzᵀ H Δg)``; memory of ``memory`` updates, oldest
  overwritten.

``solve(..., differentiable=True)`` runs the same steps in a ``lax.scan`` with
per-example masking, so reverse-mode autodiff can go through every step (the
``unroll`` backward of :mod:`deqjax.deq`).

Inside ``jax.shard_map`` (with its default ``check_vma=True``) the loop's initial
carry is cast to vary over the same mesh axes as the values ``f`` produces, so a
solve whose ``f`` closes over sharded data type-checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SOLVERS = ("fixed_point", "anderson", "broyden")
STOP_MODES = ("abs", "rel")
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Settings of a forward (or adjoint) fixed-point solve. Hashable: pass it
    as a static argument.

    Attributes:
      method: ``"fixed_point"``, ``"anderson"`` or ``"broyden"``.
      max_iter: maximum number of evaluations of ``f``.
      tol: stopping tolerance on the residual picked by ``stop_mode``; 0 runs
        exactly ``max_iter`` steps.
      stop_mode: ``"rel"`` (‖f(z)−z‖/‖f(z)‖) or ``"abs"`` (‖f(z)−z‖). The relative
        residual is scale-free, so a solve that runs off towards ‖z‖ → ∞ can
        make it small; use ``"abs"`` where states are not normalised.
      damping: λ of the damped fixed-point iteration.
      anderson_m: Anderson memory m.
      anderson_ridge: Anderson's Tikhonov regulariser (see ``anderson_ridge_mode``).
      anderson_ridge_mode: ``"relative"`` (λ = ridge · the mean squared residual of
        the stored pairs, the default) or ``"absolute"`` (λ = ridge).
      anderson_beta: Anderson mixing β.
      broyden_memory: number of low-rank updates Broyden keeps (0 = max_iter; never
        more than max_iter). The default 50 bounds a step's cost (O(memory · n)) for
        large budgets (a step pays for the whole memory, filled or not) and lost
        little: steps to 1e-10 on affine and tanh maps (n = 12–200, max_iter 500)
        equalled full memory's except once (86 vs 67), while memories of 10–30 failed
        to converge on three of them (``python -m benchmarks.broyden_memory``).
      return_state: ``"best"`` (the evaluated iterate with the lowest residual) or
        ``"last"`` (the latest iterate ``z_n``, after the final update; its stats
        are those of the last evaluated iterate ``z_{n-1}``). Random intermediate
        states need ``"last"``.
    """

    method: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    stop_mode: str = "rel"
    damping: float = 1.0
    anderson_m: int = 5
    anderson_ridge: float = 1e-4
    anderson_beta: float = 1.0
    broyden_memory: int = 50
    return_state: str = "best"
    anderson_ridge_mode: str = "relative"

    def __post_init__(self):
        for name in ("max_iter", "anderson_m", "broyden_memory"):
            check_int(name, getattr(self, name))
        for name in ("tol", "damping", "anderson_ridge", "anderson_beta"):
            check_real(name, getattr(self, name))
        if self.return_state not in ("best", "last"):
            raise ValueError(f"return_state must be 'best' or 'last', got {self.return_state!r}")
        if self.method not in SOLVERS:
            raise ValueError(f"unknown solver method {self.method!r}; choose one of {SOLVERS}")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"unknown stop_mode {self.stop_mode!r}; choose one of {STOP_MODES}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0 <= self.tol < float("inf"):
            raise ValueError(
                f"tol must be finite and >= 0 (0 = run exactly max_iter steps), got {self.tol}"
            )
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.anderson_m < 1:
            raise ValueError(f"anderson_m must be >= 1, got {self.anderson_m}")
        if self.broyden_memory < 0:
            raise ValueError(
                f"broyden_memory must be >= 0 (0 = max_iter), got {self.broyden_memory}"
            )
        if not 0 <= self.anderson_ridge < float("inf"):
            raise ValueError(f"anderson_ridge must be finite and >= 0, got {self.anderson_ridge}")
        if self.anderson_ridge_mode not in ("relative", "absolute"):
            raise ValueError(
                f"anderson_ridge_mode must be 'relative' or 'absolute', "
                f"got {self.anderson_ridge_mode!r}"
            )
        if not 0 < self.anderson_beta <= 1:
            raise ValueError(f"anderson_beta must be in (0, 1], got {self.anderson_beta}")


def check_int(name: str, value) -> None:
    """A config field that must be a Python/NumPy integer (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def check_real(name: str, value) -> None:
    """A config field that must be a real number (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")


class SolverStats(NamedTuple):
    """Per-example statistics of a solve (under vmap every field gains a batch axis).

    steps: evaluations of ``f`` performed; abs_residual / rel_residual: residual of
    the returned iterate (NaN after a non-finite value); converged: residual below tol
    (False after a non-finite value); trajectory: the iterates ``z_1 … z_n`` after each
    update (``(max_iter, *z.shape)``; rows past the stop repeat the returned state) or
    ``None`` when not requested; inverse_jacobian: with
    ``solve(..., return_inverse_jacobian=True)`` and Broyden, the factors ``(U, V)``
    (each ``(memory, z.size)``) of its final estimate ``H = −I + Uᵀ V`` of the inverse
    Jacobian of ``g(z) = f(z) − z`` (apply it with :func:`apply_inverse_jacobian`),
    else ``None``.
    """

    steps: jax.Array
    abs_residual: jax.Array
    rel_residual: jax.Array
    converged: jax.Array
    trajectory: Any = None
    inverse_jacobian: Any = None


# --- per-method update rules ----------------------------------------------------
# Each method is (init(z_flat) -> state, update(state, z, fz, k, go) -> (z_next, state)).
# z, fz are flat vectors; k is the index of the current step (0-based); go: whether this
# example is still running (under vmap, stopped examples keep being stepped).


def _fixed_point_rules(cfg: SolverConfig, n: int, dtype):
    lam = cfg.damping

    def init(z):
        return ()

    def update(state, z, fz, k, go):
        return (1 - lam) * z + lam * fz, state

    return init, update


def _anderson_rules(cfg: SolverConfig, n: int, dtype):
    """Anderson mixing (Walker & Ni 2011) over the last ``m`` iterates. The state keeps
    the residual history ``G`` (rows ``g_i = f(x_i) − x_i``) and its Gram matrix
    ``GGᵀ``, updated one row and column per step (``m·n`` work instead of recomputing
    ``m²·n``: measured 6× less solver overhead at batch 64, n = 6272)."""
    m, ridge, beta = int(cfg.anderson_m), cfg.anderson_ridge, cfg.anderson_beta
    # ridge 0 is unregularised Anderson, bit for bit, in either mode
    relative = cfg.anderson_ridge_mode == "relative" and ridge > 0
    tiny = jnp.finfo(dtype).tiny

    keep_x = beta != 1.0  # the iterates themselves are only needed for damped mixing

    def init(z):
        return (
            jnp.zeros((m if keep_x else 0, n), dtype),
            jnp.zeros((m, n), dtype),
            jnp.zeros((m, n), dtype),
            jnp.zeros((m, m), dtype),
        )

    def update(state, z, fz, k, go):
        xs, fs, gs, gram = state
        slot = k % m
        g_new = fz - z
        xs = xs.at[slot].set(z) if keep_x else xs
        fs = fs.at[slot].set(fz)
        gs = gs.at[slot].set(g_new)
        row = gs @ g_new  # unused slots hold zero rows
        gram = gram.at[slot, :].set(row).at[:, slot].set(row)
        valid = (jnp.arange(m, dtype=k.dtype) <= k).astype(dtype)
        # Bordered system [[0, 1ᵀ], [1, H]] [μ, α] = [1, 0], with unused slots
        # forced to α_i = 0 (their row becomes α_i = 0, their column is zero).
        h = gram * (valid[:, None] * valid[None, :])
        if relative:
            # H / (tr H / m') + ridge I: the same α as H + ridge (tr H / m') I (scaling H
            # scales only μ), and an O(1) system whatever the size of the residuals
            scale = jnp.sum(jnp.diag(h)) / jnp.sum(valid)
            h = h / jnp.maximum(scale, tiny)
        h = h + jnp.diag(ridge * valid + (1.0 - valid))
        a = jnp.zeros((m + 1, m + 1), dtype)
        a = a.at[0, 1:].set(valid).at[1:, 0].set(valid).at[1:, 1:].set(h)
        # (rhs built from `a`, so that under vmap it is batched like `a`: an unbatched
        # rhs meets the batched LU pivots in a gather that Explicit meshes refuse)
        rhs = (0.0 * a[0]).at[0].set(1.0)  # a[0] = [0, valid]: finite
        alpha = jnp.linalg.solve(a, rhs)[1:]
        z_next = beta * (alpha @ fs) + (1 - beta) * (alpha @ xs) if keep_x else alpha @ fs
        return z_next, (xs, fs, gs, gram)

    return init, update


def _apply_h(us, vts, x):  # H x = −x + Uᵀ (V x)
    return -x + us.T @ (vts @ x)


def _apply_ht(us, vts, x):  # Hᵀ x = −x + Vᵀ (U x)
    return -x + vts.T @ (us @ x)


def apply_inverse_jacobian(factors, x: jax.Array, *, transpose: bool = False) -> jax.Array:
    """``H x`` (or ``Hᵀ x``) for Broyden's final estimate ``H = −I + UᵀV`` of the
    inverse Jacobian ``(J_f − I)⁻¹`` of ``g(z) = f(z) − z``, with ``factors = (U, V)``
    from ``solve(..., return_inverse_jacobian=True)``'s stats; ``x`` has the state's
    shape (one example)."""
    us, vts = factors
    xf = x.reshape(-1)
    out = _apply_ht(us, vts, xf) if transpose else _apply_h(us, vts, xf)
    return out.reshape(x.shape)


def _broyden_rules(cfg: SolverConfig, n: int, dtype):
    mem = min(int(cfg.broyden_memory) or int(cfg.max_iter), int(cfg.max_iter))
    eps = jnp.finfo(dtype).eps

    def init(z):
        return (
            jnp.zeros((mem, n), dtype),
            jnp.zeros((mem, n), dtype),
            jnp.zeros((n,), dtype),
            jnp.zeros((n,), dtype),
        )

    def update(state, z, fz, k, go):
        us, vts, z_prev, g_prev = state
        g = fz - z

        def with_update(_):
            dz, dg = z - z_prev, g - g_prev
            h_dg = _apply_h(us, vts, dg)
            dz_h = _apply_ht(us, vts, dz)
            denom = dz_h @ dg
            # skipped only when Δz H and Δg are orthogonal to machine precision (an
            # absolute threshold would freeze H once the steps get small)
            bound = jnp.linalg.norm(dz_h) * jnp.linalg.norm(dg)
            safe = jnp.abs(denom) > eps * bound
            denom = jnp.where(safe, denom, 1.0)
            u_new = jnp.where(safe, (dz - h_dg) / denom, 0.0)
            v_new = jnp.where(safe, dz_h, 0.0)
            # a stopped example's estimate stays that of its own solve (SHINE reads it):
            # one row per step is masked, not the whole history
            slot = (k - 1) % mem
            u_new = jnp.where(go, u_new, us[slot])
            v_new = jnp.where(go, v_new, vts[slot])
            return us.at[slot].set(u_new), vts.at[slot].set(v_new)

        us, vts = lax.cond(k > 0, with_update, lambda _: (us, vts), None)
        z_next = z - _apply_h(us, vts, g)
        return z_next, (us, vts, z, g)

    return init, update


_RULES = {"fixed_point": _fixed_point_rules, "anderson": _anderson_rules, "broyden": _broyden_rules}


class _Carry(NamedTuple):
    t: jax.Array  # steps taken by the loop (shared by a batch: never vmapped)
    k: jax.Array  # steps taken by this example (frozen once it stops)
    z: jax.Array
    best_z: jax.Array
    best_res: jax.Array  # the residual used for stopping
    best_abs: jax.Array
    best_rel: jax.Array
    last_abs: jax.Array
    last_rel: jax.Array
    bad: jax.Array  # a non-finite z0 or f(z_k) was seen: the result is NaN
    method_state: Any
    trajectory: Any


@jax.custom_batching.custom_vmap
def any_in_batch(active: jax.Array) -> jax.Array:
    """``active`` for one example; under ``vmap``, whether ANY example of the batch
    is active, as an unbatched scalar (nested vmaps reduce over every batch axis).

    The solver loop's predicate. Under vmap, a ``lax.while_loop`` whose predicate
    differs between examples runs while any is true and wraps every step in a
    per-example ``select`` over the WHOLE carry, Anderson's and Broyden's ``m × n``
    histories included (measured: 3 ms per step at batch 64, n = 6272 on one
    CPU core, 13× the cost of the update itself). With this predicate the loop is
    unbatched and the step freezes the small per-example state itself.
    """
    return active


@any_in_batch.def_vmap
def _any_in_batch_vmap(axis_size, in_batched, active):
    (batched,) = in_batched
    return any_in_batch(jnp.any(active, axis=0) if batched else active), False


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes an array (or a ``ShapeDtypeStruct``) varies over."""
    mat = getattr(x, "manual_axis_type", None) or getattr(jax.typeof(x), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def vary_over(tree, axes: frozenset):
    """Cast every array of ``tree`` to vary over the ``shard_map`` mesh ``axes``
    (``lax.pcast(..., to="varying")`` for the axes it does not vary over yet).

    A loop carry initialised from constants (zeros, counters) is invariant across
    the mesh, while the loop body's output varies wherever ``f`` reads sharded data;
    ``shard_map``'s default ``check_vma=True`` requires the two types to be equal."""
    if not axes:
        return tree

    def one(x):
        missing = tuple(sorted(axes - varying_axes(x), key=str))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, tree)


def with_context_mesh(tree):
    """Every array of ``tree`` passed through a no-op (``x + 0``, ``x | False``).

    Under ``vmap`` on an Explicit-axis mesh (``jax.make_mesh`` + ``jax.set_mesh``), a
    loop carry initialised from a constant (``jnp.zeros``, ``jnp.asarray(0)``) has an
    abstract value without the mesh, and the loop's batching rule fails when it
    batches that carry ("Resource axis: data ... is not found in mesh: ()"). Any
    operation gives the value the context mesh; XLA removes the no-op."""

    def one(x):
        x = jnp.asarray(x)
        return x | False if x.dtype == jnp.bool_ else x + jnp.zeros((), x.dtype)

    return jax.tree.map(one, tree)


def batch_axis_spec(x):
    """The Explicit-mesh axes the leading (batch) axis of ``x`` is sharded over, from
    its type; ``None`` without a mesh, on Auto axes, or when it is replicated."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec[0] if spec else None


def batch_sharded_like(x, ref):
    """``x`` (batch-major) resharded so that its leading axis is sharded like ``ref``'s
    (other axes replicated); unchanged when it already is, and for scalars.

    On an Explicit-axis mesh ``vmap`` requires every mapped input to share the
    sharding of the mapped axis; an array built inside the program (zeros, split
    keys) is replicated, while the batch it is mapped with is sharded. Elsewhere
    (no mesh, Auto axes: the sharding is not part of the type) ``x`` is returned."""
    want = batch_axis_spec(ref)
    if jnp.ndim(x) == 0 or want == batch_axis_spec(x):
        return x
    spec = jax.sharding.PartitionSpec(want, *([None] * (jnp.ndim(x) - 1)))
    return jax.sharding.reshard(x, spec)


def manual_axes() -> frozenset:
    """The ``shard_map`` (manual) mesh axes in scope; empty outside ``shard_map``."""
    return frozenset(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))


def check_config(config, expected: type, where: str) -> None:
    """A clear ``TypeError`` when a config of the wrong class is passed."""
    if not isinstance(config, expected):
        raise TypeError(
            f"{where} expects a {expected.__name__}, got {type(config).__name__}"
            + (
                " (a SolverConfig configures one solve; wrap it as DEQConfig(forward=...))"
                if type(config).__name__ == "SolverConfig" and expected.__name__ == "DEQConfig"
                else ""
            )
        )


def is_array(x) -> bool:
    """A JAX or NumPy array (or NumPy scalar): a leaf that can be traced."""
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def compute_dtype(dtype) -> np.dtype:
    """The dtype a solver computes in for states of ``dtype``: at least float32
    (bfloat16/float16 states are iterated, and their norms and small linear systems
    solved, in float32; the state is cast back when ``f`` is called)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(jnp.float32)


class StateLayout(NamedTuple):
    """How a pytree state (``z0`` of any structure of real float arrays) maps to the
    flat vector a solver iterates on, in the compute dtype of its leaves (at least
    float32). One array of float32/float64 is only reshaped."""

    treedef: Any
    shapes: tuple
    dtypes: tuple
    dtype: Any  # the flat vector's (compute) dtype
    size: int

    @classmethod
    def of(cls, z0: Any, what: str = "the initial state") -> StateLayout:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(z0)
        if not leaves:
            raise ValueError(f"{what} is an empty pytree: give at least one float array")
        shapes, dtypes = [], []
        for path, leaf in leaves:
            where = f"{what}{jax.tree_util.keystr(path)}"
            if not is_array(leaf) and not isinstance(leaf, float):
                raise TypeError(
                    f"{where} must be a float array, got {type(leaf).__name__}: every leaf "
                    "of the state is iterated (put non-array data in args)"
                )
            dtype = jnp.result_type(leaf)
            if jnp.issubdtype(dtype, jnp.complexfloating):
                raise TypeError(
                    f"{where} is complex ({dtype}); complex states are not supported: "
                    "iterate the real and imaginary parts as a pytree state (re, im)"
                )
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{where} must be a float array, got dtype {dtype}")
            shapes.append(tuple(jnp.shape(leaf)))
            dtypes.append(np.dtype(dtype))
        # the widest leaf's compute dtype (no implicit promotion: strict mode allows none)
        work = max((compute_dtype(d) for d in dtypes), key=lambda d: d.itemsize)
        size = int(sum(int(np.prod(s)) for s in shapes))
        return cls(treedef, tuple(shapes), tuple(dtypes), np.dtype(work), size)

    def ravel(self, tree) -> jax.Array:
        leaves = [jnp.ravel(x).astype(self.dtype) for x in jax.tree.leaves(tree)]
        return leaves[0] if len(leaves) == 1 else jnp.concatenate(leaves)

    def unravel(self, flat: jax.Array) -> Any:
        sizes = [int(np.prod(s)) for s in self.shapes]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
        leaves = [p.reshape(s).astype(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]
        return jax.tree.unflatten(self.treedef, leaves)

    def check_output(self, out, where: str = "f") -> None:
        """At trace time: ``out`` has the state's structure, shapes and dtypes (a wrong
        dtype would otherwise be cast silently, or promote the whole solve)."""
        if jax.tree.structure(out) != self.treedef:
            got = jax.tree.map(lambda x: getattr(x, "shape", type(x).__name__), out)
            raise TypeError(
                f"{where} must return a state of the same structure as z0 "
                f"({self.treedef}), got {jax.tree.structure(out)} {got}"
            )
        for leaf, shape, dtype in zip(jax.tree.leaves(out), self.shapes, self.dtypes):
            if not is_array(leaf):
                raise TypeError(f"{where} must return arrays, got {type(leaf).__name__}")
            if leaf.shape != shape:
                raise ValueError(
                    f"{where} must map the state shape {shape} to itself, got {leaf.shape}"
                )
            if leaf.dtype != dtype:
                raise TypeError(
                    f"{where} must return the state's dtype {dtype} (that of z0), got "
                    f"{leaf.dtype}: cast the parameters (or z0) so that f(z) has z's dtype"
                )

    def flat_function(self, f: Callable) -> Callable:
        """``f`` on the flat compute-dtype vector, its output checked."""

        def f_flat(zf):
            out = f(self.unravel(zf))
            self.check_output(out)
            return self.ravel(out)

        return f_flat


def solve(
    f: Callable[[jax.Array], jax.Array],
    z0: jax.Array,
    config: SolverConfig = SolverConfig(),
    *,
    return_trajectory: bool = False,
    differentiable: bool = False,
    num_steps=None,
    return_inverse_jacobian: bool = False,
):
    """Find a fixed point ``z* = f(z*)`` of a single example.

    Args:
      f: function of one example's state (any shape) to one array of the same shape
        and dtype.
      z0: initial state.
      config: a :class:`SolverConfig`.
      return_trajectory: also return the iterates ``z_1 … z_n`` in the stats.
      differentiable: run as a masked ``lax.scan`` of ``max_iter`` steps so that
        reverse-mode autodiff goes through the solver (the ``unroll`` backward);
        otherwise a ``lax.while_loop`` that stops at convergence.
      num_steps: optional traced integer ≤ ``max_iter``: stop after this many steps
        (random intermediate states draw it per batch).
      return_inverse_jacobian: (Broyden only) return the factors of its final
        inverse-Jacobian estimate in ``stats.inverse_jacobian`` (the SHINE backward).

    Returns:
      ``(z_star, stats)``, ``z_star`` of ``z0``'s shape, ``stats`` a :class:`SolverStats`.

    Under ``vmap`` the loop runs until every example has stopped; an example that has
    stopped keeps its state, step count and residuals (the per-method history of a
    stopped example may change, but it no longer feeds its state).
    """
    check_config(config, SolverConfig, "solve's config")
    if return_inverse_jacobian and config.method != "broyden":
        raise ValueError(
            f"return_inverse_jacobian needs the Broyden solver, got method={config.method!r}"
        )
    layout = StateLayout.of(z0)
    dtype, n = layout.dtype, layout.size
    init, update = _RULES[config.method](config, n, dtype)
    tol = jnp.asarray(config.tol, dtype)
    use_rel = config.stop_mode == "rel"
    f_flat = layout.flat_function(f)

    budget = (
        jnp.asarray(config.max_iter, jnp.int32)
        if num_steps is None
        else jnp.minimum(jnp.asarray(num_steps).astype(jnp.int32), config.max_iter)
    )

    def done(c: _Carry):
        return c.best_res < tol

    def active(c: _Carry):
        return jnp.logical_and(c.k < budget, jnp.logical_not(done(c) | c.bad))

    def step(c: _Carry) -> _Carry:
        go = active(c)
        keep = lambda new, old: jnp.where(go, new, old)
        fz = f_flat(c.z)
        # Residuals are statistics, never differentiated (avoids 0/0 in norm's VJP).
        fz_s, z_s = lax.stop_gradient(fz), lax.stop_gradient(c.z)
        finite = jnp.all(jnp.isfinite(fz_s))
        diff = jnp.linalg.norm(fz_s - z_s)
        rel = diff / (jnp.linalg.norm(fz_s) + _EPS)
        res = rel if use_rel else diff
        better = go & finite & (res < c.best_res)
        # the shared counter t equals k for every example still running, so history
        # slots are indexed by an unbatched scalar (an in-place update, not a scatter)
        z_next, mstate = update(c.method_state, c.z, fz, c.t, go)
        # the update's own breakdown (not f's) falls back to the plain step
        z_next = jnp.where(jnp.all(jnp.isfinite(lax.stop_gradient(z_next))), z_next, fz)
        if differentiable:
            # frozen history too: a stopped example's repeated (z, f(z)) pairs can make
            # Anderson's system singular (ridge 0); its unused NaN step would still
            # poison the unrolled gradient (0 · NaN). The while loop needs no such copy.
            mstate = jax.tree.map(keep, mstate, c.method_state)
        traj = c.trajectory
        if return_trajectory:  # rows at or past an example's stop are overwritten below
            traj = lax.dynamic_update_index_in_dim(traj, z_next, c.t, 0)
        return _Carry(
            t=c.t + 1,
            k=c.k + go.astype(c.k.dtype),
            z=keep(z_next, c.z),
            best_z=jnp.where(better, c.z, c.best_z),
            best_res=jnp.where(better, res, c.best_res),
            best_abs=jnp.where(better, diff, c.best_abs),
            best_rel=jnp.where(better, rel, c.best_rel),
            last_abs=keep(diff, c.last_abs),
            last_rel=keep(rel, c.last_rel),
            bad=c.bad | (go & ~finite),
            method_state=mstate,
            trajectory=traj,
        )

    zf = layout.ravel(z0)
    inf = jnp.asarray(jnp.inf, dtype)
    traj0 = jnp.zeros((config.max_iter, n), dtype) if return_trajectory else None
    zero = jnp.asarray(0, jnp.int32)
    bad0 = ~jnp.all(jnp.isfinite(lax.stop_gradient(zf)))
    carry = _Carry(zero, zero, zf, zf, inf, inf, inf, inf, inf, bad0, init(zf), traj0)
    carry = with_context_mesh(carry)
    axes = manual_axes()
    if axes:  # inside shard_map: the carry varies wherever f's output or the budget does
        out_axes = varying_axes(jax.eval_shape(f_flat, zf))
        axes = axes & (out_axes | varying_axes(zf) | varying_axes(jnp.asarray(budget)))
        carry = vary_over(carry, axes)

    if differentiable:
        carry, _ = lax.scan(lambda c, _: (step(c), None), carry, None, length=config.max_iter)
    else:
        carry = lax.while_loop(
            lambda c: jnp.logical_and(c.t < config.max_iter, any_in_batch(active(c))), step, carry
        )

    nan = jnp.asarray(jnp.nan, dtype)
    poison = lambda x: jnp.where(carry.bad, nan, x)
    trajectory = None
    if return_trajectory:
        # Rows past the stop repeat the returned state, so every row is a valid state.
        rows = jnp.arange(config.max_iter, dtype=carry.k.dtype)[:, None]
        last = poison(carry.z if config.return_state == "last" else carry.best_z)
        traj = jnp.where(rows < carry.k, carry.trajectory, last[None])
        trajectory = jax.vmap(layout.unravel)(traj)
    factors = carry.method_state[:2] if return_inverse_jacobian else None
    last = config.return_state == "last"
    stats = SolverStats(
        steps=carry.k,
        abs_residual=poison(carry.last_abs if last else carry.best_abs),
        rel_residual=poison(carry.last_rel if last else carry.best_rel),
        converged=done(carry) & ~carry.bad,
        trajectory=trajectory,
        inverse_jacobian=factors,
    )
    return layout.unravel(poison(carry.z if last else carry.best_z)), stats
