"""Hinge loss and ℓ2 certificates for 1-Lipschitz (CPL) networks.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML, train with the multi-class hinge loss and certify with the
margin of a 1-Lipschitz network (Tsuzuku et al. 2018): if ``f`` is 1-Lipschitz in
ℓ2 then ``f_y − f_j`` is √2-Lipschitz, so the prediction cannot change within
radius ``(f_y − max_{j≠y} f_j)/√2``. With a row-normalised last layer
``f = Ŵ g + b`` on a 1-Lipschitz ``g`` the margin ``f_y − f_j`` is
``‖ŵ_y − ŵ_j‖``-Lipschitz, giving ``min_j (f_y − f_j)/‖ŵ_y − ŵ_j‖``.

The radius is a proof only if the network is 1-Lipschitz, which a CPL is when its
step uses an upper bound on ``‖W‖₂`` — power iteration gives a lower bound. So
:func:`certified_radius` takes :class:`CertifiedLogits`, which only
:func:`certified_logits` makes: it computes every layer's Gram-iteration upper bound
from the parameters itself and runs the network with them. Raw logits are refused
unless the caller vouches for the Lipschitz constant (``assume_lipschitz=True``, e.g.
the conventional certificate of a network run with power-iteration σ).
"""

from __future__ import annotations

from collections.abc import Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl.bounds import GRAM_ITERS
from deqjax.cpl.network import SIGMA_COLLECTION, CPLNet, last_layer_weight, prepare_sigmas

LAST_LAYERS = ("truncate", "row_normalized")


@flax.struct.dataclass
class CertifiedLogits:
    """Logits of a CPL network whose every layer is stepped with a proven upper bound
    on its operator norm, so the network is 1-Lipschitz (ℓ2) by construction. Made by
    :func:`certified_logits`; ``sigmas`` are the per-layer bounds used."""

    logits: jax.Array
    last_weight: jax.Array | None
    sigmas: dict
    last_layer: str = flax.struct.field(pytree_node=False, default="truncate")


def certified_logits(
    net: CPLNet, variables, x, *, batch_size: int = 500, gram_iters: int = GRAM_ITERS
) -> CertifiedLogits:
    """Logits of ``net`` with every CPL's σ a Gram-iteration upper bound computed here.

    The bounds are computed from ``variables["params"]`` at the input size of ``x``
    (any stored ``"sigma"`` collection is ignored), so the result cannot come from a
    stale or power-iteration σ. Eager (the bounds are float64 on the host); the
    forward pass is jitted in batches of ``batch_size``.
    """
    if not isinstance(net, CPLNet):
        raise TypeError(
            f"certified_logits needs a deqjax.cpl.CPLNet (and its variables), got "
            f"{type(net).__name__}; for a wrapper pass its CPLNet and the CPLNet's variables."
        )
    x = jnp.asarray(x)
    variables = {k: v for k, v in variables.items() if k != SIGMA_COLLECTION}
    prepared = prepare_sigmas(net, variables, x[:1], power=False, gram_iters=gram_iters)
    apply = jax.jit(lambda v, a: net.apply(v, a, sigma="upper"))
    logits = jnp.concatenate(
        [apply(prepared, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )
    weight = last_layer_weight(variables) if net.last_layer == "row_normalized" else None
    return CertifiedLogits(logits, weight, prepared[SIGMA_COLLECTION], net.last_layer)


def _check_logits_labels(logits, labels) -> jax.Array:
    """Shape/dtype checks; a concrete out-of-range label raises. Returns the mask of
    valid labels (under jit invalid ones are masked to NaN by the callers)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, classes), got {logits.shape}.")
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class indices of shape {logits.shape[:1]}, got "
            f"{labels.dtype}{labels.shape} (one-hot labels? use labels.argmax(-1))."
        )
    c = logits.shape[-1]
    valid = (labels >= 0) & (labels < c)
    if not isinstance(valid, jax.core.Tracer) and not bool(jnp.all(valid)):
        bad = np.asarray(labels)[~np.asarray(valid)]
        raise ValueError(
            f"labels must lie in [0, {c}) for {c} classes; got {bad[:5].tolist()}"
            f"{' …' if bad.size > 5 else ''}."
        )
    return valid


def multiclass_hinge_loss(logits: jax.Array, labels: jax.Array, margin: float = 0.7) -> jax.Array:
    """Per-example ``(1/C) Σ_{j≠y} max(0, m − (f_y − f_j))`` (PyTorch MultiMarginLoss).

    Returns shape ``(batch,)``; take the mean yourself. Labels outside ``[0, C)`` raise
    (concrete) or give NaN (traced, e.g. under jit).
    """
    valid = _check_logits_labels(logits, labels)
    c = logits.shape[-1]
    fy = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    terms = jax.nn.relu(margin - (fy - logits))
    terms = jnp.where(jax.nn.one_hot(labels, c, dtype=bool), 0.0, terms)
    return jnp.where(valid, terms.sum(-1) / c, jnp.nan)


def certified_radius(
    logits,
    labels: jax.Array,
    last_layer: str | None = None,
    last_weight: jax.Array | None = None,
    *,
    assume_lipschitz: bool = False,
) -> jax.Array:
    """ℓ2 radius within which the prediction provably stays ``labels`` (0 if wrong).

    ``logits``: :class:`CertifiedLogits` from :func:`certified_logits` (the network is
    1-Lipschitz by construction; its last layer and weight come with it), or a raw
    ``(batch, classes)`` array together with ``assume_lipschitz=True`` — the caller
    then vouches that the network is 1-Lipschitz (e.g. the conventional certificate
    with power-iteration σ, which is not a proof). Raw arrays without it are refused.

    ``"truncate"``: ``(f_y − max_{j≠y} f_j)/√2`` for a 1-Lipschitz network.
    ``"row_normalized"``: ``min_{j≠y} (f_y − f_j)/‖w_y − w_j‖`` where ``last_weight``
    is the (row-normalised) ``(classes, d)`` last weight applied to 1-Lipschitz
    features. Misclassified examples (or ties) get radius 0. Labels outside
    ``[0, C)`` raise (concrete) or give NaN (traced); non-finite logits give NaN.
    """
    if isinstance(logits, CertifiedLogits):
        if last_layer not in (None, logits.last_layer) or last_weight is not None:
            raise ValueError(
                "CertifiedLogits carry their own last layer and weight; do not pass "
                "last_layer / last_weight with them."
            )
        last_layer, last_weight, logits = logits.last_layer, logits.last_weight, logits.logits
    elif not assume_lipschitz:
        raise ValueError(
            "certified_radius got plain logits, which carry no proof that the network is "
            "1-Lipschitz (power-iteration σ are lower bounds on the layer norms). Compute "
            "them with deqjax.cpl.certified_logits(net, variables, x) (Gram-iteration "
            "upper bounds), or pass assume_lipschitz=True to certify under your own claim "
            "(e.g. the conventional certificate of Meunier et al.)."
        )
    last_layer = "truncate" if last_layer is None else last_layer
    valid = _check_logits_labels(logits, labels)
    c = logits.shape[-1]
    fy = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    is_y = jax.nn.one_hot(labels, c, dtype=bool)
    if last_layer == "truncate":
        scale = jnp.full_like(logits, jnp.sqrt(2.0))
    elif last_layer == "row_normalized":
        if last_weight is None or last_weight.ndim != 2 or last_weight.shape[0] != c:
            raise ValueError(
                "row_normalized certificates need last_weight of shape (classes, d) "
                f"with classes={c}; got "
                f"{None if last_weight is None else last_weight.shape}. Use "
                "deqjax.cpl.last_layer_weight(variables)."
            )
        diff = last_weight[labels][:, None, :] - last_weight[None, :, :]
        scale = jnp.maximum(jnp.linalg.norm(diff, axis=-1), 1e-12)
    else:
        raise ValueError(f"unknown last_layer {last_layer!r}; use one of {LAST_LAYERS}.")
    ratios = jnp.where(is_y, jnp.inf, (fy - logits) / scale)
    radius = jnp.maximum(ratios.min(-1), 0.0)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return jnp.where(valid & finite, radius, jnp.nan)


def certified_accuracy(radii: jax.Array, correct: jax.Array, eps_list: Iterable[float]) -> dict:
    """``{ε: fraction of examples correct with certified radius > ε}``.

    At ``ε = 0`` this is the clean accuracy (Meunier et al. 2022, Tab. 1).
    """
    radii, correct = jnp.asarray(radii), jnp.asarray(correct, bool)
    if radii.shape != correct.shape or radii.ndim != 1:
        raise ValueError(
            f"radii {radii.shape} and correct {correct.shape} must be equal 1-D shapes."
        )
    if bool(jnp.any(jnp.isnan(radii))):
        raise ValueError(
            f"{int(jnp.sum(jnp.isnan(radii)))} radii are NaN (non-finite logits or invalid "
            "labels): no certified accuracy to report."
        )
    out = {}
    for eps in eps_list:
        ok = correct if eps <= 0 else correct & (radii > eps)
        out[float(eps)] = float(jnp.mean(ok))
    return out
