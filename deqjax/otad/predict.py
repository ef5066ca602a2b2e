"""OTAD inference: the trained ResNet's head applied to the CIP feature.

Gai, Wang & Zhang, arXiv:2408.00329. For a test image: embedding
``x = E(image)``; its K nearest training embeddings ``x_j`` (with stored
features ``z_j = T(x_j)``); the CIP feature ``g(x)`` (LP potentials with L
relaxation, then the dual QP); logits ``head(g(x))``. Everything is
jit-able; the batch is vmapped. The OTAD-NN variant replaces the CIP solve by a
trained :class:`~deqjax.otad.neural_cip.NeuralCIP`.
"""

from __future__ import annotations

import jax

from deqjax.otad.cip import convex_integration
from deqjax.otad.neighbours import knn


def build_index(model, params, images):
    """Embeddings ``x0`` (N, d) and features ``xK`` (N, d) of training images
    (one batch; call per chunk and concatenate for large sets)."""
    out = model.apply(params, images)
    return out["x0"], out["xK"]


def gather_neighbours(queries, keys, index_x0, index_z, k: int, *, exclude_self: bool = False):
    """K nearest neighbours of ``queries`` (B, d_key) among ``keys`` (N, d_key);
    returns ``(xs (B, k, d), zs (B, k, d_z), idx (B, k))``. ``exclude_self``
    drops the nearest hit (use when the queries are the indexed points)."""
    if index_x0.shape[0] != keys.shape[0] or index_z.shape[0] != keys.shape[0]:
        raise ValueError(
            f"keys, index_x0 and index_z must have the same number of rows; "
            f"got {keys.shape[0]}, {index_x0.shape[0]}, {index_z.shape[0]}"
        )
    _, idx = knn(queries, keys, k + int(exclude_self))
    idx = idx[:, 1:] if exclude_self else idx
    return index_x0[idx], index_z[idx], idx


def otad_logits(
    model,
    params,
    index_x0,
    index_z,
    images,
    *,
    k: int = 10,
    l: float = 0.0,
    L: float = 2.0,
    form: str = "authors",
    n_relax: int = 5,
    factor: float = 2.0,
    maxiter: int = 500,
    index_keys=None,
    query_keys=None,
):
    """OTAD logits ``head(g(x))`` for a batch of images (B, 28, 28, 1).

    Neighbours are searched in the embedding space (default) or, when given, in
    a metric embedding: ``index_keys`` (N, e) for the training points and
    ``query_keys`` (B, e) for the test points. Returns ``(logits (B, C), records)``,
    records a dict of per-example arrays: ``L_used``, ``relaxed``,
    ``feasible`` (LP feasibility at L_used), ``value`` (CIP optimum) and
    ``neighbours`` (B, k) indices into the index.
    """
    if (index_keys is None) != (query_keys is None):
        raise ValueError("pass both index_keys and query_keys (metric embedding) or neither")
    x0 = model.apply(params, images, method="embed")
    keys = index_x0 if index_keys is None else index_keys
    queries = x0 if query_keys is None else query_keys
    xs, zs, idx = gather_neighbours(queries, keys, index_x0, index_z, k)
    res = jax.vmap(
        lambda x, a, b: convex_integration(
            x, a, b, l, L, form, n_relax=n_relax, factor=factor, maxiter=maxiter
        )
    )(x0, xs, zs)
    logits = model.apply(params, res.g.astype(x0.dtype), method="head")
    records = {
        "L_used": res.L_used,
        "relaxed": res.relaxed,
        "feasible": res.feasible,
        "value": res.value,
        "neighbours": idx,
    }
    return logits, records


def neural_otad_logits(
    model,
    params,
    cip_net,
    cip_params,
    index_x0,
    index_z,
    images,
    *,
    k: int = 10,
    index_keys=None,
    query_keys=None,
):
    """OTAD-NN logits ``head(NeuralCIP(x, x_j, z_j))``, differentiable end to end
    in the images (neighbour selection is piecewise constant)."""
    x0 = model.apply(params, images, method="embed")
    keys = index_x0 if index_keys is None else index_keys
    queries = x0 if query_keys is None else query_keys
    xs, zs, _ = gather_neighbours(queries, keys, index_x0, index_z, k)
    return model.apply(params, cip_net.apply(cip_params, x0, xs, zs), method="head")


def cip_targets(
    x0,
    xs,
    zs,
    *,
    l: float = 0.0,
    L: float = 2.0,
    form: str = "authors",
    n_relax: int = 5,
    factor: float = 2.0,
    maxiter: int = 500,
):
    """CIP-solver features (B, d_z) to train :class:`NeuralCIP` against (no gradient)."""
    res = jax.vmap(
        lambda x, a, b: convex_integration(
            x, a, b, l, L, form, n_relax=n_relax, factor=factor, maxiter=maxiter
        )
    )(x0, xs, zs)
    return jax.lax.stop_gradient(res.g)
