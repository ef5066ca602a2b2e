"""The kernel under every DEQ workload: the cell's 3×3 convolution, and the machine's
matrix-multiply ceiling.

The DEQ cell spends ~88% of its time in its two 3×3 convolutions (measured on one
CPU core at batch 64: 10.2 of 11.6 ms per evaluation). This workload times
``conv_a`` (3×3, stride 1, SAME, 32 → 64 channels, batch × 14 × 14) alone in each
framework (XLA:CPU's conv vs oneDNN's, forward only) and, in JAX, the matrix product
of the same FLOPs (the im2col GEMM ``(B·14·14) × 288 @ 288 × 64``): a conv that ran
at that speed would bound how much faster a conv-bound workload can get.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def conv_flops(batch: int, hw: int = 14, c_in: int = 32, c_out: int = 64, k: int = 3) -> float:
    return 2.0 * batch * hw * hw * k * k * c_in * c_out


def conv(batch: int = 64, dev=None, hw: int = 14, c_in: int = 32, c_out: int = 64):
    """(jax_fn, torch_fn): one forward 3×3 convolution each, same data and weights."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, hw, hw, c_in)).astype(np.float32)
    w = rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    f = jax.jit(
        lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    dev = dev or torch.device("cpu")
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).to(dev)

    def torch_fn():
        with torch.no_grad():
            out = torch.nn.functional.conv2d(xt, wt, padding=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    return (lambda: f(xj, wj)), torch_fn


def gemm(batch: int = 64, hw: int = 14, c_in: int = 32, c_out: int = 64):
    """The JAX matrix product with the conv's FLOPs (no torch peer)."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((batch * hw * hw, 9 * c_in)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((9 * c_in, c_out)).astype(np.float32))
    f = jax.jit(jnp.dot)
    return lambda: f(a, b)
