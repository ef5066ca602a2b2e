"""Learned Lyapunov functions and projected (provably stable) dynamics.

LyaDEQ (Chu, Wei, Liu, Zhao & Miyatake 2024, "Lyapunov-Stable Deep Equilibrium
Models", AAAI; docs/methods/lyadeq.md)
views a DEQ as the dynamical system ``dz/dt = F(z; x) = f(z, x) − z`` and makes it
stable with the construction of Manek & Kolter 2019 ("Learning stable deep dynamics
models", NeurIPS):

* an input-convex network (Amos, Xu & Kolter 2017, ICNN)
  ``u₁ = σ(W₀ z + b₀)``, ``u_{i+1} = σ(W_i z + b_i + softplus(U_i) u_i)``,
  ``g(z) = W_k z + softplus(U_k) u_k`` with σ convex and non-decreasing, so
  ``g`` is convex in ``z`` (the paper's output bias ``b_k`` is left out: it cancels in
  ``g(z) − g(0)`` and would never receive a gradient);
* a positive definite Lyapunov candidate ``V(z) = ReHU_d(g(z) − g(0)) + η‖z‖²``;
* the projection ``F̂ = F − ∇V · ReLU(∇Vᵀ F + α V) / ‖∇V‖²`` which guarantees
  ``∇V(z)ᵀ F̂(z; x) ≤ −α V(z)`` everywhere.

``V`` is strictly convex (``ReHU_d`` is convex and non-decreasing, ``g − g(0)`` convex,
``η‖z‖²`` strictly convex) with ``V(0) = 0`` and ``V ≥ 0``, so ``∇V(z) = 0`` only at
``z = 0``; there the projection term is defined as 0 (``F̂(0) = F(0)``), computed with a
double-``where`` so that neither the value nor any derivative is NaN.

A LyaDEQ (docs/methods/lyadeq.md) is the **finite-time** system ``z₀ = 0``,
``z_{k+1} = z_k + h · F̂(z_k; x)``, output ``z_K``: the roots of ``F̂`` are not used
(for α > 0 and z ≠ 0, ``∇Vᵀ F̂ ≤ −αV < 0``, so the only possible root is ``z = 0``).
The continuous-time decrease does not carry over to Euler steps of size ``h``:
:func:`lyapunov_along` measures ``V`` along a discrete trajectory, and
:func:`stability_check` the spread of ``z_K`` over perturbed starts ``z₀ = δ``.
Note that the first step from ``z₀ = 0`` always increases ``V`` (``V(0) = 0`` and
``F̂(0) = F(0)``), whereas any solution of the continuous flow started at the minimum
of ``V`` stays there (``V(t) ≤ V(0) e^{−αt} = 0``): the discrete model moves away from
``z = 0`` only because its steps have a finite size ``h``.

All functions act on ONE state (any shape, flattened internally); ``jax.vmap`` them
for batches. The ICNN parameters are a plain pytree (list of dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    weight. The last dict is the output layer (``W`` of shape ``(dim,)`` and ``U`` of
    shape ``(width_k,)``; no bias: an output bias ``b_k`` cancels in ``g(z) − g(0)``, so
    ``V`` would not depend on it and it could never be trained). Raw ``U`` is
    initialised so that ``softplus(U) ≈ 1/width_{i−1}`` (a mean-preserving positive mix).
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
        layer = {"W": scale_z * jax.random.normal(keys[2 * i], shape_w, dtype)}
        if w is not None:
            layer["b"] = jnp.zeros((w,), dtype)
        if prev is not None:
            shape_u = (prev,) if w is None else (w, prev)
            centre = jnp.log(jnp.expm1(1.0 / prev))  # softplus⁻¹(1/prev)
            layer["U"] = (centre + 0.1 * jax.random.normal(keys[2 * i + 1], shape_u)).astype(dtype)
        params.append(layer)
        prev = w
    return params


def icnn_apply(params: list, z: jax.Array, activation: str = "softplus") -> jax.Array:
    """Scalar convex ``g(z)`` of one state (flattened); see the module docstring
    (the output layer has no bias: ``g(z) = W_k z + softplus(U_k) u_k``)."""
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
    return out["W"] @ z + jax.nn.softplus(out["U"]) @ u


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


def lyapunov_along(
    params: list,
    states: jax.Array,
    eta: float = 0.01,
    d: float = 1.0,
    activation: str = "softplus",
) -> tuple[jax.Array, jax.Array]:
    """``V`` along a discrete trajectory ``states = (z_0, z_1, …, z_K)`` (shape
    ``(K + 1, *state)``) and the steps that increase it.

    Returns ``(values, increases)``: ``V(z_k)`` for ``k = 0 … K`` and the booleans
    ``V(z_{k+1}) > V(z_k)`` for ``k = 0 … K − 1``. The projection guarantees
    ``dV/dt ≤ −αV`` for the flow; an Euler step ``z + h F̂(z)`` can still increase
    ``V``, so this fraction is measured and reported on trained models."""
    states = jnp.asarray(states)
    if states.ndim < 2 or states.shape[0] < 2:
        raise ValueError(
            f"states must be a trajectory (K + 1 >= 2, *state), got shape {states.shape}"
        )
    values = jax.vmap(lambda z: lyapunov_value(params, z, eta, d, activation))(states)
    return values, values[1:] > values[:-1]


class StabilityReport(NamedTuple):
    """Spread of the final states reached from perturbed initial states (one example).

    distances / relative: ``‖z_K(z₀ + δ_j) − z_K(z₀)‖`` and that over ``‖z_K(z₀)‖``,
    per perturbation; max_distance, mean_distance, max_relative: their summaries;
    initial_distance: mean ``‖δ_j‖`` (how far the starts were); contraction: mean over
    ``j`` of ``distance_j / ‖δ_j‖`` (< 1: the map shrinks perturbations of the start);
    reference, finals: ``z_K(z₀)`` and the ``z_K(z₀ + δ_j)``.
    """

    distances: jax.Array
    relative: jax.Array
    max_distance: jax.Array
    mean_distance: jax.Array
    max_relative: jax.Array
    initial_distance: jax.Array
    contraction: jax.Array
    reference: jax.Array
    finals: jax.Array


def stability_check(
    run: Callable[[jax.Array], jax.Array],
    z0: jax.Array,
    key: jax.Array,
    n_perturb: int = 32,
    scale: float = 0.1,
) -> StabilityReport:
    """Run a finite-time map ``run(z₀) -> z_K`` from ``z₀`` and from ``z₀ + δ_j``,
    ``δ_j = scale · ε_j``, ``ε_j ~ N(0, I)``, ``j = 1 … n_perturb`` (vmapped; one key
    for all draws), and report how far the final states are from the unperturbed one
    (trajectories from perturbed initial states should end close together).
    One example; vmap over ``(z0, key)`` and whatever ``run`` closes over for a batch.
    Jittable with ``n_perturb`` static."""
    if int(n_perturb) < 1:
        raise ValueError(f"n_perturb must be >= 1, got {n_perturb}")
    if _is_number(scale) and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    z0 = jnp.asarray(z0)
    deltas = scale * jax.random.normal(key, (int(n_perturb),) + z0.shape, z0.dtype)
    z_ref = run(z0)
    zs = jax.vmap(lambda dz: run(z0 + dz))(deltas)
    axes = tuple(range(1, zs.ndim))
    dist = jnp.sqrt(jnp.sum((zs - z_ref[None]) ** 2, axis=axes))
    start = jnp.sqrt(jnp.sum(deltas**2, axis=axes))
    rel = dist / (jnp.linalg.norm(jnp.ravel(z_ref)) + 1e-12)
    return StabilityReport(
        dist,
        rel,
        jnp.max(dist),
        jnp.mean(dist),
        jnp.max(rel),
        jnp.mean(start),
        jnp.mean(dist / start),
        z_ref,
        zs,
    )
