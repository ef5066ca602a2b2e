"""Small Flax layers shared by the models."""

from __future__ import annotations

import flax.linen as nn

from deqjax.conv import conv2d


class FastConv(nn.Module):
    """``nn.Conv``-compatible convolution (same parameter names, shapes and
    initialisers) with a forward-conv input-gradient (:func:`deqjax.conv.conv2d`):
    use it wherever input gradients run inside loops — equilibrium cells, and any
    model that iterative attacks (PGD, APGD) will differentiate on XLA:CPU."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str = "SAME"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        y = conv2d(x, w.astype(x.dtype), self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y
