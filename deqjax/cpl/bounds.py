"""Provable upper bounds on the operator norm of CPL layers by Gram iteration.

Power iteration (:mod:`deqjax.cpl.power_iteration`) gives *lower* bounds on ``‖W‖₂``;
a CPL whose step ``2/(σ²+1e-4)`` uses a lower bound may not be 1-Lipschitz. The
bounds here are *upper* bounds, so a CPL stepped with them is 1-Lipschitz by
construction (Meunier et al. 2022, Prop. 3) and its certificates are proofs.

Gram iteration (Delattre, Barthélemy, Araujo & Allauzen 2023, "Efficient Bound of
Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML). With
``G₀ = A`` and ``G_{t+1} = G_tᴴ G_t``, ``σ₁(G_t) = σ₁(A)^{2^t}`` and ``σ₁ ≤ ‖·‖_F``, so

    σ₁(A) ≤ ‖G_t‖_F^{2^{−t}}   for every t,

a bound that decreases monotonically to ``σ₁(A)`` (it is the Schatten-2^{t+1} norm,
at most ``rank^{2^{−t−1}}·σ₁``). Each ``G_t`` is divided by its Frobenius norm before
squaring and the logs of the divisors are accumulated, as in the reference code, so
nothing overflows; the computation is float64 on the host (numpy).

Dense layer ``W``: Gram iteration on ``W``.

Convolution (our :func:`deqjax.cpl.layers.conv`: cross-correlation, 'SAME' or 'VALID'
zero padding or 'CIRCULAR' padding, any stride ``s``, at the layer's H×W input).
Every such operator is a *restriction* of a circular strided correlation on a torus
``Z_N1 × Z_N2``: shift the zero-padded input by the leading pad and embed it in a
torus with ``N ≥ H + pad_lo + pad_hi`` (a multiple of ``s``); every output of the
layer reads only inputs that do not wrap around, so the layer is ``R C E`` with ``E``
an isometric embedding, ``C`` the circular operator and ``R`` a coordinate
restriction, hence ``‖layer‖ ≤ ‖C‖`` (for CIRCULAR padding with ``s | H`` it is
``C`` itself on ``Z_H``, so the bound is the exact norm). Writing input positions as
``s·m + r`` (polyphase), ``C`` is a stride-1 circular correlation on ``Z_{N/s}`` with
``s²·C_in`` input channels and kernel ``K_r[m] = K[s·m + r]``; the 2-D DFT
block-diagonalises it (Sedghi, Gupta & Long 2019, "The Singular Values of
Convolutional Layers", ICLR), ``‖C‖ = max_ω σ₁(K̂(ω))`` over the ``(N/s)²``
frequencies, and Gram iteration bounds each ``σ₁(K̂(ω))`` from above (Delattre et
al. 2023, Sec. 4). CIRCULAR padding with ``s ∤ H`` is bounded by its stride-1 norm
(a restriction too), valid but looser. The 2024 follow-up (Delattre, Barthélemy &
Allauzen, "Spectral Norm of Convolutional Layers with Circular and Zero Paddings")
bounds zero padding by Gram iteration on the spatial kernel — the norm over the
whole plane, independent of the input size; the torus norm bounded here is never
larger (a maximum over a subset of the same frequencies of the same symbol).

Rounding. The computed bound can fall short of the exact one only by rounding: a
float64 Gram step loses at most ``~n·rank·eps`` of ``σ₁`` relatively (n the matrix
side), the DFT sums ``~k²·eps·√rank``; the result is multiplied by ``1 + 1e-9``
(far above both for the sizes used here) and rounded up to float32.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

GRAM_ITERS = 12
SAFETY = 1e-9


def _host_float64(a, what: str) -> np.ndarray:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"{what} is a traced value: the upper bounds are computed eagerly in float64 "
            "on the host. Call them (and deqjax.cpl.prepare_sigmas / certified_logits) "
            "outside jax.jit / vmap / grad."
        )
    out = np.asarray(a, dtype=np.float64 if not np.iscomplexobj(a) else np.complex128)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} has non-finite entries: there is no norm bound to give.")
    return out


def _check_iters(n_iters) -> int:
    if not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"Gram iterations must be a non-negative int, got {n_iters!r}.")
    return n_iters


def gram_iteration_bound(mats, n_iters: int = GRAM_ITERS, rtol: float = 1e-9) -> np.ndarray:
    """Upper bounds on ``σ₁`` of each matrix of a ``(..., m, n)`` stack (real or complex).

    ``(‖G_t‖_F · scale_t)^{2^{−t}}`` after t Gram steps (module doc; ``scale_t`` undoes
    the per-step rescaling). Every t gives a bound (exact arithmetic gives ``≥ σ₁``;
    float64 rounding is covered by ``SAFETY``) and the bounds decrease with t; the
    iteration stops after ``n_iters`` steps or once the largest bound of the stack
    decreased by less than ``rtol`` (relative) in a step. Zero matrices give 0.
    Returns float64 of shape ``(...)``.
    """
    g = _host_float64(mats, "the matrix stack")
    n_iters = _check_iters(n_iters)
    if g.ndim < 2:
        raise ValueError(f"need a (..., m, n) stack of matrices, got shape {g.shape}.")
    if g.shape[-2] < g.shape[-1]:  # Gram on the smaller side: same σ₁
        g = np.conj(np.swapaxes(g, -1, -2))
    log_scale = np.zeros(g.shape[:-2])
    best = np.inf
    for t in range(n_iters + 1):
        norm = np.linalg.norm(g, axis=(-2, -1))
        zero = norm == 0  # then the matrix (and σ₁) is 0
        safe = np.where(zero, 1.0, norm)
        bound = np.where(zero, 0.0, np.exp(0.5**t * (log_scale + np.log(safe))))
        if t == n_iters or np.max(bound, initial=0.0) >= best * (1.0 - rtol):
            break
        best = np.max(bound, initial=0.0)
        g = g / safe[..., None, None]
        log_scale = 2.0 * (log_scale + np.log(safe))
        g = np.conj(np.swapaxes(g, -1, -2)) @ g
    return bound * (1.0 + SAFETY)


def round_up_float32(value) -> np.ndarray:
    """The smallest float32 ``≥ value`` (so a bound stays a bound when stored)."""
    value = np.asarray(value, np.float64)
    f32 = value.astype(np.float32)
    return np.where(f32.astype(np.float64) < value, np.nextafter(f32, np.float32(np.inf)), f32)


def dense_norm_bound(weight, n_iters: int = GRAM_ITERS) -> np.ndarray:
    """Upper bound on ``‖W‖₂`` of a ``(inner, d)`` dense CPL weight (float32 scalar)."""
    w = _host_float64(weight, "the dense CPL weight")
    if w.ndim != 2:
        raise ValueError(f"dense CPL weight must be (inner, d), got {w.shape}.")
    return round_up_float32(gram_iteration_bound(w, n_iters))


def _dft(n: int, taps: int, half: bool = False) -> np.ndarray:
    """``exp(−2πi·ω·a/n)`` for frequencies ω (all, or 0..n//2) and taps a (any ``taps``,
    also ``> n``: the kernel then wraps around the torus, as a circular conv does)."""
    omega = np.arange(n // 2 + 1 if half else n)
    return np.exp(-2j * np.pi * np.outer(omega, np.arange(taps)) / n)


def conv_symbols(kernel, torus_hw, stride: int = 1) -> np.ndarray:
    """DFT symbols ``K̂(ω)`` of the circular stride-``s`` correlation on ``torus_hw``.

    ``kernel`` is HWIO; ``torus_hw`` must be multiples of ``stride``. Returns complex128
    ``(F, s²·C_in, C_out)`` over the polyphase frequencies; by conjugate symmetry
    (real kernel) only half of the second axis' frequencies are kept. The circular
    operator's norm is ``max_ω σ₁(K̂(ω))``.
    """
    k = _host_float64(kernel, "the conv kernel")
    kh, kw, cin, cout = k.shape
    n1, n2 = torus_hw
    s = stride
    if n1 % s or n2 % s:
        raise ValueError(f"torus {torus_hw} must be multiples of the stride {s}.")
    mh, mw = -(-kh // s), -(-kw // s)
    k = np.pad(k, ((0, mh * s - kh), (0, mw * s - kw), (0, 0), (0, 0)))
    # polyphase: K_r[m] = K[s·m + r], channels (r1, r2, c_in)
    poly = k.reshape(mh, s, mw, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    poly = poly.reshape(mh, mw, s * s * cin, cout)
    e1, e2 = _dft(n1 // s, mh), _dft(n2 // s, mw, half=True)
    sym = np.einsum("pa,qb,abio->pqio", e1, e2, poly, optimize=True)
    return sym.reshape(-1, s * s * cin, cout)


def conv_torus(input_hw, kernel_hw, stride: int, padding: str):
    """``(torus_hw, stride_for_bound)`` on which the conv is a restriction of a
    circular correlation (module doc)."""
    (h, w), (kh, kw), s = input_hw, kernel_hw, stride
    if padding == "CIRCULAR":
        if h % s == 0 and w % s == 0:
            return (h, w), s
        return (h, w), 1  # subsampled outputs of the stride-1 circular conv
    pads = lax.padtype_to_pads((h, w), (kh, kw), (s, s), padding)
    n1 = -(-(h + pads[0][0] + pads[0][1]) // s) * s
    n2 = -(-(w + pads[1][0] + pads[1][1]) // s) * s
    return (n1, n2), s


def conv_norm_bound(
    kernel, input_hw, stride: int = 1, padding: str = "SAME", n_iters: int = GRAM_ITERS
) -> np.ndarray:
    """Upper bound on the norm of :func:`deqjax.cpl.conv` at input size ``input_hw``.

    Valid for 'SAME' and 'VALID' zero padding and 'CIRCULAR' padding at any stride
    (module doc); exact up to the Gram convergence for CIRCULAR with ``stride | H, W``.
    Returns a float32 scalar.
    """
    from deqjax.cpl.layers import _check_padding, _check_stride

    padding, stride = _check_padding(padding), _check_stride(stride)
    if np.ndim(kernel) != 4:
        raise ValueError(f"conv kernel must be HWIO (rank 4), got shape {np.shape(kernel)}.")
    h, w = (int(v) for v in input_hw)
    if h < 1 or w < 1:
        raise ValueError(f"input size must be positive, got {input_hw}.")
    torus, s = conv_torus((h, w), np.shape(kernel)[:2], stride, padding)
    bounds = gram_iteration_bound(conv_symbols(kernel, torus, s), n_iters)
    return round_up_float32(bounds.max())
