"""deqjax.stats against independent computations: scipy's exact binomial interval and
Welch test, the exact McNemar p-value summed from binomial coefficients, hand-counted
paired outcomes, and the packed per-example outcomes."""

import math

import numpy as np
import pytest
from scipy import stats as st

from deqjax import stats

GRID = [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 10), (3, 10), (10, 10), (35, 100)]
GRID += [(0, 100), (1, 100), (99, 100), (100, 100), (500, 1000), (7, 1000), (999, 1000)]


@pytest.mark.parametrize("k,n", GRID)
def test_clopper_pearson_is_scipys_exact_interval(k, n):
    ref = st.binomtest(k, n).proportion_ci(method="exact")
    lo, hi = stats.clopper_pearson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.32])
def test_clopper_pearson_other_levels(alpha):
    ref = st.binomtest(17, 40).proportion_ci(confidence_level=1 - alpha, method="exact")
    assert stats.clopper_pearson(17, 40, alpha) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_clopper_pearson_known_values():
    # k = 35 of n = 100: scipy 1.17 gives [0.2572937785, 0.4518493618]
    lo, hi = stats.clopper_pearson(35, 100)
    assert lo == pytest.approx(0.2572937785, abs=1e-9)
    assert hi == pytest.approx(0.4518493618, abs=1e-9)
    # n = 1: the closed forms (α/2 and 1 − α/2)
    assert stats.clopper_pearson(0, 1) == pytest.approx((0.0, 0.975))
    assert stats.clopper_pearson(1, 1) == pytest.approx((0.025, 1.0))
    # k = 0: hi = 1 − (α/2)^(1/n); k = n: lo = (α/2)^(1/n)
    assert stats.clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10))
    assert stats.clopper_pearson(10, 10)[0] == pytest.approx(0.025 ** (1 / 10))
    assert stats.clopper_pearson(0, 0) == (0.0, 1.0)  # nothing measured


def test_interval_fields():
    iv = stats.interval(35, 100)
    assert (iv["k"], iv["n"], iv["accuracy"]) == (35, 100, 0.35)
    assert iv["ci95"] == pytest.approx([0.2572937785, 0.4518493618], abs=1e-9)
    assert "ci90" in stats.interval(3, 10, alpha=0.1)
    assert math.isnan(stats.interval(0, 0)["accuracy"])


def mcnemar_by_hand(b, c):
    d = b + c
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, j) for j in range(min(b, c) + 1)) / 2**d
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(
    "b,c", [(0, 0), (1, 0), (0, 5), (3, 3), (2, 9), (10, 1), (40, 60), (120, 60), (0, 30)]
)
def test_mcnemar_exact_is_the_exact_binomial(b, c):
    p = stats.mcnemar_exact(b, c)
    assert p == pytest.approx(mcnemar_by_hand(b, c), rel=1e-9, abs=1e-300)
    assert p == stats.mcnemar_exact(c, b)  # symmetric
    assert 0.0 < p <= 1.0


def test_mcnemar_exact_known_values():
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(5, 5) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 · (½)^5
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(1, 1) == 1.0
    # scipy's exact binomial test of b successes in b + c trials is the same test
    assert stats.mcnemar_exact(12, 3) == pytest.approx(st.binomtest(12, 15).pvalue)


def test_paired_difference_hand_made():
    #     example:  0  1  2  3  4  5  6  7  8  9
    a = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], bool)  # 7 right
    b = np.array([1, 0, 0, 1, 0, 1, 1, 0, 0, 1], bool)  # 5 right
    d = stats.paired_difference(a, b)
    assert (d["n"], d["only_a"], d["only_b"]) == (10, 3, 1)  # examples 1, 2, 8 / 5
    assert d["accuracy_a"] == pytest.approx(0.7) and d["accuracy_b"] == pytest.approx(0.5)
    assert d["difference"] == pytest.approx(0.2)
    assert d["p_value"] == pytest.approx(mcnemar_by_hand(3, 1))  # 2 · 5/16
    lo, hi = stats.clopper_pearson(3, 4)
    assert d["ci95_difference"] == pytest.approx([0.4 * (2 * lo - 1), 0.4 * (2 * hi - 1)])
    assert d["ci95_difference"][0] < 0.2 < d["ci95_difference"][1]
    swapped = stats.paired_difference(b, a)
    assert swapped["difference"] == pytest.approx(-0.2)
    assert swapped["p_value"] == d["p_value"]
    assert swapped["ci95_difference"] == pytest.approx([-v for v in d["ci95_difference"][::-1]])


def test_paired_difference_identical_and_bad_shapes():
    a = np.array([1, 0, 1], bool)
    d = stats.paired_difference(a, a)
    assert d["difference"] == 0 and d["p_value"] == 1.0 and d["ci95_difference"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        stats.paired_difference(a, a[:2])
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        stats.paired_difference(a[None], a[None])


def test_seed_comparison_is_welch():
    a, b = [0.61, 0.64, 0.59, 0.66], [0.55, 0.57, 0.52]
    out = stats.seed_comparison(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert out["mean_a"] == pytest.approx(np.mean(a)) and out["mean_b"] == pytest.approx(np.mean(b))
    assert out["sd_a"] == pytest.approx(np.std(a, ddof=1))
    assert out["sd_b"] == pytest.approx(np.std(b, ddof=1))
    assert out["difference"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (out["seeds_a"], out["seeds_b"]) == (4, 3)
    # Welch, not the pooled-variance test
    assert out["p_value"] != pytest.approx(st.ttest_ind(a, b, equal_var=True).pvalue, rel=1e-6)


def test_seed_comparison_without_a_test():
    one = stats.seed_comparison([0.5], [0.4, 0.45])
    assert one["p_value"] is None and one["sd_a"] is None
    flat = stats.seed_comparison([0.5, 0.5], [0.4, 0.4])  # no spread at all
    assert flat["p_value"] is None and flat["difference"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one seed"):
        stats.seed_comparison([], [0.4, 0.5])


def test_verdict_wording_at_the_threshold():
    names = ("A", "B")
    assert stats.verdict(0.1, 0.0499, names=names) == "A more robust than B"
    assert stats.verdict(-0.1, 0.0499, names=names) == "B more robust than A"
    assert stats.verdict(0.1, 0.0501, names=names) == "not distinguishable"
    assert stats.verdict(0.1, 0.05, names=names) == "not distinguishable"  # p < α, strictly
    assert stats.verdict(0.0, 0.001, names=names) == "not distinguishable"
    assert stats.verdict(0.1, None, names=names) == "not distinguishable"
    assert stats.verdict(0.1, float("nan"), names=names) == "not distinguishable"
    assert stats.verdict(0.1, 0.08, alpha=0.1, names=("x", "y")) == "x more robust than y"


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(n):
    flags = np.random.default_rng(n).random(n) < 0.5
    text = stats.pack_bits(flags)
    assert isinstance(text, str) and len(text) == 4 * math.ceil(math.ceil(n / 8) / 3)
    back = stats.unpack_bits(text, n)
    assert back.dtype == bool and back.shape == (n,)
    np.testing.assert_array_equal(back, flags)
    if n:
        np.testing.assert_array_equal(stats.unpack_bits(stats.pack_bits(~flags), n), ~flags)


def test_unpack_with_the_wrong_n():
    text = stats.pack_bits(np.ones(9, bool))  # 2 bytes
    for wrong in (8, 17, 1000):
        with pytest.raises(ValueError, match="bytes, .* examples need"):
            stats.unpack_bits(text, wrong)
    # same byte count, but example 10 or 11 is set: packed for more examples
    with pytest.raises(ValueError, match="set bit beyond example 10"):
        stats.unpack_bits(stats.pack_bits(np.ones(12, bool)), 10)
    with pytest.raises(ValueError, match="non-negative integer"):
        stats.unpack_bits(text, -1)


def test_fingerprint_names_the_images_and_labels():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    y = np.array([1, 2])
    f = stats.examples_fingerprint(x, y)
    assert len(f) == 64 and f == stats.examples_fingerprint(x.copy(), y.astype(np.int32))
    assert f != stats.examples_fingerprint(x, y[::-1])
    assert f != stats.examples_fingerprint(x[::-1], y)
    assert f != stats.examples_fingerprint(x.astype(np.float64), y)


@pytest.mark.parametrize(
    "k,n,message",
    [
        (5, 3, "need k <= n"),
        (-1, 3, "k .* non-negative integer count"),
        (1, -3, "n .* non-negative integer count"),
        (1.5, 3, "k .* non-negative integer count"),
        (1, 3.5, "n .* non-negative integer count"),
        (float("nan"), 3, "non-negative integer count"),
        (float("inf"), 3, "non-negative integer count"),
        ("2", 3, "non-negative integer count"),
        (None, 3, "non-negative integer count"),
        (True, 3, "non-negative integer count"),
    ],
)
def test_bad_counts_raise(k, n, message):
    with pytest.raises(ValueError, match=message):
        stats.clopper_pearson(k, n)
    with pytest.raises(ValueError, match=message):
        stats.interval(k, n)


def test_integral_counts_of_other_types_are_accepted():
    ref = stats.clopper_pearson(3, 7)
    assert stats.clopper_pearson(np.int64(3), np.int32(7)) == ref
    assert stats.clopper_pearson(3.0, np.float64(7.0)) == ref
    assert stats.clopper_pearson(np.array(3), 7) == ref


def test_bad_mcnemar_counts_and_alpha_raise():
    with pytest.raises(ValueError, match="c .* non-negative integer count, got 2.5"):
        stats.mcnemar_exact(1, 2.5)  # not truncated to 2
    with pytest.raises(ValueError, match="b .* non-negative integer count, got -1"):
        stats.mcnemar_exact(-1, 3)
    with pytest.raises(ValueError, match="c .* non-negative integer count, got -3"):
        stats.mcnemar_exact(1, -3)
    with pytest.raises(ValueError, match="alpha must lie in"):
        stats.clopper_pearson(1, 2, alpha=1.5)
