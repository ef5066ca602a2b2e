"""Shared pieces of the attack suite: validation, projections, losses, steps.

Every attack in :mod:`deqjax.attacks` is a pure function
``attack(logits_fn, x, y, key, *, eps, norm, ...) -> x_adv`` where
``logits_fn(x_batch) -> (B, C)`` is any JAX function. The helpers here are the
pieces they share. All shape / name / sign checks run in Python at trace time;
value checks (``x`` in [0, 1], labels in range) run only when the arrays are
concrete (not under ``jax.jit`` tracing), so they cost nothing inside ``jit``.

A ``logits_fn`` may also be a :class:`WarmStartLogits`: a model whose forward is an
iterative solve (a DEQ) and that can start it from a state carried between calls.
PGD and APGD then start each iterate's solve from the previous iterate's solution
(see :class:`WarmStartLogits`); every other use of it is its cold forward.

Losses follow Croce & Hein, "Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks", ICML 2020 (DLR, targeted DLR)
and Andriushchenko et al., "Square Attack", ECCV 2020 (margin loss).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def validate(logits_fn, x, y, eps, norm, key=None):
    """All standard attack checks; returns ``(x, y, num_classes)`` as JAX arrays."""
    check_norm(norm)
    check_eps(eps)
    x, y = jnp.asarray(x), jnp.asarray(y)
    if key is not None:
        check_key(key, x.shape[0])
    return x, y, check_inputs(logits_fn, x, y)


# ---------------------------------------------------------------------------- keys
# An attack's ``key`` is either ONE PRNG key (raw uint32 (2,) or typed ()), from which
# batch-shaped noise is drawn, or one key PER EXAMPLE (raw (B, 2) or typed (B,)), from
# which each example's noise is drawn separately. With per-example keys an example's
# random draws do not depend on which other examples share its batch or where it sits
# in it, so a batch can be reordered or split (the compacting ensemble) without
# changing any example's result. One key reproduces the previous draws bit for bit.
def _is_typed(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def is_batched_key(key) -> bool:
    """True for per-example keys (raw (B, 2) / typed (B,)), False for one key."""
    return key.ndim == (1 if _is_typed(key) else 2)


def check_key(key, batch: int) -> None:
    base = 0 if _is_typed(key) else 1
    if key.ndim not in (base, base + 1) or (not _is_typed(key) and key.shape[-1] != 2):
        raise ValueError(
            f"key must be one PRNG key (jax.random.PRNGKey(0)) or one key per example "
            f"(shape ({batch}, 2)), got shape {key.shape}."
        )
    if is_batched_key(key) and key.shape[0] != batch:
        raise ValueError(
            f"per-example keys must number the examples: got {key.shape[0]} keys for a "
            f"batch of {batch}; build them with example_keys(key, {batch})."
        )


def example_keys(key, n: int):
    """``n`` per-example keys ``fold_in(key, i)``, i = 0 … n−1 (example i's key depends
    only on ``key`` and its index i, not on the batch it is attacked in)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def split_key(key, n: int):
    """``jax.random.split`` for one or per-example keys; the new axis comes first."""
    if is_batched_key(key):
        return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(key), 0, 1)
    return jax.random.split(key, n)


def draw(sampler, key, shape):
    """``sampler(key, shape)`` with one key, or per example ``sampler(key_i, shape[1:])``."""
    if is_batched_key(key):
        return jax.vmap(lambda k: sampler(k, shape[1:]))(key)
    return sampler(key, shape)


# ------------------------------------------------------------------------- targets
def target_indices(targets, k: int):
    """Indices j ∈ [0, k) of the targets a targeted attack runs (default: all k, in
    order). Target j is the class with the (j+2)-th highest clean logit (j = 0: the
    runner-up), as in AutoAttack's APGD-T / FAB-T. Traced indices are allowed (the
    compacting ensemble runs one target at a time); concrete ones are range-checked."""
    if targets is None:
        return jnp.arange(k)
    t = jnp.atleast_1d(jnp.asarray(targets))
    if t.ndim != 1 or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"targets must be integer indices in [0, {k}), got {targets!r}.")
    if is_concrete(t) and t.size and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(
            f"targets must lie in [0, {k}) (n_target_classes={k}), got {np.asarray(t)}."
        )
    return t


def target_class(clean_logits, j):
    """Per example, the class with the (j+2)-th highest clean logit (j may be traced)."""
    order = jnp.argsort(clean_logits, axis=-1)  # ascending
    return jnp.take(order, clean_logits.shape[-1] - 2 - j, axis=-1)


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
    g ~ N(0, I), u ~ U[0, 1] (n = number of features per example). ``key``: one key
    or per-example keys (see :func:`draw`).
    """
    if norm == "linf":
        d = draw(lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0), key, x.shape) * eps
    else:
        kg, ku = split_key(key, 2)
        g = draw(lambda k, s: jax.random.normal(k, s, x.dtype), kg, x.shape)
        n = math.prod(x.shape[1:])
        u_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        u = draw(lambda k, s: jax.random.uniform(k, s, x.dtype), ku, u_shape)
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


# ------------------------------------------------------------------- warm starts
@dataclasses.dataclass(frozen=True)
class WarmStartLogits:
    """A logits function whose forward solve can start from a carried state.

    ``init(x) -> state``: the cold start for a batch ``x`` (a pytree whose leaves have
    the batch axis first; for a DEQ the zero state). ``apply(x, state) -> (logits,
    new_state)``: the logits with the solve started at ``state``, and the state to
    start the next call from (for a DEQ its equilibrium ``z*``; no gradient flows
    through it). Calling the object is the cold forward ``apply(x, init(x))[0]``, so
    anything that takes a ``logits_fn`` takes it, and scoring with it scores the model
    as defined.

    Consecutive iterates of an iterative attack differ by one step, so the previous
    iterate's fixed point starts the next solve close to its solution: with a
    tolerance-stopped solver most solves then take a few steps (Bai, Kolter & Koltun
    2019 reuse fixed points across time steps the same way). :func:`~deqjax.attacks.pgd`,
    :func:`~deqjax.attacks.apgd` and :func:`~deqjax.attacks.apgd_targeted` thread the
    state through their iterations (per restart, per target); the value an attack sees
    at an iterate is the warm-started solve's, within the solver tolerance of the cold
    one, and its gradient is the model's gradient at that solution. Build one for a
    DEQ classifier with :func:`deqjax.models.warm_start_logits`.
    """

    init: Callable
    apply: Callable

    def __call__(self, x):
        return self.apply(x, self.init(x))[0]


def initial_state(logits_fn, x):
    """The cold state of a :class:`WarmStartLogits` for ``x``; ``()`` for a plain one."""
    return logits_fn.init(x) if isinstance(logits_fn, WarmStartLogits) else ()


def logits_and_state(logits_fn, x, state):
    """``(logits, next state)``: warm-started from ``state`` for a
    :class:`WarmStartLogits`, ``(logits_fn(x), state)`` for a plain logits function."""
    if isinstance(logits_fn, WarmStartLogits):
        logits, new = logits_fn.apply(x, state)
        return logits, jax.tree.map(lax.stop_gradient, new)
    return logits_fn(x), state


def loss_grad_state(logits_fn, loss_fn):
    """``f(x, y, state, *extra) -> (per-example loss, logits, dloss/dx, next state)``:
    :func:`loss_and_grad` with the forward started from ``state`` (see
    :func:`logits_and_state`; a plain ``logits_fn`` passes ``state`` through)."""

    def total(x, y, state, *extra):
        logits, new = logits_and_state(logits_fn, x, state)
        per = loss_fn(logits, y, *extra)
        return jnp.sum(per), (per, logits, new)

    def f(x, y, state, *extra):
        (_, (per, logits, new)), g = jax.value_and_grad(total, has_aux=True)(x, y, state, *extra)
        return per, logits, g, new

    return f


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
