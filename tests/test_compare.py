"""experiments.compare on synthetic reports with known per-example outcomes: the table's
accuracies, intervals, paired McNemar p-values and verdicts against deqjax.stats and
independent sums, the refusal of the paired test on different images, the test over
seeds, mismatched ε, the error messages, and the command line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as st

from deqjax import stats
from experiments import compare
from tests.helpers import ROOT

N = 200
SAME = "a" * 64
OTHER = "b" * 64
LABEL = "pgd/implicit"


def report(worst: dict, clean, images=SAME, attack=None, **extra) -> dict:
    """A report as experiments.evaluate writes it, from per-example flags: ``worst``
    ``{eps: flags}``; the attack row ``attack`` (default: the worst case)."""
    clean = np.asarray(clean, bool)
    attack = worst if attack is None else attack
    keys = [str(float(e)) for e in worst]
    return {
        "n_examples": len(clean),
        "eps": [float(e) for e in worst],
        "attacks": ["pgd"],
        "views": ["implicit"],
        "clean_accuracy": float(clean.mean()),
        "robust_accuracy": {k: {LABEL: float(np.mean(attack[e]))} for k, e in zip(keys, worst)},
        "worst_case": {k: float(np.mean(worst[e])) for k, e in zip(keys, worst)},
        "outcomes": {
            "encoding": stats.BITS_ENCODING,
            "images": images,
            "clean": stats.pack_bits(clean),
            "robust_accuracy": {
                k: {LABEL: stats.pack_bits(attack[e])} for k, e in zip(keys, worst)
            },
            "worst_case": {k: stats.pack_bits(worst[e]) for k, e in zip(keys, worst)},
        },
        **extra,
    }


def paired_flags(only_a: int, only_b: int, both: int, n: int = N):
    """Flags of A and B with the given discordant and concordant-right counts."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:only_a] = True
    b[only_a : only_a + only_b] = True
    a[only_a + only_b : only_a + only_b + both] = True
    b[only_a + only_b : only_a + only_b + both] = True
    return a, b


def write(tmp_path, name: str, rep: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    return str(d)


def mcnemar_by_hand(b, c):
    d = b + c
    return min(1.0, 2 * sum(math.comb(d, j) for j in range(min(b, c) + 1)) / 2**d)


@pytest.fixture
def two_models():
    """A vs B on the same 200 images: at ε = 0.1, 12 vs 8 discordant (a small
    difference); at ε = 0.3, 120 vs 60 (a large one)."""
    clean_a, clean_b = paired_flags(5, 3, 180)
    small_a, small_b = paired_flags(12, 8, 100)
    large_a, large_b = paired_flags(120, 60, 10)
    a = report({0.1: small_a, 0.3: large_a}, clean_a)
    b = report({0.1: small_b, 0.3: large_b}, clean_b)
    return a, b


def test_table_numbers_match_the_stats_functions(two_models):
    a, b = two_models
    c = compare.compare_reports({"A": a, "B": b})
    assert c["rows"] == ["clean", "0.1", "0.3"] and c["eps"] == [0.1, 0.3]
    counts = {
        "A": {"clean": 185, "0.1": 112, "0.3": 130},
        "B": {"clean": 183, "0.1": 108, "0.3": 70},
    }
    for name, per in counts.items():
        for row, k in per.items():
            iv = c["accuracy"][name][row]
            ref = st.binomtest(k, N).proportion_ci(method="exact")
            assert (iv["k"], iv["n"]) == (k, N)
            assert iv["accuracy"] == pytest.approx(k / N)
            assert iv["ci95"] == pytest.approx([ref.low, ref.high], abs=1e-9)
    (pair,) = c["paired"]
    assert (pair["a"], pair["b"]) == ("A", "B") and "refused" not in pair
    for row, (oa, ob) in {"clean": (5, 3), "0.1": (12, 8), "0.3": (120, 60)}.items():
        d = pair["rows"][row]
        assert (d["only_a"], d["only_b"], d["n"]) == (oa, ob, N)
        assert d["difference"] == pytest.approx((oa - ob) / N)
        assert d["p_value"] == pytest.approx(mcnemar_by_hand(oa, ob), rel=1e-9)
        lo, hi = stats.clopper_pearson(oa, oa + ob)
        scale = (oa + ob) / N
        assert d["ci95_difference"] == pytest.approx([scale * (2 * lo - 1), scale * (2 * hi - 1)])
    assert pair["rows"]["0.1"]["verdict"] == "not distinguishable"
    assert pair["rows"]["0.3"]["verdict"] == "A more robust than B"
    assert pair["rows"]["0.3"]["p_value"] < 1e-4

    text = compare.markdown(c)
    iv = c["accuracy"]["B"]["0.3"]
    assert "| ε=0.3 | 0.650 [" in text
    assert f"0.350 [{iv['ci95'][0]:.3f}, {iv['ci95'][1]:.3f}] n=200" in text
    d = pair["rows"]["0.1"]
    p_small = f"{mcnemar_by_hand(12, 8):.3g}"
    assert f"| ε=0.1 | +0.020 | [{d['ci95_difference'][0]:+.3f}," in text
    assert f"| 12 / 8 | {p_small} | not distinguishable |" in text
    assert "| 120 / 60 |" in text and "| A more robust than B |" in text
    assert "Over seeds" not in text  # one seed each


def test_direction_follows_the_order_and_the_pairs_option(two_models):
    a, b = two_models
    c = compare.compare_reports({"B": b, "A": a})
    d = c["paired"][0]["rows"]["0.3"]
    assert d["difference"] == pytest.approx(-0.3) and d["verdict"] == "A more robust than B"
    third = report({0.1: np.ones(N, bool), 0.3: np.zeros(N, bool)}, np.ones(N, bool))
    everything = compare.compare_reports({"A": a, "B": b, "C": third})
    assert [(p["a"], p["b"]) for p in everything["paired"]] == [("A", "B"), ("A", "C"), ("B", "C")]
    baseline = compare.compare_reports({"A": a, "B": b, "C": third}, pairs="baseline")
    assert [(p["a"], p["b"]) for p in baseline["paired"]] == [("A", "B"), ("A", "C")]
    assert baseline["paired"][1]["rows"]["0.3"]["verdict"] == "A more robust than C"


def test_paired_test_refused_on_different_images(two_models):
    a, b = two_models
    b["outcomes"]["images"] = OTHER
    c = compare.compare_reports({"A": a, "B": b})
    (pair,) = c["paired"]
    assert "rows" not in pair and "same images" in pair["refused"]
    assert c["accuracy"]["B"]["0.3"]["k"] == 70  # the unpaired intervals remain
    text = compare.markdown(c)
    assert "Paired test refused" in text and "not evaluated on the same images" in text
    assert "0.350 [" in text and "McNemar) | verdict" not in text


def seeded(k_per_seed: list, images=SAME, n: int = 50) -> dict:
    """A multi-seed report: seed i has its worst case right on the first k_i examples."""
    entries = []
    for i, k in enumerate(k_per_seed):
        flags = np.arange(n) < k
        entries.append({"seed": i, **report({0.1: flags}, np.ones(n, bool), images)})
    return {"seeds": entries}


def test_multi_seed_welch_and_the_seed_of_the_paired_test():
    ka, kb = [40, 42, 44], [30, 33, 31, 35]
    a, b = seeded(ka), seeded(kb)
    c = compare.compare_reports({"A": a, "B": b})
    assert c["seeds"] == {"A": 3, "B": 4}
    values_a, values_b = [k / 50 for k in ka], [k / 50 for k in kb]
    assert c["over_seeds"]["A"]["0.1"]["values"] == pytest.approx(values_a)
    assert c["over_seeds"]["B"]["0.1"]["mean"] == pytest.approx(np.mean(values_b))
    assert c["over_seeds"]["B"]["0.1"]["sd"] == pytest.approx(np.std(values_b, ddof=1))
    (w,) = c["welch"]
    row = w["rows"]["0.1"]
    ref = st.ttest_ind(values_a, values_b, equal_var=False).pvalue
    assert row["p_value"] == pytest.approx(ref, rel=1e-12) and ref < 0.05
    assert row["verdict"] == "A more robust than B"
    assert w["rows"]["clean"]["p_value"] is None  # no spread: no test
    # the paired test uses seed 0 (40 vs 30 right), or the one asked for (42 vs 33)
    assert c["paired"][0]["rows"]["0.1"]["only_a"] == 10
    c1 = compare.compare_reports({"A": a, "B": b}, seed=1)
    assert c1["paired"][0]["rows"]["0.1"]["only_a"] == 9
    assert c1["accuracy"]["A"]["0.1"]["k"] == 42
    text = compare.markdown(c)
    mean_a, sd_a = np.mean(values_a), np.std(values_a, ddof=1)
    assert f"{mean_a:.3f} ± {sd_a:.3f}" in text and "A (3 seeds)" in text
    assert "Welch t-test" in text and f"| {ref:.3g} | A more robust than B |" in text
    with pytest.raises(ValueError, match="A has 3 seed"):
        compare.compare_reports({"A": a, "B": b}, seed=3)
    # one multi-seed workdir against a single-seed one: no Welch test
    single = report({0.1: np.arange(50) < 30}, np.ones(50, bool))
    mixed = compare.compare_reports({"A": a, "S": single})
    assert mixed["welch"] == [] and "A" in mixed["over_seeds"] and "S" not in mixed["over_seeds"]


def test_mismatched_eps_and_sections():
    ones = np.ones(N, bool)
    a = report({0.1: ones, 0.3: ones}, ones)
    b = report({0.1: ones, 0.2: ones}, ones)
    c = compare.compare_reports({"A": a, "B": b})
    assert c["eps"] == [0.1] and c["dropped_eps"] == {"A": [0.3], "B": [0.2]}
    assert "Not compared (ε not in every report)" in compare.markdown(c)
    with pytest.raises(ValueError, match="share no ε"):
        compare.compare_reports({"A": report({0.3: ones}, ones), "B": report({0.2: ones}, ones)})
    # one attack/view instead of the worst case
    attack = {0.1: np.arange(N) < 150}
    r = report({0.1: np.arange(N) < 100}, ones, attack=attack)
    c = compare.compare_reports({"A": r}, section="robust_accuracy", label=LABEL)
    assert c["accuracy"]["A"]["0.1"]["k"] == 150
    assert compare.compare_reports({"A": r})["accuracy"]["A"]["0.1"]["k"] == 100
    with pytest.raises(ValueError, match="needs --label"):
        compare.compare_reports({"A": r}, section="robust_accuracy")
    with pytest.raises(ValueError, match="no attack/view 'fgsm'"):
        compare.compare_reports({"A": r}, section="robust_accuracy", label="fgsm")
    with pytest.raises(ValueError, match="no outcomes for section 'certified_accuracy'"):
        compare.compare_reports({"A": r}, section="certified_accuracy")
    # a certified section from a report hook
    r["outcomes"]["certified_accuracy"] = {"0.1": stats.pack_bits(np.arange(N) < 20)}
    r["certified_accuracy"] = {"0.1": 0.1}
    c = compare.compare_reports({"A": r}, section="certified_accuracy")
    assert c["accuracy"]["A"]["0.1"]["k"] == 20
    r["worst_case"]["0.1"] = 0.9  # the stored accuracy disagrees with the outcomes
    with pytest.raises(ValueError, match="inconsistent"):
        compare.compare_reports({"A": r})


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run python -m experiments.evaluate --workdir"):
        compare.load_report(str(tmp_path / "nowhere"))
    old = report({0.1: np.ones(4, bool)}, np.ones(4, bool))
    del old["outcomes"]
    w = write(tmp_path, "old", old)
    with pytest.raises(ValueError, match="older version.*Re-run the evaluation"):
        compare.load_report(w)
    assert compare.load_report(w, require_outcomes=False)["n_examples"] == 4
    multi = seeded([3, 4], n=8)
    multi["outcomes"] = multi["seeds"][0]["outcomes"]  # never taken for another seed
    del multi["seeds"][1]["outcomes"]
    with pytest.raises(ValueError, match="seed entry 1"):
        compare.load_report(write(tmp_path, "multi", multi))
    # settings an entry lacks come from the top level
    shared = seeded([3, 4], n=8)
    shared.update(n_examples=8, eps=[0.1])
    for entry in shared["seeds"]:
        del entry["n_examples"], entry["eps"]
    c = compare.compare_reports({"M": compare.load_report(write(tmp_path, "shared", shared))})
    assert c["over_seeds"]["M"]["0.1"]["values"] == [3 / 8, 4 / 8]
    assert compare.parse_runs(["A=x", "y/z/"]) == {"A": "x", "z": "y/z/"}
    with pytest.raises(ValueError, match="given twice"):
        compare.parse_runs(["A=x", "A=y"])


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.compare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line(tmp_path, two_models):
    a, b = two_models
    wa, wb = write(tmp_path, "a", a), write(tmp_path, "b", b)
    png, out = tmp_path / "plots" / "cmp.png", tmp_path / "cmp.json"
    proc = run_cli(f"A={wa}", f"B={wb}", "--out", str(png), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| | A | B |" in proc.stdout and "**A vs B**" in proc.stdout
    assert "| A more robust than B |" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads(out.read_text())
    assert saved["workdirs"] == {"A": wa, "B": wb}
    expected = json.loads(json.dumps(compare.compare_reports({"A": a, "B": b})))
    assert {k: v for k, v in saved.items() if k != "workdirs"} == expected
    # the LyaDEQ family's comparison reads through the same loader and adds the tests
    from experiments.families import lyadeq

    lyadeq.main(["--out", str(tmp_path / "ly.png"), f"A={wa}", f"B={wb}"])
    assert (tmp_path / "ly.png").stat().st_size > 1000


def test_command_line_errors(tmp_path):
    proc = run_cli(f"A={tmp_path}", "--section", "worst_case")
    assert proc.returncode == 2
    assert "run python -m experiments.evaluate --workdir" in proc.stderr
