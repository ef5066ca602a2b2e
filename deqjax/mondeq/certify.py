"""The monDEQ's provable ℓ2 Lipschitz bound and its margin certificate.

Pabbaraju, Winston & Kolter (2021), "Estimating Lipschitz constants of monotone deep
equilibrium models", ICLR, Thm. 1: for ``z*(x) = σ(W z* + U x + b)`` with σ monotone and
1-Lipschitz and ``I − W ⪰ m I``,

    ‖z*(x) − z*(x')‖₂ ≤ (‖U‖₂ / m) ‖x − x'‖₂,

(from strong monotonicity: ``m‖Δz‖² ≤ ⟨(I − W)Δz + Δg, Δz⟩ = ⟨U Δx, Δz⟩``), so the
logits ``W_outᵀ z* + b_out`` are ``L = ‖W_out‖₂‖U‖₂/m``-Lipschitz (the conv head's
``p × p`` average pooling has norm exactly ``1/p``: ``‖head‖ = ‖W_out‖₂/p``).
:func:`lipschitz_bound` bounds both norms from ABOVE by Gram iteration
(:mod:`deqjax.cpl.bounds`; the conv ``U`` at its input size, stride and zero padding).

Certificate: CPL's (:func:`deqjax.cpl.certified_radius`) on the logits divided by L —
a 1-Lipschitz network — i.e. radius ``(f_y − max_{j≠y} f_j)/(√2 L)``. The logits are
computed at a solver iterate ``z̃``, not at ``z*``; with ``r = z̃ − ReLU(W z̃ + U x + b)``,
``w = z̃ − r`` is the exact equilibrium for the injection ``U x + b + W r``, so
``‖z̃ − z*‖ ≤ ‖r‖(1 + ‖W‖₂/m)`` and every margin is off by at most ``√2 ‖head‖₂``
times that. :func:`certify` subtracts the corresponding radius from every certified
radius (float32 rounding of the forward pass itself is not accounted for).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl.bounds import conv_norm_bound, dense_norm_bound
from deqjax.cpl.certify import CertifiedLogits, certified_radius
from deqjax.mondeq.operators import MonDEQParams, check_params, features
from deqjax.mondeq.splitting import DEFAULT_CONFIG, equilibrium, residual

SAFETY = 1e-9  # products and quotients of float64 bounds: round up by far more than eps


def _host(a, what):
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"{what} is a traced value: the Lipschitz bound is computed eagerly in float64 "
            "on the host. Call deqjax.mondeq.lipschitz_bound outside jax.jit / vmap / grad."
        )
    return np.asarray(a, np.float64)


def norm_bounds(p: MonDEQParams) -> dict:
    """Upper bounds (float) on ``‖U‖₂``, ``‖head‖₂`` (``W_out`` with the pooling),
    ``‖A‖₂``, ``‖B‖₂`` and ``‖W‖₂ ≤ |1 − m| + ‖A‖² + 2‖B‖``, by Gram iteration."""
    check_params(p)
    for name in ("U", "A", "B", "W_out"):
        _host(getattr(p, name), f"MonDEQParams.{name}")
    if p.kind == "fc":
        u = float(dense_norm_bound(p.U))
        a, b = float(dense_norm_bound(p.A)), float(dense_norm_bound(p.B))
        head = float(dense_norm_bound(p.W_out))
    else:
        u = float(conv_norm_bound(p.U, p.input_shape[:2], p.stride, "SAME"))
        hw = p.state_shape[:2]
        a = float(conv_norm_bound(p.A, hw, 1, "CIRCULAR"))
        b = float(conv_norm_bound(p.B, hw, 1, "CIRCULAR"))
        head = float(dense_norm_bound(p.W_out)) / p.pool
    w = (abs(1 - p.m) + a * a + 2 * b) * (1 + SAFETY)
    return {"U": u, "head": head * (1 + SAFETY), "A": a, "B": b, "W": w}


def _spectral_norm(mat) -> jax.Array:
    """σ₁ of a matrix, differentiable (float32; a training-time normaliser, not a bound)."""
    return jnp.linalg.norm(mat, 2)


def _conv_spectral_norm(kernel, input_hw, stride) -> jax.Array:
    """σ₁ of the zero-padded strided conv's circular extension (the quantity
    :func:`deqjax.cpl.conv_norm_bound` bounds), traced: polyphase DFT symbols, the
    largest eigenvalue of each frequency's Gram matrix."""
    from deqjax.cpl.bounds import conv_torus

    (n1, n2), s = conv_torus(input_hw, kernel.shape[:2], stride, "SAME")
    kh, kw, cin, cout = kernel.shape
    mh, mw = -(-kh // s), -(-kw // s)
    k = jnp.pad(kernel, ((0, mh * s - kh), (0, mw * s - kw), (0, 0), (0, 0)))
    poly = k.reshape(mh, s, mw, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    poly = poly.reshape(mh, mw, s * s * cin, cout)
    e1 = jnp.exp(-2j * np.pi * np.outer(np.arange(n1 // s), np.arange(mh)) / (n1 // s))
    e2 = jnp.exp(-2j * np.pi * np.outer(np.arange(n2 // s), np.arange(mw)) / (n2 // s))
    cdt = jnp.result_type(kernel.dtype, jnp.complex64)
    sym = jnp.einsum("pa,qb,abio->pqio", e1.astype(cdt), e2.astype(cdt), poly)
    sym = sym.reshape(-1, s * s * cin, cout)
    if sym.shape[1] > sym.shape[2]:
        sym = jnp.swapaxes(sym, 1, 2)
    gram = sym @ jnp.conj(jnp.swapaxes(sym, 1, 2))
    return jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(gram)))


def logit_scale(p: MonDEQParams) -> jax.Array:
    """``σ₁(head)·σ₁(U)/m`` computed in the graph (float32, differentiable): the
    divisor of the logits when ``p.normalize`` (then the network's Lipschitz constant
    is about 1 and a hinge loss trains its certified margins: Lipschitz-margin
    training). A value, not a bound: :func:`lipschitz_bound` uses Gram upper bounds."""
    if p.kind == "fc":
        u = _spectral_norm(p.U)
        head = _spectral_norm(p.W_out)
    else:
        # at the input size state × stride (what the Flax head sees), not input_shape:
        # the model and lipschitz_bound then divide by the same value
        hw = tuple(-(-int(h) // p.stride) * p.stride for h in p.input_shape[:2])
        u = _conv_spectral_norm(p.U, hw, p.stride)
        head = _spectral_norm(p.W_out) / p.pool
    return head * u / p.m


def head(p: MonDEQParams, z: jax.Array) -> jax.Array:
    """Logits of a batch of equilibria ``z`` (divided by :func:`logit_scale` when
    ``p.normalize``)."""
    logits = jax.vmap(lambda z_i: features(p, z_i) @ p.W_out + p.b_out)(z)
    return logits / logit_scale(p) if p.normalize else logits


def logits(p: MonDEQParams, x, *, splitting="pr", alpha=1.0, config=DEFAULT_CONFIG):
    """``(logits, stats)`` of a batch ``x``."""
    z, stats = equilibrium(p, x, splitting=splitting, alpha=alpha, config=config)
    return head(p, z), stats


def lipschitz_bound(p: MonDEQParams) -> float:
    """A provable upper bound on the ℓ2 Lipschitz constant of ``x ↦ logits``:
    ``‖head‖₂·‖U‖₂/m`` with both norms bounded from above by Gram iteration, divided by
    the float32 :func:`logit_scale` the forward pass divides by when ``p.normalize``."""
    nb = norm_bounds(p)
    bound = nb["head"] * nb["U"] / p.m
    if p.normalize:
        bound /= float(logit_scale(p))
    return float(bound * (1 + SAFETY))


@flax.struct.dataclass
class Certificate:
    """Per-example certified ℓ2 radii (0 where misclassified or not certified) and
    what they rest on: ``lipschitz`` (:func:`lipschitz_bound`), the solver
    ``slack`` subtracted from each radius, the predictions and logits."""

    radius: jax.Array
    correct: jax.Array
    logits: jax.Array
    slack: jax.Array
    lipschitz: float = flax.struct.field(pytree_node=False)


def certify(
    p: MonDEQParams,
    x,
    y,
    *,
    splitting: str = "pr",
    alpha: float = 1.0,
    config=DEFAULT_CONFIG,
    batch_size: int = 500,
) -> Certificate:
    """Certified radii of a batch: CPL's margin certificate of ``logits / L``
    (:func:`deqjax.cpl.certified_radius`) minus the solver slack (module doc)."""
    lip = lipschitz_bound(p)
    nb = norm_bounds(p)
    scale = float(logit_scale(p)) if p.normalize else 1.0
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def run(xb):
        z, _ = equilibrium(p, xb, splitting=splitting, alpha=alpha, config=config)
        return head(p, z), residual(p, z, xb)

    outs = [run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    lg = jnp.concatenate([o[0] for o in outs])
    res = jnp.concatenate([o[1] for o in outs])
    # ‖z̃ − z*‖ bound → margin error √2‖head‖·dz/scale → radius error (÷ √2 L)
    dz = res * (1 + nb["W"] / p.m)
    slack = nb["head"] * dz / scale / lip
    cert = CertifiedLogits(lg / lip, None, {"lipschitz": jnp.float32(lip)}, "truncate")
    radius = jnp.maximum(certified_radius(cert, y) - slack, 0.0)
    correct = jnp.argmax(lg, -1) == y
    return Certificate(jnp.where(correct, radius, 0.0), correct, lg, slack, lip)
