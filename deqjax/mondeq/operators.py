"""monDEQ parameters, the monotone linear operator ``W`` and its resolvent.

``W = (1 − m) I − AᵀA + B − Bᵀ`` (Winston & Kolter 2020, Eq. 8), so the symmetric part
of ``I − W = m I + AᵀA + (Bᵀ − B)`` is ``m I + AᵀA ⪰ m I``: ``I − W`` is m-strongly
monotone for ANY ``A``, ``B`` and the equilibrium ``z = ReLU(W z + U x + b)`` exists and
is unique for every input.

Two kinds. ``"fc"``: ``A``, ``B`` are ``(d, d)`` matrices, ``U`` is ``(n_in, d)`` applied
to the flattened image (``x·U + b``), the head is ``z·W_out + b_out``. ``"conv"`` (as in
the paper's single-convolution model): ``A``, ``B`` are ``k×k`` CIRCULAR convolutions
``C → C`` (HWIO kernels, stride 1, :func:`deqjax.cpl.conv`) with their exact adjoints
(:func:`deqjax.cpl.conv_transpose`), ``U`` is a ``C_in → C`` convolution with zero
('SAME') padding and stride ``stride``, the head averages ``pool × pool`` windows,
flattens and applies ``W_out``.

The resolvent ``(I + α(I − W))⁻¹`` of Peaceman–Rachford: an explicit inverse of the
``d × d`` matrix (fc; the authors' code does the same), or, for the circular
convolutions, the 2-D DFT, which block-diagonalises every circular convolution
(Sedghi, Gupta & Long 2019): one ``C × C`` inverse per frequency of the state's
``H × W`` torus, applied with an FFT (also the authors' choice).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl.layers import conv, conv_transpose

KINDS = ("fc", "conv")


@flax.struct.dataclass
class MonDEQParams:
    """The parameters of a monDEQ classifier (arrays) and its static settings.

    ``U`` (fc ``(n_in, d)``; conv HWIO ``(k, k, C_in, C)``), ``b`` (``(d,)`` / ``(C,)``),
    ``A``, ``B`` (fc ``(d, d)``; conv HWIO ``(k, k, C, C)``, k odd), ``W_out``
    (``(features, classes)``), ``b_out``. Static: ``m`` > 0 (strong monotonicity),
    ``kind``, ``input_shape`` (one example, ``(H, W, C_in)``), the conv's ``stride`` and
    the head's ``pool``, and ``normalize`` (divide the logits by the traced product
    :func:`logit_scale`, so the network is ≈ 1-Lipschitz; see :mod:`deqjax.mondeq`).
    Leaves the caller does not need (e.g. a cell holds only ``A``, ``B``) may be None.
    """

    U: jax.Array | None
    b: jax.Array | None
    A: jax.Array | None
    B: jax.Array | None
    W_out: jax.Array | None
    b_out: jax.Array | None
    m: float = flax.struct.field(pytree_node=False, default=0.1)
    kind: str = flax.struct.field(pytree_node=False, default="fc")
    input_shape: tuple = flax.struct.field(pytree_node=False, default=(28, 28, 1))
    stride: int = flax.struct.field(pytree_node=False, default=1)
    pool: int = flax.struct.field(pytree_node=False, default=1)
    normalize: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def state_shape(self) -> tuple:
        """Shape of one example's equilibrium state ``z``."""
        if self.kind == "fc":
            return (int(np.shape(self.A)[0]),)
        h, w = (-(-int(s) // self.stride) for s in self.input_shape[:2])
        return (h, w, int(np.shape(self.A)[-1]))


def check_m(m) -> float:
    """``m`` must be a finite number > 0 (``I − W ⪰ m I``)."""
    if isinstance(m, bool) or not isinstance(m, (int, float, np.floating, np.integer)):
        raise ValueError(f"m (the strong-monotonicity parameter) must be a number, got {m!r}.")
    if not (math.isfinite(float(m)) and float(m) > 0):
        raise ValueError(
            f"m must be finite and > 0 (I − W ⪰ m·I; m = 0 gives no unique equilibrium and "
            f"no Lipschitz bound), got {m!r}."
        )
    return float(m)


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_params(p: MonDEQParams, *, full: bool = True) -> None:
    """Raise a ValueError naming the problem for a bad kind, ``m`` or shape
    (``full=False``: only ``A``, ``B`` and the settings are checked)."""
    if not isinstance(p, MonDEQParams):
        raise TypeError(f"expected deqjax.mondeq.MonDEQParams, got {type(p).__name__}.")
    check_m(p.m)
    if p.kind not in KINDS:
        raise ValueError(f"unknown monDEQ kind {p.kind!r}; choose one of {KINDS}.")
    if len(p.input_shape) != 3 or min(p.input_shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C_in) of one example, got {p.input_shape}.")
    a, b = _shape(p.A), _shape(p.B)
    if p.kind == "fc":
        if len(a) != 2 or a[0] != a[1] or a != b:
            raise ValueError(f"fc monDEQ: A and B must be equal (d, d) matrices, got A{a}, B{b}.")
    else:
        if len(a) != 4 or a != b or a[2] != a[3] or a[0] % 2 == 0 or a[1] % 2 == 0:
            raise ValueError(
                "conv monDEQ: A and B must be equal HWIO kernels (k, k, C, C) with k odd "
                f"(C → C circular convolutions), got A{a}, B{b}."
            )
        if not isinstance(p.stride, int) or p.stride < 1:
            raise ValueError(f"stride must be a positive int, got {p.stride!r}.")
        if not isinstance(p.pool, int) or p.pool < 1:
            raise ValueError(f"pool must be a positive int, got {p.pool!r}.")
    if not full:
        return
    d = a[0] if p.kind == "fc" else a[-1]
    n_in = int(np.prod(p.input_shape))
    if p.kind == "fc":
        if _shape(p.U) != (n_in, d):
            raise ValueError(
                f"fc monDEQ: U must be (n_in, d) = ({n_in}, {d}) for input_shape "
                f"{p.input_shape}, got {_shape(p.U)}."
            )
        features = d
    else:
        u = _shape(p.U)
        if len(u) != 4 or u[2] != p.input_shape[2] or u[3] != d:
            raise ValueError(
                f"conv monDEQ: U must be an HWIO kernel (k, k, {p.input_shape[2]}, {d}), got {u}."
            )
        h, w, _ = p.state_shape
        if h % p.pool or w % p.pool:
            raise ValueError(f"pool {p.pool} must divide the state's size {(h, w)}.")
        features = (h // p.pool) * (w // p.pool) * d
    if _shape(p.b) != (d,):
        raise ValueError(f"b must have shape ({d},), got {_shape(p.b)}.")
    wo = _shape(p.W_out)
    if len(wo) != 2 or wo[0] != features or _shape(p.b_out) != (wo[1],):
        raise ValueError(
            f"W_out must be (features, classes) with features = {features} and b_out "
            f"(classes,), got W_out{wo}, b_out{_shape(p.b_out)}."
        )


def init_params(
    key,
    kind: str = "fc",
    *,
    input_shape=(28, 28, 1),
    width: int = 100,
    num_classes: int = 10,
    m: float = 0.1,
    kernel_size: int = 3,
    stride: int = 1,
    pool: int = 1,
    normalize: bool = False,
    dtype=jnp.float32,
) -> MonDEQParams:
    """Random parameters (uniform ±1/√fan_in, PyTorch's Linear/Conv default as in the
    authors' code; ``A`` and ``B`` without bias)."""
    check_m(m)
    if kind not in KINDS:
        raise ValueError(f"unknown monDEQ kind {kind!r}; choose one of {KINDS}.")
    ks = jax.random.split(key, 6)
    unif = lambda k, shape, fan: jax.random.uniform(  # noqa: E731
        k, shape, dtype, -1.0 / math.sqrt(fan), 1.0 / math.sqrt(fan)
    )
    input_shape = tuple(int(s) for s in input_shape)
    if kind == "fc":
        n_in, d = int(np.prod(input_shape)), width
        U, A, B = unif(ks[0], (n_in, d), n_in), unif(ks[2], (d, d), d), unif(ks[3], (d, d), d)
        b, features = unif(ks[1], (d,), n_in), d
    else:
        k, c_in, c = kernel_size, input_shape[2], width
        U = unif(ks[0], (k, k, c_in, c), k * k * c_in)
        b = unif(ks[1], (c,), k * k * c_in)
        A = unif(ks[2], (k, k, c, c), k * k * c)
        B = unif(ks[3], (k, k, c, c), k * k * c)
        h, w = (-(-s // stride) for s in input_shape[:2])
        features = (h // pool) * (w // pool) * c
    W_out = unif(ks[4], (features, num_classes), features)
    b_out = unif(ks[5], (num_classes,), features)
    p = MonDEQParams(U, b, A, B, W_out, b_out, m, kind, input_shape, stride, pool, normalize)
    check_params(p)
    return p


# --- the linear operator (one example) ---------------------------------------------


def _conv1(z, k):  # circular stride-1 convolution of one (H, W, C) state
    return conv(z[None], k.astype(z.dtype), 1, "CIRCULAR")[0]


def _conv1_t(z, k):  # its exact adjoint
    return conv_transpose(z[None], k.astype(z.dtype), (1,) + z.shape, 1, "CIRCULAR")[0]


def apply_w(p: MonDEQParams, z: jax.Array, *, transpose: bool = False) -> jax.Array:
    """``W z`` (or ``Wᵀ z``) for one example's state ``z``."""
    sign = -1.0 if transpose else 1.0
    if p.kind == "fc":
        A, B = p.A.astype(z.dtype), p.B.astype(z.dtype)
        return (1 - p.m) * z - A.T @ (A @ z) + sign * (B @ z - B.T @ z)
    ata = _conv1_t(_conv1(z, p.A), p.A)
    return (1 - p.m) * z - ata + sign * (_conv1(z, p.B) - _conv1_t(z, p.B))


def w_matrix(p: MonDEQParams, dtype=None) -> jax.Array:
    """The fc monDEQ's ``W`` as a ``(d, d)`` matrix."""
    A, B = p.A, p.B
    if dtype is not None:
        A, B = A.astype(dtype), B.astype(dtype)
    eye = jnp.eye(A.shape[0], dtype=A.dtype)
    return (1 - p.m) * eye - A.T @ A + B - B.T


def inject(p: MonDEQParams, x: jax.Array) -> jax.Array:
    """``U x + b`` for one example ``x`` of shape ``input_shape``."""
    if p.kind == "fc":
        return x.reshape(-1) @ p.U.astype(x.dtype) + p.b.astype(x.dtype)
    u = conv(x[None], p.U.astype(x.dtype), p.stride, "SAME")[0]
    return u + p.b.astype(x.dtype)


def features(p: MonDEQParams, z: jax.Array) -> jax.Array:
    """The head's input: ``z`` (fc) or its ``pool × pool`` average pooling, flattened."""
    if p.kind == "fc":
        return z
    h, w, c = z.shape
    q = p.pool
    return z.reshape(h // q, q, w // q, q, c).mean((1, 3)).reshape(-1)


# --- DFT symbols of the circular convolutions ---------------------------------------


def conv_symbol(kernel, hw, xp=jnp) -> jax.Array:
    """``K̂(ω)`` of the circular stride-1 correlation :func:`deqjax.cpl.conv` on the
    ``hw`` torus, shape ``(H, W, C_out, C_in)``: ``fft2(conv(z))(ω) = K̂(ω) fft2(z)(ω)``
    (numpy's DFT sign convention); the adjoint's symbol is ``K̂(ω)ᴴ``. ``xp``: ``jnp``
    (traced) or ``np`` (float64 on the host)."""
    kh, kw = kernel.shape[:2]
    n1, n2 = hw
    c1, c2 = (kh - 1) // 2, (kw - 1) // 2
    e1 = xp.exp(2j * np.pi * np.outer(np.arange(n1), np.arange(kh) - c1) / n1)
    e2 = xp.exp(2j * np.pi * np.outer(np.arange(n2), np.arange(kw) - c2) / n2)
    if xp is jnp:  # complex64, or complex128 for float64 kernels (x64)
        cdt = jnp.result_type(kernel.dtype, jnp.complex64)
        e1, e2 = e1.astype(cdt), e2.astype(cdt)
    return xp.einsum("pa,qb,abio->pqoi", e1, e2, kernel)


def _herm(s, xp):
    return xp.conj(xp.swapaxes(s, -1, -2))


def w_symbol(p: MonDEQParams, xp=jnp):
    """``Ŵ(ω) = (1 − m) I − ÂᴴÂ + B̂ − B̂ᴴ`` of the conv monDEQ, ``(H, W, C, C)``."""
    hw = p.state_shape[:2]
    A = np.asarray(p.A, np.float64) if xp is np else p.A
    B = np.asarray(p.B, np.float64) if xp is np else p.B
    sa, sb = conv_symbol(A, hw, xp), conv_symbol(B, hw, xp)
    eye = xp.eye(sa.shape[-1])
    return (1 - p.m) * eye - _herm(sa, xp) @ sa + sb - _herm(sb, xp)


def resolvent(p: MonDEQParams, alpha):
    """``(I + α(I − W))⁻¹`` in the form :func:`apply_resolvent` takes: the inverse
    matrix (fc) or the per-frequency inverses ``(H, W, C, C)`` (conv). Traceable and
    differentiable (an explicit inverse; ``I + α(I − W) ⪰ (1 + αm) I`` is well
    conditioned)."""
    if p.kind == "fc":
        w = w_matrix(p)
        eye = jnp.eye(w.shape[0], dtype=w.dtype)
        return jnp.linalg.inv((1 + alpha) * eye - alpha * w)
    s = w_symbol(p)
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    return jnp.linalg.inv((1 + alpha) * eye - alpha * s)


def apply_resolvent(p: MonDEQParams, inv, v: jax.Array) -> jax.Array:
    """``(I + α(I − W))⁻¹ v`` for one example ``v`` (``inv`` from :func:`resolvent`)."""
    if p.kind == "fc":
        return inv.astype(v.dtype) @ v
    vh = jnp.fft.fft2(v, axes=(0, 1))
    out = jnp.einsum("pqoi,pqi->pqo", inv.astype(vh.dtype), vh)
    return jnp.real(jnp.fft.ifft2(out, axes=(0, 1))).astype(v.dtype)
