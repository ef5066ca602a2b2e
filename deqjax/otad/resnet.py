"""OT-regularised residual network of OTAD (step 1) and its loss.

Gai, Wang & Zhang, arXiv:2408.00329. A residual flow
``x^{k+1} = x^k + r_k(x^k)``, k = 0..N-1, between a convolutional embedding
``x^0 = E(image)`` and features ``x^N`` feeding a linear head, trained with

    loss = CE(head(x^N), y) + lambda * mean_batch sum_k |x^{k+1} - x^k|^2.

The penalty is the (discrete, kinetic) transport cost of the flow; minimising
it pushes ``T: x^0 -> x^N`` towards an optimal transport map, i.e. the gradient
of a convex potential (Brenier), which the CIP then interpolates. Our choice
(docs/methods/otad.md): the authors' exact regulariser is not public; this is the transport
cost of the residual flow. Embeddings and features are returned *flattened*
(B, d) so that T is a map between vectors, as the CIP needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import optax

BLOCKS = ("conv", "dense")


class ResidualBranch(nn.Module):
    """r_k: conv-relu-conv (3x3, same channels) or dense-relu-dense on the
    flattened state. ``zero_init`` zeroes the last layer so that r_k = 0."""

    kind: str = "conv"
    hidden: int = 64
    zero_init: bool = False

    @nn.compact
    def __call__(self, x):
        last_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        if self.kind == "conv":
            h = nn.relu(nn.Conv(x.shape[-1], (3, 3), padding="SAME")(x))
            return nn.Conv(x.shape[-1], (3, 3), padding="SAME", kernel_init=last_init)(h)
        if self.kind == "dense":
            h = nn.relu(nn.Dense(self.hidden)(x))
            return nn.Dense(x.shape[-1], kernel_init=last_init)(h)
        raise ValueError(f"unknown residual block {self.kind!r}; choose one of {BLOCKS}")


class OTResNet(nn.Module):
    """Small ResNet for (B, 28, 28, 1) images with an explicit transport cost.

    ``__call__`` returns a dict: ``logits`` (B, C), ``transport_cost`` (scalar,
    batch mean of sum_k |x^{k+1} - x^k|^2), ``x0`` (B, d) embedding, ``xK``
    (B, d) features. ``embed``, ``flow`` and ``head`` are exposed (use
    ``model.apply(params, ..., method=OTResNet.head)``) so the CIP can replace
    ``T(x0)`` by its own feature before the head.
    """

    num_classes: int = 10
    width: int = 8
    num_blocks: int = 4
    block: str = "conv"
    hidden: int = 64
    zero_init_residual: bool = False
    image_shape: Sequence[int] = (28, 28, 1)

    def setup(self):
        if self.block not in BLOCKS:
            raise ValueError(f"unknown residual block {self.block!r}; choose one of {BLOCKS}")
        self.stem = nn.Conv(self.width, (3, 3), strides=(2, 2), padding="SAME")
        self.branches = [
            ResidualBranch(self.block, self.hidden, self.zero_init_residual)
            for _ in range(self.num_blocks)
        ]
        self.classifier = nn.Dense(self.num_classes)

    @property
    def state_shape(self):
        h, w, _ = self.image_shape
        return ((h + 1) // 2 // 2, (w + 1) // 2 // 2, self.width)

    def embed(self, images):
        """x^0: stride-2 conv, ReLU, 2x2 average pool, flattened -> (B, d)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"images must be (B, {', '.join(map(str, self.image_shape))})"
                f" in [0, 1]; got shape {images.shape}"
            )
        h = nn.avg_pool(nn.relu(self.stem(images)), (2, 2), strides=(2, 2))
        return h.reshape(h.shape[0], -1)

    def flow(self, x0):
        """Residual flow from x^0 (B, d): returns ``(x^N (B, d), cost (B,))`` with
        ``cost = sum_k |x^{k+1} - x^k|^2`` per example."""
        x = x0.reshape((x0.shape[0],) + self.state_shape) if self.block == "conv" else x0
        cost = jnp.zeros(x0.shape[0], x0.dtype)
        for branch in self.branches:
            r = branch(x)
            cost = cost + jnp.sum(r.reshape(r.shape[0], -1) ** 2, axis=-1)
            x = x + r
        return x.reshape(x.shape[0], -1), cost

    def head(self, features):
        """Linear classifier on flattened features (B, d) -> logits (B, C)."""
        return self.classifier(features)

    def __call__(self, images):
        x0 = self.embed(images)
        xK, cost = self.flow(x0)
        return {"logits": self.head(xK), "transport_cost": jnp.mean(cost), "x0": x0, "xK": xK}


def transport_cost(states):
    """Pure transport cost of a discrete flow: ``states`` (N+1, B, ...) ->
    batch mean of ``sum_k |x^{k+1} - x^k|^2``."""
    diffs = jnp.diff(states, axis=0).reshape(states.shape[0] - 1, states.shape[1], -1)
    return jnp.mean(jnp.sum(diffs**2, axis=(0, 2)))


def otad_loss(logits, labels, transport, lam: float = 1.0):
    """``mean CE(logits, labels) + lam * transport`` (OTAD step-1 objective).

    logits (B, C); labels (B,) integer classes; transport a scalar from
    :class:`OTResNet` or :func:`transport_cost`."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (B, C) and integer labels (B,); got {logits.shape}, {labels.shape}"
        )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(ce) + lam * transport
