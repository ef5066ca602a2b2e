r"""Compare the robustness reports of several workdirs, with exact tests.

``python -m experiments.compare A=WORKDIR_A B=WORKDIR_B ...`` reads each workdir's
``report.json`` (written by ``python -m experiments.evaluate``) and prints, per ε (and for
the clean images), every model's accuracy in one report section (default the worst case
over every attack and gradient view) with its exact 95% interval, then every pair of
models (or each model against the first, ``--baseline``) compared on the same images,
and, where both workdirs trained several seeds, the test over seeds.

**Accuracy.** :math:`k` of :math:`n` examples right; the exact (Clopper–Pearson) interval

.. math::

  \left[\, B^{-1}\left(\tfrac{\alpha}{2};\ k,\ n - k + 1\right),\;
  B^{-1}\left(1 - \tfrac{\alpha}{2};\ k + 1,\ n - k\right) \right]

with :math:`B^{-1}` the Beta quantile (:func:`deqjax.stats.clopper_pearson`), covers the
true accuracy with probability at least :math:`1 - \alpha = 0.95`.

**Paired test (same images).** With per-example outcomes :math:`a_i, b_i \in \{0, 1\}`
of models A and B on the same :math:`n` examples, let :math:`b = \#\{a_i = 1, b_i = 0\}`
and :math:`c = \#\{a_i = 0, b_i = 1\}` (the discordant examples, :math:`d = b + c`).
The accuracy difference is :math:`(b - c) / n`. Under "A and B are equally accurate",
:math:`b \mid d \sim \mathrm{Bin}(d, \tfrac12)`, and the exact McNemar p-value is

.. math::

  p = \min\left(1,\; 2 \sum_{j=0}^{\min(b, c)} \binom{d}{j} 2^{-d}\right).

The interval of the difference is conditional on :math:`d`: with :math:`[\pi_-, \pi_+]`
the Clopper–Pearson interval of :math:`\pi = b / d`, the difference lies in
:math:`\tfrac{d}{n}\,[2\pi_- - 1,\ 2\pi_+ - 1]`
(:func:`deqjax.stats.paired_difference`). The table says "A more robust than B" only
where :math:`p < 0.05`, otherwise "not distinguishable" (:func:`deqjax.stats.verdict`).
The test needs both models scored on the very same images: the reports' image
fingerprints (SHA-256 of the evaluated images and labels) must agree, otherwise the paired
test is refused and only the separate intervals are shown. A workdir with several seeds
enters the paired test with one of them (``--seed``, default 0).

**Over seeds.** Where both workdirs hold :math:`\ge 2` seeds (``train.seeds``), the
accuracies :math:`x_1 \dots x_{K_A}` and :math:`y_1 \dots y_{K_B}` are summarised as mean
± sd and compared by Welch's t-test,

.. math::

  t = \frac{\bar x - \bar y}{\sqrt{s_x^2 / K_A + s_y^2 / K_B}},\qquad
  \nu = \frac{\left(s_x^2 / K_A + s_y^2 / K_B\right)^2}
  {\frac{(s_x^2 / K_A)^2}{K_A - 1} + \frac{(s_y^2 / K_B)^2}{K_B - 1}},

two-sided against Student's t with :math:`\nu` degrees of freedom
(:func:`deqjax.stats.seed_comparison`): it asks whether the training recipe, not one
trained network, is more robust.

References:
  Clopper & Pearson, *The use of confidence or fiducial limits illustrated in the case of
  the binomial*, Biometrika 1934.

  McNemar, *Note on the sampling error of the difference between correlated proportions
  or percentages*, Psychometrika 1947.

  Welch, *The generalization of "Student's" problem when several different population
  variances are involved*, Biometrika 1947.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np

from deqjax import stats

SECTION_NAMES = {
    "worst_case": "worst case over every attack and view",
    "robust_accuracy": "one attack / gradient view",
    "certified_accuracy": "certified accuracy",
}
CLEAN = "clean"
# what a per-seed entry of a multi-seed report may take from the top level
SHARED_KEYS = ("n_examples", "eps", "norm", "attacks", "views", "compact")


# --- loading ----------------------------------------------------------------------------
def _report_path(workdir: str) -> str:
    return workdir if workdir.endswith(".json") else os.path.join(workdir, "report.json")


def seed_reports(report: dict) -> list[dict]:
    """The per-seed reports of a report: its ``seeds`` entries (a workdir trained with
    ``train.seeds = K``; the settings of :data:`SHARED_KEYS` an entry lacks come from the
    top level, never accuracies or outcomes), or the report itself (one seed)."""
    if "seeds" not in report:
        return [report]
    entries = report["seeds"]
    if not isinstance(entries, list) or not entries:
        raise ValueError("the report's 'seeds' entry must be a non-empty list of reports")
    shared = {k: report[k] for k in SHARED_KEYS if k in report}
    return [{**shared, **entry} for entry in entries]


def load_report(workdir: str, require_outcomes: bool = True) -> dict:
    """The report of ``workdir`` (``WORKDIR/report.json``, local or ``gs://``; a path
    ending in ``.json`` is read as is).

    Args:
      workdir: the workdir evaluated by ``python -m experiments.evaluate``.
      require_outcomes: check that every seed's report holds the per-example outcomes the
        paired test needs.

    Returns:
      The report dict.

    Raises:
      FileNotFoundError: no report (the workdir was not evaluated yet).
      ValueError: a report without per-example outcomes (an older version wrote it).
    """
    path = _report_path(workdir)
    if path.startswith("gs://"):
        from experiments import common

        text = common.read_text(path)
    elif os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    else:
        text = None
    if text is None:
        raise FileNotFoundError(
            f"{path} does not exist: run python -m experiments.evaluate --workdir {workdir} first"
        )
    report = json.loads(text)
    if require_outcomes:
        for i, entry in enumerate(seed_reports(report)):
            if "outcomes" not in entry:
                which = f" (seed entry {i})" if "seeds" in report else ""
                raise ValueError(
                    f"{path}{which} has no per-example outcomes: an older version wrote it. "
                    f"Re-run the evaluation: python -m experiments.evaluate --workdir {workdir}"
                )
    return report


def parse_runs(runs) -> dict[str, str]:
    """``["NAME=WORKDIR", ...]`` as ``{name: workdir}`` (a bare ``WORKDIR`` is named by its
    last path component); a repeated name is an error."""
    out = {}
    for run in runs:
        name, sep, workdir = run.partition("=")
        if not sep:
            name, workdir = os.path.basename(os.path.normpath(run)), run
        if not name or not workdir:
            raise ValueError(f"expected NAME=WORKDIR, got {run!r}")
        if name in out:
            raise ValueError(f"the name {name!r} is given twice")
        out[name] = workdir
    return out


# --- one model ---------------------------------------------------------------------------
def _flags(text, n: int, where: str) -> np.ndarray:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected packed outcome bits, got {type(text).__name__}")
    try:
        return stats.unpack_bits(text, n)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _section_bits(entry: dict, section: str, label, e: str):
    """The packed bits and the stored accuracy (or None) of one ε."""
    bits = entry["outcomes"].get(section, {}).get(e)
    value = entry.get(section, {}).get(e)
    if section == "robust_accuracy":
        bits = None if bits is None else bits.get(label)
        value = None if value is None else value.get(label)
    return bits, value


def _model(name: str, report: dict, section: str, label) -> dict:
    """Per seed: ``n``, the image fingerprint, and the per-example flags of the clean row
    and of every ε of ``section``."""
    seeds = []
    for i, entry in enumerate(seed_reports(report)):
        where = f"{name}" + (f" seed entry {i}" if "seeds" in report else "")
        if "outcomes" not in entry:
            raise ValueError(
                f"{where}: the report has no per-example outcomes (an older version wrote "
                "it); re-run python -m experiments.evaluate"
            )
        out, n = entry["outcomes"], int(entry["n_examples"])
        if section not in out:
            have = sorted(k for k, v in out.items() if isinstance(v, dict))
            raise ValueError(f"{where}: no outcomes for section {section!r}; it has {have}")
        if section == "robust_accuracy":
            labels = sorted({lab for per in out[section].values() for lab in per})
            if label is None:
                raise ValueError(f"--section robust_accuracy needs --label, one of {labels}")
            if label not in labels:
                raise ValueError(f"{where}: no attack/view {label!r}; it has {labels}")
        elif label is not None:
            raise ValueError("--label chooses an attack/view of --section robust_accuracy")
        rows = {CLEAN: _flags(out["clean"], n, f"{where} clean")}
        for e in entry["eps"]:
            e = str(float(e))
            bits, value = _section_bits(entry, section, label, e)
            if bits is None:
                continue
            rows[e] = _flags(bits, n, f"{where} {section} ε={e}")
            if value is not None and abs(float(value) - rows[e].mean()) > 0.5 / max(n, 1):
                raise ValueError(
                    f"{where}: {section} at ε={e} is {value} but its outcomes give "
                    f"{rows[e].mean()}: the report is inconsistent"
                )
        seeds.append({"n": n, "images": out.get("images"), "rows": rows, "seed": entry.get("seed")})
    return {"seeds": seeds}


def _row_eps(row: str) -> float:
    return 0.0 if row == CLEAN else float(row)


# --- the comparison ----------------------------------------------------------------------
def compare_reports(
    named: dict[str, dict],
    section: str = "worst_case",
    label: str | None = None,
    seed: int = 0,
    pairs: str = "all",
) -> dict:
    """The comparison of several reports, JSON-ready.

    Args:
      named: ``{model name: report}`` (:func:`load_report`), in display order; the first
        is the baseline of ``pairs="baseline"``.
      section: the outcomes compared per ε: ``worst_case``, ``robust_accuracy`` (with
        ``label``, an attack/view such as ``pgd/implicit``), or a certified section
        (``certified_accuracy``, ...). The clean accuracy is always the first row.
      label: the attack/view of ``section="robust_accuracy"``.
      seed: which seed of a multi-seed workdir the accuracy table and the paired test use.
      pairs: ``"all"`` (every pair) or ``"baseline"`` (each model against the first).

    Returns:
      ``{"section", "label", "seed", "alpha", "models", "eps", "rows", "dropped_eps",
      "accuracy", "paired", "over_seeds", "welch"}``: ``rows`` are ``"clean"`` and the
      common ε (as report keys); ``accuracy[model][row]`` = ``{"k", "n", "accuracy",
      "ci95"}``; ``paired`` = one entry per pair with either ``refused`` (why) or
      ``rows[row]`` = :func:`deqjax.stats.paired_difference` plus ``verdict``;
      ``over_seeds[model][row]`` = ``{"values", "mean", "sd"}`` for models with several
      seeds; ``welch`` = one entry per pair where both have two seeds or more, ``rows[row]``
      = :func:`deqjax.stats.seed_comparison` plus ``verdict``.

    Raises:
      ValueError: fewer than one model, an unknown section or label, a seed a workdir
        lacks, or no ε common to all reports.
    """
    if not named:
        raise ValueError("nothing to compare: give at least one NAME=WORKDIR")
    if pairs not in ("all", "baseline"):
        raise ValueError(f"pairs is 'all' or 'baseline', got {pairs!r}")
    models = {name: _model(name, rep, section, label) for name, rep in named.items()}
    names = list(models)
    for name, m in models.items():
        if not 0 <= seed < len(m["seeds"]):
            raise ValueError(f"{name} has {len(m['seeds'])} seed(s); --seed {seed} does not exist")

    eps_sets = {
        name: [r for r in m["seeds"][seed]["rows"] if r != CLEAN] for name, m in models.items()
    }
    for name, m in models.items():  # every seed of a workdir must hold the ε it is compared at
        for s in m["seeds"]:
            eps_sets[name] = [e for e in eps_sets[name] if e in s["rows"]]
    common = sorted(set.intersection(*(set(v) for v in eps_sets.values())), key=float)
    if not common:
        raise ValueError(
            f"the reports share no ε in section {section!r}: "
            + "; ".join(f"{k}: {[float(e) for e in v]}" for k, v in eps_sets.items())
        )
    rows = [CLEAN] + common
    dropped = {
        name: [float(e) for e in v if e not in common]
        for name, v in eps_sets.items()
        if set(v) - set(common)
    }

    accuracy = {}
    for name, m in models.items():
        s = m["seeds"][seed]
        accuracy[name] = {r: stats.interval(int(s["rows"][r].sum()), s["n"]) for r in rows}

    if pairs == "all":
        pair_list = list(itertools.combinations(names, 2))
    else:
        pair_list = [(names[0], other) for other in names[1:]]

    paired = []
    for a, b in pair_list:
        sa, sb = models[a]["seeds"][seed], models[b]["seeds"][seed]
        entry = {"a": a, "b": b, "test": "exact McNemar (two-sided)"}
        same = sa["images"] is not None and sa["images"] == sb["images"]
        if not same or sa["n"] != sb["n"]:
            entry["refused"] = (
                f"{a} and {b} were not evaluated on the same images (image fingerprints "
                f"{str(sa['images'])[:12]}… vs {str(sb['images'])[:12]}…, n = {sa['n']} vs "
                f"{sb['n']}): the paired test needs the same examples; evaluate both on the "
                "same dataset and --n_examples. Only the separate intervals apply."
            )
        else:
            entry["rows"] = {}
            for r in rows:
                d = stats.paired_difference(sa["rows"][r], sb["rows"][r])
                d["verdict"] = stats.verdict(d["difference"], d["p_value"], names=(a, b))
                entry["rows"][r] = d
        paired.append(entry)

    over_seeds = {}
    for name, m in models.items():
        if len(m["seeds"]) >= 2:
            over_seeds[name] = {}
            for r in rows:
                values = [float(s["rows"][r].mean()) for s in m["seeds"]]
                over_seeds[name][r] = {
                    "values": values,
                    "mean": float(np.mean(values)),
                    "sd": float(np.std(values, ddof=1)),
                }
    welch = []
    for a, b in pair_list:
        if a in over_seeds and b in over_seeds:
            entry = {"a": a, "b": b, "rows": {}}
            for r in rows:
                w = stats.seed_comparison(over_seeds[a][r]["values"], over_seeds[b][r]["values"])
                w["verdict"] = stats.verdict(w["difference"], w["p_value"], names=(a, b))
                entry["rows"][r] = w
            welch.append(entry)

    return {
        "section": section,
        "label": label,
        "seed": seed,
        "alpha": stats.ALPHA,
        "models": names,
        "seeds": {name: len(m["seeds"]) for name, m in models.items()},
        "eps": [float(e) for e in common],
        "rows": rows,
        "dropped_eps": dropped,
        "accuracy": accuracy,
        "paired": paired,
        "over_seeds": over_seeds,
        "welch": welch,
    }


# --- output --------------------------------------------------------------------------------
def _row_name(row: str) -> str:
    return CLEAN if row == CLEAN else f"ε={float(row):g}"


def _p(p) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _sd(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def markdown(comparison: dict) -> str:
    """The comparison (:func:`compare_reports`) as markdown tables: accuracies with exact
    intervals, the paired tests, and the tests over seeds."""
    c, names, rows = comparison, comparison["models"], comparison["rows"]
    what = c["section"] + (f" {c['label']}" if c["label"] else "")
    several = any(k > 1 for k in c["seeds"].values())
    lines = [
        f"Section: **{what}** ({SECTION_NAMES.get(c['section'], c['section'])})"
        + (f"; seed {c['seed']} of multi-seed workdirs" if several else "")
        + ". Accuracy [exact 95% interval], n examples:",
        "",
        "| | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for r in rows:
        cells = []
        for name in names:
            iv = c["accuracy"][name][r]
            lo, hi = iv["ci95"]
            cells.append(f"{iv['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] n={iv['n']}")
        lines.append(f"| {_row_name(r)} | " + " | ".join(cells) + " |")
    for name, eps in c["dropped_eps"].items():
        lines += ["", f"Not compared (ε not in every report): {name} at ε = {eps}."]
    if c["paired"]:
        lines += [
            "",
            "Paired differences on the same images (exact McNemar test, two-sided; interval "
            "of the difference conditional on the discordant count). A direction is stated "
            f"only where p < {c['alpha']:g}.",
        ]
    for pair in c["paired"]:
        a, b = pair["a"], pair["b"]
        lines += ["", f"**{a} vs {b}**", ""]
        if "refused" in pair:
            lines.append(f"Paired test refused: {pair['refused']}")
            continue
        lines += [
            f"| | {a} − {b} | 95% interval | only {a} / only {b} | p (McNemar) | verdict |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            d = pair["rows"][r]
            lo, hi = (v + 0.0 for v in d["ci95_difference"])  # no "-0.000"
            lines.append(
                f"| {_row_name(r)} | {d['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
                f"{d['only_a']} / {d['only_b']} | {_p(d['p_value'])} | {d['verdict']} |"
            )
    if c["over_seeds"]:
        seeded = [n for n in names if n in c["over_seeds"]]
        lines += [
            "",
            "Over seeds (mean ± sd of the accuracy; each seed a separately trained model):",
            "",
            "| | " + " | ".join(f"{n} ({c['seeds'][n]} seeds)" for n in seeded) + " |",
            "| --- | " + " | ".join("---" for _ in seeded) + " |",
        ]
        for r in rows:
            cells = [
                f"{c['over_seeds'][n][r]['mean']:.3f} ± {c['over_seeds'][n][r]['sd']:.3f}"
                for n in seeded
            ]
            lines.append(f"| {_row_name(r)} | " + " | ".join(cells) + " |")
    for pair in c["welch"]:
        a, b = pair["a"], pair["b"]
        lines += [
            "",
            f"**{a} vs {b} over seeds** (Welch t-test of the means, two-sided)",
            "",
            f"| | mean {a} − {b} | sd {a} / {b} | p (Welch) | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            w = pair["rows"][r]
            lines.append(
                f"| {_row_name(r)} | {w['difference']:+.3f} | {_sd(w['sd_a'])} / "
                f"{_sd(w['sd_b'])} | {_p(w['p_value'])} | {w['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def plot(comparison: dict, path: str) -> None:
    """Accuracy against ε per model with exact 95% intervals as error bars (the clean
    accuracy as a hollow marker at ε = 0), written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = comparison
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    eps_rows = [r for r in c["rows"] if r != CLEAN]
    for i, name in enumerate(c["models"]):
        acc = c["accuracy"][name]

        def bars(rs, acc=acc):
            v = np.array([acc[r]["accuracy"] for r in rs])
            lo = np.array([acc[r]["ci95"][0] for r in rs])
            hi = np.array([acc[r]["ci95"][1] for r in rs])
            return v, np.clip([v - lo, hi - v], 0, None)

        shift = (i - (len(c["models"]) - 1) / 2) * 0.004 * max(c["eps"] + [1e-3])
        v, err = bars(eps_rows)
        xs = np.array([float(r) for r in eps_rows]) + shift
        line = ax.errorbar(xs, v, yerr=err, fmt="-o", capsize=3, lw=1.5, label=name)
        v0, err0 = bars([CLEAN])
        ax.errorbar(
            [shift], v0, yerr=err0, fmt="o", mfc="none", capsize=3, color=line[0].get_color()
        )
    what = c["section"] + (f" {c['label']}" if c["label"] else "")
    ax.set_xlabel("ε")
    ax.set_ylabel(f"accuracy ({what})")
    ax.set_ylim(0, 1)
    ax.set_title("bars: exact 95% intervals; hollow: clean", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description="Accuracies with exact intervals, paired exact McNemar tests on the same "
        "images and Welch tests over seeds, from the report.json of several workdirs.",
    )
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR (a workdir with a report.json)")
    p.add_argument(
        "--section",
        default="worst_case",
        help="worst_case (default), robust_accuracy (with --label) or a certified_accuracy section",
    )
    p.add_argument("--label", default=None, help="the attack/view of robust_accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of multi-seed workdirs (0)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="compare each model with the first only (default: every pair)",
    )
    p.add_argument("--out", default=None, help="plot of accuracy against ε (.png)")
    p.add_argument("--json", default=None, help="write the comparison as JSON")
    args = p.parse_args(argv)
    try:
        workdirs = parse_runs(args.runs)
        named = {name: load_report(w) for name, w in workdirs.items()}
        comparison = compare_reports(
            named,
            section=args.section,
            label=args.label,
            seed=args.seed,
            pairs="baseline" if args.baseline else "all",
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    comparison["workdirs"] = workdirs
    print(markdown(comparison), end="")
    if args.out:
        plot(comparison, args.out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(comparison, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
