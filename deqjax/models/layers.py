"""Small Flax layers shared by the models."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deqjax.conv import check_conv_args, conv2d


class FastConv(nn.Module):
    """Stride-1 SAME convolution with a forward-conv input-gradient
    (:func:`deqjax.conv.conv2d`): use it inside equilibrium cells."""

    features: int
    kernel_size: int = 3
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        check_conv_args(x, w)
        y = conv2d(x, w.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y
