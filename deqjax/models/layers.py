"""Small Flax layers shared by the models."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from deqjax.conv import conv2d


class FastConv(nn.Module):
    """``nn.Conv``-compatible convolution (same parameter names, shapes and
    initialisers) with a forward-conv input-gradient (:func:`deqjax.conv.conv2d`):
    use it wherever input gradients run inside loops — equilibrium cells, and any
    model that iterative attacks (PGD, APGD) will differentiate on XLA:CPU.

    ``dtype``: the computation dtype (the input and the kernel are cast to it; the
    parameters stay float32). ``None``: the input's dtype."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        if self.dtype is not None:
            x = x.astype(self.dtype)
        k = self.kernel_size
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        y = conv2d(x, w.astype(x.dtype), self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y
