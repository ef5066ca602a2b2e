"""Convex Potential Layers as pure functions.

Meunier, Delattre, Araujo & Allauzen (2022), "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML. A Convex Potential Layer (CPL) is one explicit
gradient step on the convex potential ``Φ(x) = Σ_i ψ(w_iᵀ x + b_i)`` with
``ψ' = ReLU``::

    z = x − (2 / (‖W‖₂² + 1e-4)) · Wᵀ ReLU(W x + b).

Its Jacobian ``I − h Wᵀ D W`` (``D`` diagonal with entries in [0, 1]) is symmetric
with eigenvalues in ``[1 − h‖W‖₂², 1]``, so the layer is 1-Lipschitz in ℓ2 whenever
the step ``h ≤ 2/‖W‖₂²`` (Meunier et al. 2022, Prop. 3).

For the convolutional layer ``W`` is a 2-D convolution (NHWC inputs, HWIO kernels)
and ``Wᵀ`` its exact adjoint; ``‖W‖₂`` is the spectral norm of the whole operator at
the layer's input size, padding and stride (see ``power_iteration.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.conv import conv2d_transpose

EPS_STEP = 1e-4  # the 1e-4 of 2 / (‖W‖₂² + 1e-4)
PADDINGS = ("SAME", "VALID", "CIRCULAR")
_DN = ("NHWC", "HWIO", "NHWC")


def _check_padding(padding: str) -> str:
    if not isinstance(padding, str) or padding.upper() not in PADDINGS + ("ZERO",):
        raise ValueError(
            f"unknown padding {padding!r}; use one of 'SAME' (zero padding), 'VALID' or 'CIRCULAR'."
        )
    p = padding.upper()
    return "SAME" if p == "ZERO" else p


def _check_stride(stride) -> int:
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}.")
    return stride


def check_conv_args(x: jax.Array, kernel: jax.Array) -> None:
    """Trace-time checks: ``x`` is NHWC, ``kernel`` is HWIO with ``I == C``."""
    if kernel.ndim != 4:
        raise ValueError(
            f"conv kernel must have rank 4 (HWIO: kh, kw, in_channels, out_channels),"
            f" got shape {kernel.shape}."
        )
    if x.ndim != 4:
        raise ValueError(
            f"conv input must have rank 4 (NHWC), got shape {x.shape}; add a batch "
            "axis with x[None] for a single image."
        )
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"input has {x.shape[-1]} channels but the kernel expects "
            f"{kernel.shape[2]} (kernel shape {kernel.shape}, HWIO); zero-pad the "
            "input channels or build the kernel with matching in_channels."
        )


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "SAME") -> jax.Array:
    """The linear map ``W x``: 2-D convolution (cross-correlation), NHWC ⊛ HWIO.

    ``padding``: 'SAME' (zero padding, output size ceil(H/stride)), 'VALID', or
    'CIRCULAR' (periodic padding by (k−1)//2 before and k//2 after, then VALID).
    """
    check_conv_args(x, kernel)
    padding, stride = _check_padding(padding), _check_stride(stride)
    if padding == "CIRCULAR":
        kh, kw = kernel.shape[:2]
        x = jnp.pad(
            x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)), mode="wrap"
        )
        padding = "VALID"
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DN)


def conv_transpose(
    y: jax.Array,
    kernel: jax.Array,
    input_shape: Sequence[int],
    stride: int = 1,
    padding: str = "SAME",
) -> jax.Array:
    """The exact adjoint ``Wᵀ y`` of :func:`conv` at input shape ``input_shape``.

    ``<W u, v> = <u, Wᵀ v>`` holds exactly (up to rounding). It is always a forward
    convolution (much faster on XLA:CPU than a conv VJP inside loops): with SAME or
    VALID padding :func:`deqjax.conv.conv2d_transpose` (any stride and kernel size);
    with CIRCULAR padding, stride 1 and an odd kernel, the circular convolution with
    the flipped, in/out-swapped kernel. Other CIRCULAR cases use
    ``jax.linear_transpose`` of :func:`conv`.
    """
    padding, stride = _check_padding(padding), _check_stride(stride)
    input_shape = tuple(input_shape)
    if kernel.ndim != 4 or len(input_shape) != 4:
        raise ValueError(
            f"need an HWIO kernel (rank 4, got {kernel.shape}) and an NHWC "
            f"input_shape (rank 4, got {input_shape})."
        )
    if padding != "CIRCULAR":
        return conv2d_transpose(y, kernel, input_shape, stride, padding)
    kh, kw = kernel.shape[:2]
    if (
        stride == 1
        and kh % 2 == 1
        and kw % 2 == 1
        and y.shape == input_shape[:3] + (kernel.shape[3],)
    ):
        return conv(y, kernel[::-1, ::-1].swapaxes(2, 3), 1, padding)
    x0 = jax.ShapeDtypeStruct(input_shape, y.dtype)
    (out,) = jax.linear_transpose(lambda u: conv(u, kernel.astype(y.dtype), stride, padding), x0)(y)
    return out


def cpl_step_size(sigma: jax.Array) -> jax.Array:
    """``h = 2 / (σ² + 1e-4)`` with ``σ ≈ ‖W‖₂`` (Meunier et al. 2022, Eq. 8)."""
    return 2.0 / (sigma**2 + EPS_STEP)


def dense_cpl(x: jax.Array, weight: jax.Array, bias: jax.Array, sigma: jax.Array) -> jax.Array:
    """Dense CPL ``z = x − 2/(σ²+1e-4) · Wᵀ ReLU(W x + b)`` on ``x[..., d]``.

    ``weight`` is ``(inner, d)``, ``bias`` is ``(inner,)`` and ``sigma`` an
    estimate of ``‖W‖₂``: an upper bound (:func:`deqjax.cpl.dense_norm_bound`) makes
    the layer 1-Lipschitz; a power-iteration estimate
    (:func:`power_iteration.dense_spectral_norm`) is a lower bound, so it may not be.
    A zero weight is the identity. Output has the shape of ``x`` (Meunier et al.
    2022, Eq. 8).
    """
    if weight.ndim != 2:
        raise ValueError(f"dense CPL weight must be (inner, d), got {weight.shape}.")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input last axis {x.shape[-1:]} must equal the weight's d="
            f"{weight.shape[1]} (weight shape (inner, d) = {weight.shape})."
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}.")
    pre = x @ weight.T + bias
    return x - cpl_step_size(sigma) * (jax.nn.relu(pre) @ weight)


def conv_cpl(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array,
    sigma: jax.Array,
    stride: int = 1,
    padding: str = "SAME",
) -> jax.Array:
    """Convolutional CPL ``z = x − 2/(σ²+1e-4) · Wᵀ ReLU(W x + b)`` (NHWC).

    ``W`` is :func:`conv` with the HWIO ``kernel`` (``I`` = channels of ``x``,
    ``O`` = inner channels), ``Wᵀ`` its exact adjoint :func:`conv_transpose`;
    ``sigma`` must estimate the spectral norm of the whole operator at this input
    size, stride and padding (Meunier et al. 2022, Sec. 4); the layer is 1-Lipschitz
    when it bounds it from above (:func:`deqjax.cpl.conv_norm_bound`).
    """
    check_conv_args(x, kernel)
    if bias.shape != (kernel.shape[3],):
        raise ValueError(f"bias must have shape ({kernel.shape[3]},), got {bias.shape}.")
    pre = conv(x, kernel, stride, padding) + bias
    back = conv_transpose(jax.nn.relu(pre), kernel, x.shape, stride, padding)
    return x - cpl_step_size(sigma) * back


def sum_pool_lipschitz(x: jax.Array, window: int) -> jax.Array:
    """1-Lipschitz pooling: sum over non-overlapping ``window×window`` patches / window.

    Each output sums ``window²`` disjoint inputs, so the sum-pool has ℓ2 norm
    ``window``; dividing by ``window`` gives operator norm exactly 1 (Meunier et al.
    2022 use ``AvgPool2d(k, divisor_override=k)``). Trailing rows/columns that do not
    fill a window are dropped (a coordinate projection, still 1-Lipschitz).
    """
    if x.ndim != 4:
        raise ValueError(f"pooling input must be NHWC (rank 4), got {x.shape}.")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"pool window must be a positive int, got {window!r}.")
    n, h, w, c = x.shape
    hk, wk = h // window, w // window
    x = x[:, : hk * window, : wk * window].reshape(n, hk, window, wk, window, c)
    return x.sum(axis=(2, 4)) / window
