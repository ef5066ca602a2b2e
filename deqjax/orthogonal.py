"""Fully connected layers with exactly orthonormal weights (Stiefel manifold).

LyaDEQ (Chu et al. 2024, "Lyapunov-Stable Deep Equilibrium Models", AAAI)
puts an orthogonal fully connected layer after the Lyapunov-stable equilibrium to
separate the crowded stable fixed points of different classes. ``W`` (``n_out × n_in``)
has orthonormal columns (``WᵀW = I``, tall or square) or rows (``WWᵀ = I``, wide),
**by construction** from unconstrained parameters, so any optimiser keeps it exact.
Three parameterisations (``kind``), with ``n = max(n_out, n_in)``, ``k = min(...)``:

* ``"expm"``: ``Q = expm(A − Aᵀ)`` of an unconstrained ``n × n`` matrix ``A``
  (``jax.scipy.linalg.expm``; Lezcano-Casado & Martínez-Rubio 2019). Orthogonal to
  float precision, surjective onto SO(n), differentiable everywhere; O(n³) per call.
  ``W`` is the leading ``n_out × n_in`` block of ``Q``.
* ``"cayley"``: ``Q = (I + S)⁻¹ (I − S)`` with ``S = A − Aᵀ`` skew (``I + S`` is always
  invertible); one linear solve, O(n³), orthogonal up to the solve's rounding, covers
  SO(n) except matrices with eigenvalue −1 (Helfrich et al. 2018; Trockman & Kolter 2021).
* ``"householder"``: ``Q = H₁ H₂ … H_k``, ``H_i = I − 2 v_i v_iᵀ / ‖v_i‖²`` from ``k``
  vectors in ``R^n`` (Mhammedi et al. 2017); the first ``k`` columns of ``Q`` reach
  every ``n × k`` Stiefel matrix (Householder QR). O(n k²): the **default**, because
  it is the only one that scales to a wide layer on thousands of flattened features
  (``expm``/``cayley`` need a dense ``n × n`` matrix). ``W = Q[:, :k]`` (tall) or its
  transpose (wide). A zero ``v_i`` is guarded (replaced by ``e_1``).

``orthogonal_init(key, n_out, n_in, kind)`` builds the parameters,
``orthogonal_matrix(params, n_out, n_in, kind)`` the weight (pure, jit/vmap/grad-able),
:class:`OrthogonalDense` is the Flax wrapper ``y = W x + b``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ORTHOGONAL_KINDS = ("householder", "expm", "cayley")


def _check(n_out: int, n_in: int, kind: str):
    if kind not in ORTHOGONAL_KINDS:
        raise ValueError(
            f"unknown orthogonal parameterisation {kind!r}; choose one of {ORTHOGONAL_KINDS}"
        )
    if int(n_out) < 1 or int(n_in) < 1:
        raise ValueError(f"orthogonal layer sizes must be >= 1, got n_out={n_out}, n_in={n_in}")


def param_shape(n_out: int, n_in: int, kind: str) -> tuple:
    """Shape of the unconstrained parameter: ``(n, n)`` (expm, cayley) or ``(k, n)``."""
    _check(n_out, n_in, kind)
    n, k = max(n_out, n_in), min(n_out, n_in)
    return (k, n) if kind == "householder" else (n, n)


def orthogonal_init(
    key: jax.Array, n_out: int, n_in: int, kind: str = "householder", dtype=jnp.float32
) -> jax.Array:
    """Random parameters: Gaussian Householder vectors (a random orthogonal ``W``) or a
    Gaussian ``A`` with entries of std ``1/√n`` (a random rotation for expm/cayley)."""
    shape = param_shape(n_out, n_in, kind)
    scale = 1.0 if kind == "householder" else 1.0 / jnp.sqrt(shape[1])
    return scale * jax.random.normal(key, shape, dtype)


def _householder_columns(vs: jax.Array) -> jax.Array:
    """First ``k`` columns of ``H₁ … H_k`` (``vs`` of shape ``(k, n)``)."""
    k, n = vs.shape
    sq = jnp.sum(vs * vs, axis=1, keepdims=True)
    ok = sq > jnp.finfo(vs.dtype).tiny
    e1 = jnp.zeros_like(vs).at[:, 0].set(1.0)
    vs = jnp.where(ok, vs, e1)
    units = vs / jnp.sqrt(jnp.where(ok, sq, 1.0))  # double where: no NaN gradient at v = 0
    y0 = jnp.eye(n, k, dtype=vs.dtype)

    def apply(y, u):  # y ← (I − 2 u uᵀ) y, reflections applied last-to-first
        return y - 2.0 * jnp.outer(u, u @ y), None

    y, _ = lax.scan(apply, y0, units[::-1])
    return y


def orthogonal_matrix(
    params: jax.Array, n_out: int, n_in: int, kind: str = "householder"
) -> jax.Array:
    """The ``n_out × n_in`` weight with orthonormal columns (``n_out ≥ n_in``) or rows
    (``n_out < n_in``) from the unconstrained ``params`` (see the module docstring)."""
    shape = param_shape(n_out, n_in, kind)
    if params.shape != shape:
        raise ValueError(
            f"{kind} parameters for a {n_out}x{n_in} weight must have shape {shape}, "
            f"got {params.shape}; build them with orthogonal_init"
        )
    n = max(n_out, n_in)
    if kind == "householder":
        y = _householder_columns(params)  # (n, k), orthonormal columns
        return y if n_out >= n_in else y.T
    skew = params - params.T
    if kind == "expm":
        q = jax.scipy.linalg.expm(skew)
    else:
        eye = jnp.eye(n, dtype=params.dtype)
        q = jnp.linalg.solve(eye + skew, eye - skew)
    return q[:n_out, :n_in]


def orthogonality_error(w: jax.Array) -> jax.Array:
    """``max |WᵀW − I|`` (tall/square) or ``max |WWᵀ − I|`` (wide)."""
    g = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return jnp.max(jnp.abs(g - jnp.eye(g.shape[0], dtype=w.dtype)))


class OrthogonalDense(nn.Module):
    """``y = W x + b`` on the last axis with ``W`` orthonormal by construction
    (:func:`orthogonal_matrix`). ``kind``: ``"householder"`` (default), ``"expm"``,
    ``"cayley"``."""

    features: int
    kind: str = "householder"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        n_in = x.shape[-1]
        raw = self.param(
            "orthogonal", lambda key: orthogonal_init(key, self.features, n_in, self.kind)
        )
        w = orthogonal_matrix(raw, self.features, n_in, self.kind).astype(x.dtype)
        y = x @ w.T
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y

    def weight(self, n_in: int):
        """The current orthonormal weight (call on a bound module)."""
        return orthogonal_matrix(
            self.variables["params"]["orthogonal"], self.features, n_in, self.kind
        )
