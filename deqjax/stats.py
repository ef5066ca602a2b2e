"""Statistics of accuracies: exact intervals, paired tests on the same images, tests over seeds.

Pure host-side functions (numpy / scipy), used by the robustness report and by
``python -m experiments.compare``:

* :func:`clopper_pearson`: the exact (Clopper–Pearson) two-sided interval of a binomial
  proportion ``k / n``: ``lo = Beta⁻¹(α/2; k, n − k + 1)``, ``hi = Beta⁻¹(1 − α/2;
  k + 1, n − k)`` (``lo = 0`` at ``k = 0``, ``hi = 1`` at ``k = n``). It is
  scipy's ``binomtest(k, n).proportion_ci(method="exact")``. Its coverage is at least
  1 − α for every true proportion (conservative).
* :func:`mcnemar_exact`: the exact McNemar test of two classifiers scored on the same
  examples: under "equally accurate", each of the ``d = b + c`` discordant examples
  (right for one, wrong for the other) is right for A with probability ½, so the
  two-sided p-value is ``min(1, 2 · P[Bin(d, ½) ≤ min(b, c)])``.
* :func:`paired_difference`: the accuracy difference of two per-example outcome
  vectors, its exact McNemar p-value, and an interval for the difference conditional on
  the discordant count (``d / n · (2π − 1)`` with ``π``'s Clopper–Pearson interval).
* :func:`seed_comparison`: mean ± sd over seeds per arm and Welch's t-test of the means
  (unequal variances; ``None`` with fewer than two seeds in an arm).
* :func:`verdict`: "A more robust than B" / "B more robust than A" only where the
  p-value is below 5%, otherwise "not distinguishable".
"""

from __future__ import annotations

import base64
import hashlib
import math
import numbers

import numpy as np
from scipy import stats as _st

ALPHA = 0.05


def _count(value, name: str) -> int:
    """``value`` as a non-negative integer count (an int, a numpy integer, an integral
    float); a ``ValueError`` naming ``name`` otherwise (booleans included: a flag is not a
    count)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    if not math.isfinite(value) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    return int(value)


def _check_counts(k, n):
    k, n = _count(k, "k (successes)"), _count(n, "n (trials)")
    if k > n:
        raise ValueError(f"need k <= n, got k={k} successes out of n={n}")
    return k, n


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact two-sided ``1 − alpha`` interval of the proportion ``k / n``; ``(0, 1)``
    when ``n = 0`` (nothing measured)."""
    k, n = _check_counts(k, n)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if n == 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(_st.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(_st.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def interval(k: int, n: int, alpha: float = ALPHA) -> dict:
    """``{"k", "n", "accuracy", "ci95": [lo, hi]}`` of ``k`` successes out of ``n``
    (the key is ``ci95`` for the default ``alpha = 0.05``)."""
    k, n = _check_counts(k, n)
    lo, hi = clopper_pearson(k, n, alpha)
    key = "ci95" if alpha == ALPHA else f"ci{round(100 * (1 - alpha))}"
    return {"k": k, "n": n, "accuracy": k / n if n else float("nan"), key: [lo, hi]}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: ``b`` examples right
    for A and wrong for B, ``c`` the reverse (1 when there are none)."""
    b, c = _count(b, "b (right for A only)"), _count(c, "c (right for B only)")
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2.0 * _st.binom.cdf(min(b, c), b + c, 0.5)))


def paired_difference(a, b, alpha: float = ALPHA) -> dict:
    """A's accuracy minus B's on the same examples (``a``, ``b``: per-example booleans,
    same length and order), with the discordant counts, the exact McNemar p-value and an
    interval for the difference conditional on the discordant count."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes need equal 1-D shapes, got {a.shape} and {b.shape}")
    n = int(a.size)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    d = only_a + only_b
    lo, hi = clopper_pearson(only_a, d, alpha)
    scale = d / n if n else 0.0
    return {
        "n": n,
        "accuracy_a": float(a.mean()) if n else float("nan"),
        "accuracy_b": float(b.mean()) if n else float("nan"),
        "difference": (only_a - only_b) / n if n else float("nan"),
        "only_a": only_a,
        "only_b": only_b,
        "p_value": mcnemar_exact(only_a, only_b),
        "ci95_difference": [scale * (2 * lo - 1), scale * (2 * hi - 1)],
        "test": "exact McNemar (two-sided)",
    }


def seed_comparison(a, b) -> dict:
    """Across seeds: mean ± sd (ddof 1) of each arm's values and Welch's two-sided
    t-test of the means (``p_value`` None with fewer than two seeds in an arm, or no
    spread at all)."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"each arm needs at least one seed, got {a.size} and {b.size}")
    out = {
        "seeds_a": int(a.size),
        "seeds_b": int(b.size),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "sd_a": float(a.std(ddof=1)) if a.size > 1 else None,
        "sd_b": float(b.std(ddof=1)) if b.size > 1 else None,
        "difference": float(a.mean() - b.mean()),
        "p_value": None,
        "test": "Welch t-test over seeds (two-sided)",
    }
    if a.size >= 2 and b.size >= 2 and (a.std() > 0 or b.std() > 0):
        out["p_value"] = float(_st.ttest_ind(a, b, equal_var=False).pvalue)
    return out


def verdict(difference: float, p_value, alpha: float = ALPHA, names=("A", "B")) -> str:
    """The wording of a comparison: a direction only where ``p_value < alpha``."""
    a, b = names
    if p_value is None or not math.isfinite(p_value) or p_value >= alpha or difference == 0:
        return "not distinguishable"
    return f"{a} more robust than {b}" if difference > 0 else f"{b} more robust than {a}"


# --- per-example outcomes, stored compactly ------------------------------------------
BITS_ENCODING = "base64 of numpy.packbits(flags, bitorder='little'); example i is bit i"


def pack_bits(flags) -> str:
    """Per-example booleans as a short string (``BITS_ENCODING``)."""
    flags = np.asarray(flags, bool).ravel()
    return base64.b64encode(np.packbits(flags, bitorder="little").tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """The ``n`` booleans of :func:`pack_bits`; a ``ValueError`` when ``text`` cannot hold
    exactly ``n`` of them (wrong byte count, or a set bit beyond the ``n``-th)."""
    n = _count(n, "n (examples)")
    raw = np.frombuffer(base64.b64decode(text, validate=True), np.uint8)
    if raw.size != -(-n // 8):
        raise ValueError(f"packed outcomes hold {raw.size} bytes, {n} examples need {-(-n // 8)}")
    bits = np.unpackbits(raw, bitorder="little").astype(bool)
    if bits[n:].any():
        raise ValueError(
            f"packed outcomes have a set bit beyond example {n}: they were packed for more examples"
        )
    return bits[:n]


def examples_fingerprint(x, y) -> str:
    """SHA-256 of the evaluated images and labels (what "the same images" means)."""
    h = hashlib.sha256()
    x, y = np.ascontiguousarray(np.asarray(x)), np.ascontiguousarray(np.asarray(y, np.int64))
    h.update(str((x.shape, x.dtype.str)).encode())
    h.update(x.tobytes())
    h.update(y.tobytes())
    return h.hexdigest()
