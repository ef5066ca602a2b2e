"""A 2-D convolution whose input-gradient is itself a forward convolution.

On XLA:CPU a convolution's input-VJP inside ``lax.while_loop`` (exactly what the
implicit backward of a conv DEQ iterates) runs ~20× slower than the mathematically
identical forward convolution with the spatially flipped, in/out-swapped kernel.
:func:`conv2d` states that transpose explicitly with ``jax.custom_vjp``:

    y = x ⋆ W            (stride 1, SAME zero padding, odd kernel, NHWC / HWIO)
    ∂ℓ/∂x = (∂ℓ/∂y) ⋆ W̃,  W̃[i, j, o, c] = W[k−1−i, k−1−j, c, o]

which is exact for stride 1 and symmetric SAME padding of an odd kernel (tested
against ``jax.vjp`` of ``lax.conv_general_dilated``). The kernel gradient is the
ordinary one. Other strides/paddings use ``lax.conv_general_dilated`` directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=(1, 1), padding="SAME"):
    return lax.conv_general_dilated(x, w, window_strides=stride, padding=padding,
                                    dimension_numbers=_DN)


def transpose_kernel(w: jax.Array) -> jax.Array:
    """The kernel of the adjoint of a stride-1 SAME convolution: flip H, W; swap I, O."""
    return jnp.swapaxes(w[::-1, ::-1], 2, 3)


@jax.custom_vjp
def conv2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """Stride-1 SAME convolution (NHWC input, HWIO kernel, odd kernel size) whose
    input-gradient is computed as a forward convolution (see module docstring)."""
    return _conv(x, w)


def _conv2d_fwd(x, w):
    return _conv(x, w), (x, w)


def _conv2d_bwd(res, g):
    x, w = res
    dx = _conv(g, transpose_kernel(w))
    _, vjp_w = jax.vjp(lambda w_: _conv(x, w_), w)
    (dw,) = vjp_w(g)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def check_conv_args(x: jax.Array, w: jax.Array) -> None:
    """Trace-time checks with messages that say what to fix."""
    if x.ndim != 4:
        raise ValueError(f"conv2d expects an NHWC input of rank 4, got shape {x.shape}; "
                         "add a batch axis with x[None] for a single example")
    if w.ndim != 4:
        raise ValueError(f"conv2d expects an HWIO kernel of rank 4, got shape {w.shape}")
    if x.shape[-1] != w.shape[2]:
        raise ValueError(f"input has {x.shape[-1]} channels but the kernel expects {w.shape[2]}")
    if w.shape[0] % 2 == 0 or w.shape[1] % 2 == 0:
        raise ValueError(f"conv2d needs an odd kernel size for SAME padding, got {w.shape[:2]}")
