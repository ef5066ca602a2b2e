"""Neighbour search for OTAD's convex integration, and a triplet metric loss.

OTAD (Gai, Wang & Zhang, arXiv:2408.00329) interpolates the feature map on
the K nearest training points of each test point, found either in the input /
embedding space or in a metric-learning embedding trained with a triplet loss
(Schroff, Kalenichenko & Philbin 2015, "FaceNet").

Scale. :func:`knn` is exact and dense: one (B, N) matrix of squared distances
``|q|^2 - 2 q.k + |k|^2`` and ``lax.top_k``; it is fine for MNIST-size indexes
(N = 60k, chunk the queries). At CIFAR/ImageNet scale exact search is replaced
by approximate nearest-neighbour search: ``jax.lax.approx_min_k`` (TPU-friendly
partial reduction, Chern et al. 2022), or an external ANN index (FAISS IVF-PQ /
HNSW, ScaNN) over the learned metric embedding, queried outside jit; the CIP
itself only needs the (K, d) neighbour arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pairwise_sq_dists(queries, keys):
    """(B, N) squared Euclidean distances between rows of queries and keys."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"need queries (B, d) and keys (N, d) with the same d; got "
            f"{queries.shape} and {keys.shape}. Flatten the points first."
        )
    qq = jnp.sum(queries * queries, axis=1)[:, None]
    kk = jnp.sum(keys * keys, axis=1)[None, :]
    return jnp.maximum(qq - 2.0 * queries @ keys.T + kk, 0.0)


def knn(queries, keys, k: int):
    """Exact k nearest neighbours: returns ``(sq_dists (B, k), indices (B, k))``,
    nearest first. ``queries`` may be (d,) for a single point (outputs (k,))."""
    single = queries.ndim == 1
    q = queries[None] if single else queries
    if not 1 <= k <= keys.shape[0]:
        raise ValueError(f"k must be in [1, N={keys.shape[0]}]; got k={k}")
    neg, idx = jax.lax.top_k(-pairwise_sq_dists(q, keys), k)
    d2 = -neg
    return (d2[0], idx[0]) if single else (d2, idx)


def triplet_loss(anchor, positive, negative, margin: float = 1.0):
    """Mean hinge ``max(0, |a - p|^2 - |a - n|^2 + margin)`` over a batch (B, d).

    Pulls same-class pairs together and pushes other-class pairs at least
    ``margin`` further (squared distances, FaceNet)."""
    if not (anchor.shape == positive.shape == negative.shape) or anchor.ndim != 2:
        raise ValueError(
            f"anchor, positive, negative must all be (B, d); got "
            f"{anchor.shape}, {positive.shape}, {negative.shape}"
        )
    dp = jnp.sum((anchor - positive) ** 2, axis=-1)
    dn = jnp.sum((anchor - negative) ** 2, axis=-1)
    return jnp.mean(jnp.maximum(dp - dn + margin, 0.0))


def batch_hard_triplet_loss(embeddings, labels, margin: float = 1.0):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017): for each anchor the
    farthest same-label point and the nearest other-label point in the batch.
    Anchors with no positive or no negative contribute zero."""
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need embeddings (B, d) and labels (B,); got {embeddings.shape}, {labels.shape}"
        )
    d2 = pairwise_sq_dists(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(labels.shape[0], dtype=bool)
    pos_mask, neg_mask = same & ~eye, ~same
    hardest_pos = jnp.max(jnp.where(pos_mask, d2, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(neg_mask, d2, jnp.inf), axis=1)
    valid = jnp.any(pos_mask, axis=1) & jnp.any(neg_mask, axis=1)
    loss = jnp.where(valid, jnp.maximum(hardest_pos - hardest_neg + margin, 0.0), 0.0)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(valid), 1)
