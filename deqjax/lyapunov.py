"""Learned Lyapunov functions and projected (provably stable) dynamics.

LyaDEQ (Chu, Wei, Liu, Zhao & Miyatake 2024, "Lyapunov-Stable Deep Equilibrium
Models", AAAI; SPEC §2)
views a DEQ as the dynamical system ``dz/dt = F(z; x) = f(z, x) − z`` and makes it
stable with the construction of Manek & Kolter 2019 ("Learning stable deep dynamics
models", NeurIPS):

* an input-convex network (Amos, Xu & Kolter 2017, ICNN)
  ``u₁ = σ(W₀ z + b₀)``, ``u_{i+1} = σ(W_i z + b_i + softplus(U_i) u_i)``,
  ``g(z) = W_k z + b_k + softplus(U_k) u_k`` with σ convex and non-decreasing, so
  ``g`` is convex in ``z``;
* a positive definite Lyapunov candidate ``V(z) = ReHU_d(g(z) − g(0)) + η‖z‖²``;
* the projection ``F̂ = F − ∇V · ReLU(∇Vᵀ F + α V) / ‖∇V‖²`` which guarantees
  ``∇V(z)ᵀ F̂(z; x) ≤ −α V(z)`` everywhere.

``V`` is strictly convex (``ReHU_d`` is convex and non-decreasing, ``g − g(0)`` convex,
``η‖z‖²`` strictly convex) with ``V(0) = 0`` and ``V ≥ 0``, so ``∇V(z) = 0`` only at
``z = 0``; there the projection term is defined as 0 (``F̂(0) = F(0)``), computed with a
double-``where`` so that neither the value nor any derivative is NaN.

Note on roots: for α > 0 and z ≠ 0, ``∇Vᵀ F̂ ≤ −αV < 0`` so ``F̂(z) ≠ 0``: the only
root of the projected dynamics is ``z = 0``. With α = 0 every root of ``F`` is kept
(plus points where ``F`` is a positive multiple of ``∇V``).

All functions act on ONE state (any shape, flattened internally); ``jax.vmap`` them
for batches. The ICNN parameters are a plain pytree (list of dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deqjax.solvers import SolverConfig, solve

ACTIVATIONS = ("softplus", "rehu")


def _is_number(a) -> bool:
    """A concrete Python/NumPy scalar (checked at trace time); traced values pass."""
    return isinstance(a, (int, float)) or (
        hasattr(a, "shape") and not isinstance(a, jax.core.Tracer)
    )


def rehu(s: jax.Array, d: float = 1.0) -> jax.Array:
    """Rectified Huber unit (Manek & Kolter 2019):
    ``ReHU_d(s) = 0 (s ≤ 0), s²/(2d) (0 < s ≤ d), s − d/2 (s > d)``.

    Convex, non-decreasing and continuously differentiable (a smoothed ReLU)."""
    if _is_number(d) and not d > 0:
        raise ValueError(f"ReHU's d must be > 0, got {d}")
    s = jnp.asarray(s)
    pos = jnp.maximum(s, 0.0)
    return jnp.where(s <= d, pos * pos / (2 * d), s - d / 2)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "softplus":
        return jax.nn.softplus
    if name == "rehu":
        return lambda s: rehu(s, 1.0)
    raise ValueError(f"unknown ICNN activation {name!r}; choose one of {ACTIVATIONS}")


def icnn_init(key: jax.Array, dim: int, widths: Sequence[int], dtype=jnp.float32) -> list:
    """Parameters of an ICNN on ``dim`` inputs with hidden ``widths`` (scalar output).

    Layer ``i`` is a dict with ``W`` (``(width_i, dim)``), ``b`` and, for ``i ≥ 1``,
    the raw ``U`` (``(width_i, width_{i−1})``) whose softplus is the non-negative
    weight. The last dict is the output layer (``W`` of shape ``(dim,)``, scalar ``b``,
    ``U`` of shape ``(width_k,)``). Raw ``U`` is initialised so that
    ``softplus(U) ≈ 1/width_{i−1}`` (a mean-preserving positive mix).
    """
    widths = tuple(int(w) for w in widths)
    if int(dim) < 1 or not widths or min(widths) < 1:
        raise ValueError(
            f"ICNN needs dim >= 1 and at least one hidden width >= 1, got dim={dim}, "
            f"widths={widths}"
        )
    keys = jax.random.split(key, 2 * len(widths) + 2)
    scale_z = 1.0 / jnp.sqrt(dim)
    params = []
    prev = None
    for i, w in enumerate(widths + (None,)):
        shape_w = (dim,) if w is None else (w, dim)
        layer = {
            "W": scale_z * jax.random.normal(keys[2 * i], shape_w, dtype),
            "b": jnp.zeros(() if w is None else (w,), dtype),
        }
        if prev is not None:
            shape_u = (prev,) if w is None else (w, prev)
            centre = jnp.log(jnp.expm1(1.0 / prev))  # softplus⁻¹(1/prev)
            layer["U"] = (centre + 0.1 * jax.random.normal(keys[2 * i + 1], shape_u)).astype(dtype)
        params.append(layer)
        prev = w
    return params


def icnn_apply(params: list, z: jax.Array, activation: str = "softplus") -> jax.Array:
    """Scalar convex ``g(z)`` of one state (flattened); see the module docstring."""
    act = _activation(activation)
    if len(params) < 2:
        raise ValueError(
            "ICNN params need at least one hidden layer and the output layer; "
            "build them with icnn_init"
        )
    z = jnp.ravel(z)
    dim = params[0]["W"].shape[-1]
    if z.shape[0] != dim:
        raise ValueError(
            f"the ICNN was built for states of size {dim}, got a state of size {z.shape[0]}"
        )
    u = act(params[0]["W"] @ z + params[0]["b"])
    for layer in params[1:-1]:
        u = act(layer["W"] @ z + layer["b"] + jax.nn.softplus(layer["U"]) @ u)
    out = params[-1]
    return out["W"] @ z + out["b"] + jax.nn.softplus(out["U"]) @ u


def lyapunov_value(
    params: list, z: jax.Array, eta: float = 0.01, d: float = 1.0, activation: str = "softplus"
) -> jax.Array:
    """``V(z) = ReHU_d(g(z) − g(0)) + η‖z‖²`` (Manek & Kolter 2019, eq. 9): positive
    definite, strictly convex, ``V(0) = 0``."""
    if _is_number(eta) and not eta > 0:
        raise ValueError(f"eta must be > 0 for V to be positive definite, got {eta}")
    z = jnp.ravel(z)
    g = icnn_apply(params, z, activation) - icnn_apply(params, jnp.zeros_like(z), activation)
    return rehu(g, d) + eta * jnp.sum(z * z)


def project_dynamics(
    F_value: jax.Array, grad_V: jax.Array, V_value: jax.Array, alpha: float
) -> jax.Array:
    """``F̂ = F − ∇V · ReLU(∇Vᵀ F + α V) / ‖∇V‖²`` (Manek & Kolter 2019, eq. 7).

    Guarantees ``∇Vᵀ F̂ ≤ −α V``. Where ``‖∇V‖² = 0`` (only ``z = 0`` for the ``V`` of
    :func:`lyapunov_value`) the correction is 0; the divisor is replaced by 1 there
    before dividing (double ``where``), so values and gradients stay finite.
    ``F_value`` and ``grad_V`` share a shape (any); ``V_value`` is a scalar.
    """
    if F_value.shape != grad_V.shape:
        raise ValueError(
            f"F and ∇V must have the same shape, got {F_value.shape} and {grad_V.shape}"
        )
    if _is_number(alpha) and not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    sq = jnp.sum(grad_V * grad_V)
    ok = sq > jnp.finfo(sq.dtype).tiny
    safe_sq = jnp.where(ok, sq, 1.0)
    coef = jnp.where(ok, jax.nn.relu(jnp.sum(grad_V * F_value) + alpha * V_value) / safe_sq, 0.0)
    return F_value - coef * grad_V


def projected_dynamics(
    F_fn: Callable[[jax.Array, Any], jax.Array],
    lyap_params: list,
    z: jax.Array,
    x: Any,
    alpha: float = 0.0,
    eta: float = 0.01,
    d: float = 1.0,
    activation: str = "softplus",
) -> jax.Array:
    """``F̂(z; x)`` for one state: ``V`` and ``∇V`` by ``jax.value_and_grad``, then
    :func:`project_dynamics`. ``F_fn(z, x)`` is the residual dynamics ``f(z, x) − z``."""
    v, grad_v = jax.value_and_grad(lambda s: lyapunov_value(lyap_params, s, eta, d, activation))(z)
    return project_dynamics(F_fn(z, x), grad_v, v, alpha)


def check_positive_definite(
    params: list,
    zs: jax.Array,
    eta: float = 0.01,
    d: float = 1.0,
    activation: str = "softplus",
    atol: float = 0.0,
) -> dict:
    """Check ``V(0) = 0`` and ``V(z) > 0`` at the non-zero rows of ``zs`` (shape
    ``(n, *state)``). Raises ``ValueError`` naming the offending points; otherwise
    returns ``{"v0", "min_v", "min_v_over_sq_norm"}``. Not jittable (it raises)."""
    zs = jnp.asarray(zs)
    if zs.ndim < 2:
        raise ValueError(f"zs must be a batch of states (n, *state), got shape {zs.shape}")
    vfun = jax.vmap(lambda z: lyapunov_value(params, z, eta, d, activation))
    v0 = float(lyapunov_value(params, jnp.zeros_like(zs[0]), eta, d, activation))
    vs = vfun(zs)
    flat = zs.reshape(zs.shape[0], -1)
    nonzero = jnp.any(flat != 0, axis=1)
    nz = jnp.sum(flat**2, axis=1)
    bad = nonzero & ~(vs > 0)
    if abs(v0) > atol:
        raise ValueError(f"V(0) = {v0} is not 0: the Lyapunov function is not centred")
    if bool(jnp.any(bad)) or not bool(jnp.all(jnp.isfinite(vs))):
        idx = [int(i) for i in jnp.nonzero(bad | ~jnp.isfinite(vs))[0][:10]]
        raise ValueError(
            f"V is not positive at non-zero states {idx} (values {[float(vs[i]) for i in idx]})"
        )
    ratio = jnp.where(nz > 0, vs / jnp.where(nz > 0, nz, 1.0), jnp.inf)
    return {
        "v0": v0,
        "min_v": float(jnp.min(jnp.where(nonzero, vs, jnp.inf))),
        "min_v_over_sq_norm": float(jnp.min(ratio)),
    }


class StabilityReport(NamedTuple):
    """Spread of the equilibria reached from perturbed initial states (one example).

    distances / relative: ``‖z_j − z*‖`` and ``‖z_j − z*‖ / ‖z*‖`` per perturbation;
    max_distance, mean_distance, max_relative: their summaries; fraction_converged:
    share of the re-solves whose residual passed the solver's tolerance;
    initial_distance: mean ``‖z0_j − z*‖`` (how far the starts were).
    """

    distances: jax.Array
    relative: jax.Array
    max_distance: jax.Array
    mean_distance: jax.Array
    max_relative: jax.Array
    fraction_converged: jax.Array
    initial_distance: jax.Array


def stability_check(
    f_single: Callable[[jax.Array, Any], jax.Array],
    z_star: jax.Array,
    args: Any,
    key: jax.Array,
    n_perturb: int = 32,
    scale: float = 0.1,
    config: SolverConfig = SolverConfig(),  # noqa: B008 (frozen, hashable)
) -> StabilityReport:
    """Re-solve ``z = f_single(z, args)`` from ``z0_j = z* + scale · ε_j``,
    ``ε_j ~ N(0, I)``, ``j = 1 … n_perturb`` (vmapped, one key split per start), and
    report how far the reached equilibria are from ``z*`` (SPEC §2: trajectories from
    perturbed initial states must reach the same equilibrium). One example; vmap over
    ``(z_star, args, key)`` for a batch. Jittable with ``n_perturb`` and ``config`` static.
    """
    if int(n_perturb) < 1:
        raise ValueError(f"n_perturb must be >= 1, got {n_perturb}")
    z_star = jnp.asarray(z_star)
    eps = jax.random.normal(key, (int(n_perturb),) + z_star.shape, z_star.dtype)
    z0s = z_star[None] + scale * eps
    zs, stats = jax.vmap(lambda z0: solve(lambda z: f_single(z, args), z0, config))(z0s)
    axes = tuple(range(1, zs.ndim))
    dist = jnp.sqrt(jnp.sum((zs - z_star[None]) ** 2, axis=axes))
    start = jnp.sqrt(jnp.sum((z0s - z_star[None]) ** 2, axis=axes))
    rel = dist / (jnp.linalg.norm(jnp.ravel(z_star)) + 1e-12)
    return StabilityReport(
        dist,
        rel,
        jnp.max(dist),
        jnp.mean(dist),
        jnp.max(rel),
        jnp.mean(stats.converged.astype(z_star.dtype)),
        jnp.mean(start),
    )
