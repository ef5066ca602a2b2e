"""A 2-D convolution whose input-gradient is itself a forward convolution.

On XLA:CPU a convolution's input-VJP inside ``lax.while_loop``/``lax.scan`` (what the
implicit backward of a conv DEQ iterates, and what every iterative attack runs) is
several times slower than the mathematically identical forward convolution with the
spatially flipped, in/out-swapped kernel written out explicitly: JAX's transpose rule
expresses the swap through dimension numbers and a ``rev``, a non-canonical kernel
layout that XLA:CPU runs on a slow path inside loop bodies (measured: ~20× for the DEQ
cell's stride-1 conv, 2× for a whole small conv net's input gradient in a 20-step
attack scan; straight-line code is fast either way). :func:`conv2d` states that
transpose explicitly with ``jax.custom_vjp``. For stride ``s`` and padding
``(lo, hi)`` per spatial axis (input size ``n``, kernel ``k``, output size ``o``):

    y = x ⋆_s W
    ∂ℓ/∂x = dilate_s(∂ℓ/∂y) ⋆_1 W̃,   W̃[i, j, o, c] = W[k−1−i, k−1−j, c, o],
            padded by (k−1−lo, n − (o−1)s − 1 + lo)

(``dilate_s`` inserts s−1 zeros between cotangent entries: ``lhs_dilation``), exact
for any stride, padding and kernel size (tested against ``jax.vjp`` of
``lax.conv_general_dilated``). The kernel gradient is a contraction of the shifted
input with the cotangent, one per kernel tap (see :func:`_kernel_gradient`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.solvers import batch_axis_spec

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=(1, 1), padding="SAME"):
    return lax.conv_general_dilated(
        x, w, window_strides=tuple(stride), padding=padding, dimension_numbers=_DN
    )


def transpose_kernel(w: jax.Array) -> jax.Array:
    """The kernel of the adjoint convolution: flip H, W; swap I, O."""
    return jnp.swapaxes(w[::-1, ::-1], 2, 3)


def _pads(in_hw, k_hw, stride, padding):
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(in_hw, k_hw, stride, padding)]
    return [tuple(int(v) for v in p) for p in padding]


def _input_gradient_pads(in_hw, k_hw, out_hw, stride, pads):
    """Padding of the dilated cotangent for the input gradient (module docstring)."""
    return [
        (k - 1 - lo, n - (o - 1) * s - 1 + lo)
        for n, k, o, s, (lo, _) in zip(in_hw, k_hw, out_hw, stride, pads)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, w, stride, padding):
    return _conv(x, w, stride, padding)


def _conv2d_fwd(x, w, stride, padding):
    return _conv(x, w, stride, padding), (x, w)


def _kernel_gradient(x, g, kernel_shape, stride, pads):
    """``∂ℓ/∂W[i, j, c, o] = Σ_{n,h,w} x̃[n, s·h+i, s·w+j, c] g[n, h, w, o]``, one
    contraction per kernel tap of the (strided) shifted padded input with the
    cotangent. Under ``vmap`` (per-example DEQ cells) these are batched matmuls; the
    conv-based kernel gradient becomes a convolution with per-example kernels, which
    XLA's SPMD partitioner gets wrong when the batch is sharded (wrong gradients on
    several devices; repro in the tests). The taps are plain slices: extracting all
    patches at once (``conv_general_dilated_patches``, itself a convolution with a
    one-hot kernel of k²·C outputs) cost 3–6× more (measured per-example under vmap,
    batch 64, 14×14: 24 → 8 ms for 32→64 channels, 63 → 22 ms for 64→32)."""
    kh, kw, c_in, c_out = kernel_shape
    (lo0, hi0), (lo1, hi1) = pads
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (lo0, hi0, 0), (lo1, hi1, 0), (0, 0, 0)))
    n, oh, ow = g.shape[0], g.shape[1], g.shape[2]
    s0, s1 = stride
    taps = []
    for i in range(kh):
        for j in range(kw):
            xs = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (oh - 1) * s0 + 1, j + (ow - 1) * s1 + 1, c_in),
                (1, s0, s1, 1),
            )
            # summed over the batch: on an Explicit-axis mesh with a sharded batch the
            # (replicated) kernel gradient must say so
            taps.append(jnp.einsum("nhwc,nhwo->co", xs, g, **_replicated_sum(g)))
    return jnp.stack(taps).reshape(kh, kw, c_in, c_out)


def _replicated_sum(x) -> dict:
    """``out_sharding=P()`` for a contraction over ``x``'s batch axis when that axis is
    sharded in ``x``'s type (an Explicit-axis mesh); no keyword otherwise."""
    return {"out_sharding": jax.sharding.PartitionSpec()} if batch_axis_spec(x) else {}


def _transpose(y, w, in_hw, stride, pads):
    """The adjoint convolution (module docstring); ``pads`` are the forward conv's
    explicit ``((lo, hi), (lo, hi))``."""
    gpads = _input_gradient_pads(in_hw, w.shape[:2], y.shape[1:3], stride, pads)
    return lax.conv_general_dilated(
        y, transpose_kernel(w), (1, 1), gpads, lhs_dilation=tuple(stride), dimension_numbers=_DN
    )


def _conv2d_bwd(stride, padding, res, g):
    x, w = res
    pads = _pads(x.shape[1:3], w.shape[:2], stride, padding)
    dx = _transpose(g, w, x.shape[1:3], stride, pads)
    return dx, _kernel_gradient(x, g, w.shape, stride, pads).astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    stride: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """2-D convolution (cross-correlation; NHWC input, HWIO kernel) with ``stride``
    (an int or a pair) and ``padding`` (``"SAME"``, ``"VALID"`` or ``((lo, hi), (lo,
    hi))``), equal to ``lax.conv_general_dilated`` in value and gradient, whose
    input-gradient is computed as a forward convolution (see module docstring)."""
    stride, padding = _normalise(stride, padding)
    check_conv_args(x, w)
    return _conv2d(x, w, stride, padding)


def conv2d_transpose(
    y: jax.Array,
    w: jax.Array,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """The exact adjoint of :func:`conv2d` with kernel ``w`` at NHWC ``input_shape``:
    ``⟨conv2d(x, w), y⟩ = ⟨x, conv2d_transpose(y, w, x.shape)⟩``, written as the
    forward convolution of the module docstring (the input gradient of
    :func:`conv2d`). ``input_shape`` fixes the rows a strided conv skips."""
    stride, padding = _normalise(stride, padding)
    x = jax.ShapeDtypeStruct(tuple(input_shape), y.dtype)
    check_conv_args(x, w)
    out = jax.eval_shape(lambda x: _conv(x, w, stride, padding), x)
    if y.shape != out.shape:
        raise ValueError(
            f"y has shape {y.shape} but conv2d at input shape {x.shape} gives {out.shape}"
        )
    pads = _pads(x.shape[1:3], w.shape[:2], stride, padding)
    return _transpose(y, w.astype(y.dtype), x.shape[1:3], stride, pads)


def _normalise(stride, padding):
    stride = (int(stride),) * 2 if isinstance(stride, int) else tuple(int(s) for s in stride)
    if len(stride) != 2 or min(stride) < 1:
        raise ValueError(f"stride must be a positive int or a pair of them, got {stride}")
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got {padding!r}"
            )
    else:
        padding = tuple(tuple(int(v) for v in p) for p in padding)
        if len(padding) != 2 or any(len(p) != 2 for p in padding):
            raise ValueError(f"explicit padding must be ((lo, hi), (lo, hi)), got {padding}")
    return stride, padding


def check_conv_args(x: jax.Array, w: jax.Array) -> None:
    """Trace-time checks with messages that say what to fix."""
    if x.ndim != 4:
        raise ValueError(
            f"conv2d expects an NHWC input of rank 4, got shape {x.shape}; "
            "add a batch axis with x[None] for a single example"
        )
    if w.ndim != 4:
        raise ValueError(f"conv2d expects an HWIO kernel of rank 4, got shape {w.shape}")
    if x.shape[-1] != w.shape[2]:
        raise ValueError(f"input has {x.shape[-1]} channels but the kernel expects {w.shape[2]}")
