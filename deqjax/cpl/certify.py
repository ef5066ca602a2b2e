"""Hinge loss and ℓ2 certificates for 1-Lipschitz (CPL) networks.

Meunier et al. (2022), "A Dynamical System Perspective for Lipschitz Neural
Networks", ICML, train with the multi-class hinge loss and certify with the
margin of a 1-Lipschitz network (Tsuzuku et al. 2018): if ``f`` is 1-Lipschitz in
ℓ2 then ``f_y − f_j`` is √2-Lipschitz, so the prediction cannot change within
radius ``(f_y − max_{j≠y} f_j)/√2``. With a row-normalised last layer
``f = Ŵ g + b`` on a 1-Lipschitz ``g`` the margin ``f_y − f_j`` is
``‖ŵ_y − ŵ_j‖``-Lipschitz, giving ``min_j (f_y − f_j)/‖ŵ_y − ŵ_j‖``.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

LAST_LAYERS = ("truncate", "row_normalized")


def _check_logits_labels(logits, labels):
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, classes), got {logits.shape}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be integer class indices of shape {logits.shape[:1]}, got "
            f"{labels.shape} (one-hot labels? use labels.argmax(-1))."
        )


def multiclass_hinge_loss(logits: jax.Array, labels: jax.Array, margin: float = 0.7) -> jax.Array:
    """Per-example ``(1/C) Σ_{j≠y} max(0, m − (f_y − f_j))`` (PyTorch MultiMarginLoss).

    Returns shape ``(batch,)``; take the mean yourself.
    """
    _check_logits_labels(logits, labels)
    c = logits.shape[-1]
    fy = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    terms = jax.nn.relu(margin - (fy - logits))
    terms = jnp.where(jax.nn.one_hot(labels, c, dtype=bool), 0.0, terms)
    return terms.sum(-1) / c


def certified_radius(
    logits: jax.Array,
    labels: jax.Array,
    last_layer: str = "truncate",
    last_weight: jax.Array | None = None,
) -> jax.Array:
    """ℓ2 radius within which the prediction provably stays ``labels`` (0 if wrong).

    ``"truncate"``: ``(f_y − max_{j≠y} f_j)/√2`` for a 1-Lipschitz network.
    ``"row_normalized"``: ``min_{j≠y} (f_y − f_j)/‖w_y − w_j‖`` where ``last_weight``
    is the (row-normalised) ``(classes, d)`` last weight applied to 1-Lipschitz
    features. Misclassified examples (or ties) get radius 0.
    """
    _check_logits_labels(logits, labels)
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
    return jnp.maximum(ratios.min(-1), 0.0)


def certified_accuracy(radii: jax.Array, correct: jax.Array, eps_list: Iterable[float]) -> dict:
    """``{ε: fraction of examples correct with certified radius > ε}``.

    At ``ε = 0`` this is the clean accuracy (Meunier et al. 2022, Tab. 1).
    """
    radii, correct = jnp.asarray(radii), jnp.asarray(correct, bool)
    if radii.shape != correct.shape or radii.ndim != 1:
        raise ValueError(
            f"radii {radii.shape} and correct {correct.shape} must be equal 1-D shapes."
        )
    out = {}
    for eps in eps_list:
        ok = correct if eps <= 0 else correct & (radii > eps)
        out[float(eps)] = float(jnp.mean(ok))
    return out
