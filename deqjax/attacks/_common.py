"""Shared pieces of the attack suite: validation, projections, losses, steps.

Every attack in :mod:`deqjax.attacks` is a pure function
``attack(logits_fn, x, y, key, *, eps, norm, ...) -> x_adv`` where
``logits_fn(x_batch) -> (B, C)`` is any JAX function. The helpers here are the
pieces they share. All shape / name / sign checks run in Python at trace time;
value checks (``x`` in [0, 1], labels in range) run only when the arrays are
concrete (not under ``jax.jit`` tracing), so they cost nothing inside ``jit``.

Losses follow Croce & Hein, "Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks", ICML 2020 (DLR, targeted DLR)
and Andriushchenko et al., "Square Attack", ECCV 2020 (margin loss).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr")
_TINY = 1e-12


# ----------------------------------------------------------------------------- checks
def is_concrete(a) -> bool:
    """True when ``a`` holds concrete values (not a tracer under jit/vmap/grad)."""
    return not isinstance(a, jax.core.Tracer)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {NORMS}.")
    return norm


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; use one of {LOSSES}.")
    return loss


def check_eps(eps) -> None:
    """Reject negative or NaN radii (only checkable when ``eps`` is concrete)."""
    if not is_concrete(eps):
        return
    e = np.asarray(eps)
    if e.ndim != 0:
        raise ValueError(f"eps must be a scalar, got shape {e.shape}.")
    if not np.isfinite(e):
        raise ValueError(f"eps must be finite, got {float(e)}; pass e.g. eps=8/255.")
    if e < 0:
        raise ValueError(f"eps must be >= 0, got {float(e)}; pass a non-negative radius.")


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be a static Python int >= {minimum}, got {v!r}.")
    return int(v)


def check_inputs(logits_fn, x, y) -> int:
    """Validate ``x`` (B, ...) and ``y`` (B,); return the number of classes C.

    Shapes are checked at trace time (``jax.eval_shape`` of ``logits_fn``, which
    costs no FLOPs); values only when concrete.
    """
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (B, ...), got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"x must be floating point in [0, 1], got dtype {x.dtype}; "
            "convert e.g. with x.astype(jnp.float32) / 255."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.shape}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}.")
    out = jax.eval_shape(logits_fn, x)
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            "logits_fn(x) must return logits of shape (B, C) = "
            f"({x.shape[0]}, C), got {getattr(out, 'shape', type(out))}."
        )
    num_classes = int(out.shape[1])
    if is_concrete(x):
        xv = np.asarray(x)
        if not np.all(np.isfinite(xv)):
            raise ValueError("x contains NaN or inf; attacks need finite inputs in [0, 1].")
        if xv.size and (xv.min() < 0.0 or xv.max() > 1.0):
            raise ValueError(
                f"x must lie in [0, 1], got range [{xv.min():.4g}, {xv.max():.4g}]; "
                "rescale your images (e.g. divide uint8 images by 255)."
            )
    if is_concrete(y):
        yv = np.asarray(y)
        if yv.size and (yv.min() < 0 or yv.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}] (logits have "
                f"{num_classes} classes), got range [{yv.min()}, {yv.max()}]."
            )
    return num_classes


def validate(logits_fn, x, y, eps, norm):
    """All standard attack checks; returns ``(x, y, num_classes)`` as JAX arrays."""
    check_norm(norm)
    check_eps(eps)
    x, y = jnp.asarray(x), jnp.asarray(y)
    return x, y, check_inputs(logits_fn, x, y)


# ------------------------------------------------------------------------ geometry
def _bnorm(d):
    """Per-example L2 norm, broadcastable against ``d``."""
    axes = tuple(range(1, d.ndim))
    return jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))


def project(x_adv, x, eps, norm):
    """Project ``x_adv`` onto {‖x_adv − x‖ ≤ eps} ∩ [0, 1]^n.

    Ball projection then box clip. Since ``x`` is in the box, clipping moves each
    coordinate of δ toward 0, so the result stays inside the ball in both norms
    (it is the exact projection onto the intersection for L∞; for L2 it is the
    usual feasible approximation).
    """
    d = x_adv - x
    if norm == "linf":
        d = jnp.clip(d, -eps, eps)
    else:
        n = _bnorm(d)
        d = d * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))
    return jnp.clip(x + d, 0.0, 1.0)


def random_start(key, x, eps, norm):
    """Uniform sample from the eps-ball around ``x`` (then box-clipped).

    L∞: δ ~ U[−eps, eps]^n. L2: uniform in the ball, δ = eps·u^{1/n}·g/‖g‖ with
    g ~ N(0, I), u ~ U[0, 1] (n = number of features per example).
    """
    if norm == "linf":
        d = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:
        kg, ku = jax.random.split(key)
        g = jax.random.normal(kg, x.shape, x.dtype)
        n = math.prod(x.shape[1:])
        u = jax.random.uniform(ku, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        d = eps * u ** (1.0 / n) * g / jnp.maximum(_bnorm(g), _TINY)
    return jnp.clip(x + d, 0.0, 1.0)


def ascent_direction(g, norm):
    """Steepest-ascent direction of unit norm: sign(g) for L∞, g/‖g‖₂ for L2 (0 if g=0)."""
    if norm == "linf":
        return jnp.sign(g)
    return g / jnp.maximum(_bnorm(g), _TINY)


def bcast(v, x):
    """Reshape a per-example (B,) array to broadcast against ``x`` (B, ...)."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def bwhere(cond, a, b):
    """Per-example select: ``cond`` (B,) picks rows of ``a`` else ``b``."""
    return jnp.where(bcast(cond, a), a, b)


# --------------------------------------------------------------------------- losses
def ce_loss(logits, y):
    """Per-example cross-entropy −log softmax(z)_y, shape (B,)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]


def margin(logits, y):
    """Per-example margin z_y − max_{i≠y} z_i (negative ⇔ misclassified)."""
    zy = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return zy - jnp.max(other, axis=-1)


def dlr_loss(logits, y):
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6), per example:

    DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12),
    π the logits sorted in decreasing order. Needs C ≥ 3.
    """
    zs = jnp.sort(logits, axis=-1)[:, ::-1]
    return -margin(logits, y) / (zs[:, 0] - zs[:, 2] + _TINY)


def targeted_dlr_loss(logits, y, t):
    """Targeted DLR (Croce & Hein 2020, eq. 7), maximised by the attacker:

    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12). Needs C ≥ 4.
    """
    zs = jnp.sort(logits, axis=-1)[:, ::-1]
    zy = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    zt = jnp.take_along_axis(logits, t[:, None], -1)[:, 0]
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + _TINY)


def get_loss(name: str, num_classes: int):
    check_loss(name)
    if name == "dlr" and num_classes < 3:
        raise ValueError(
            f"the DLR loss needs >= 3 classes, logits have {num_classes}; "
            "use loss='ce' for binary problems."
        )
    return ce_loss if name == "ce" else dlr_loss


def loss_and_grad(logits_fn, loss_fn):
    """Return ``f(x, y) -> (per-example loss (B,), logits, dloss/dx)``.

    The gradient of the summed loss equals the per-example gradients provided
    ``logits_fn`` treats batch rows independently (no train-mode batch norm).
    """

    def total(x, y, *extra):
        logits = logits_fn(x)
        per = loss_fn(logits, y, *extra)
        return jnp.sum(per), (per, logits)

    def f(x, y, *extra):
        (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(x, y, *extra)
        return per, logits, g

    return f


def keep_worst(logits_fn, x_a, x_b, y):
    """Per example, keep whichever of ``x_a``/``x_b`` has the lower margin (ties → a)."""
    ma = margin(logits_fn(x_a), y)
    mb = margin(logits_fn(x_b), y)
    return bwhere(mb < ma, x_b, x_a)
