"""The robustness report: options, scoring, solver statistics and the files it writes.

One report is :func:`deqjax.robustness.evaluate_robustness` over a model's attacked views
(:mod:`experiments.views`), plus the model family's report sections, the DEQ solver
statistics of the evaluated examples, and the sanity flags. Every report script
(``experiments.evaluate``, ``experiments.otad_evaluate``) builds it with
:func:`score` and writes it with :func:`write` (``.json``, ``.md``, ``.png``), through
:mod:`experiments.common`'s file helpers so ``gs://`` workdirs work.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deqjax import attacks, stats
from deqjax import data as data_lib
from deqjax.robustness import evaluate_robustness
from experiments import common, parallel
from experiments.spec import split_list
from experiments.workdir import Run

# The robustness options a command line may override (``--eps=0.1,0.3`` …).
REPORT_KEYS = (
    "norm",
    "eps",
    "attacks",
    "n_examples",
    "n_iter",
    "n_queries",
    "restarts",
    "gradients",
    "state_indices",
    "attack_steps",
    "attack_damping",
    "protocols",
    "batch_size",
    "seed",
    "compact",
    "warm_start",
)
# Options a config written before they existed lacks, with the value it gets.
NEW_KEY_DEFAULTS = {"compact": True, "warm_start": True}


def robustness_options(
    config: ml_collections.ConfigDict, overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """``config.robustness`` with ``overrides`` applied (cast to each key's type); an
    unknown key is an error naming the valid ones."""
    r = ml_collections.ConfigDict(config.robustness.to_dict())
    for k, v in NEW_KEY_DEFAULTS.items():
        if k not in r:
            r[k] = v
    for k, v in (overrides or {}).items():
        if k not in r:
            raise ValueError(f"unknown robustness option {k!r}; choose from {sorted(r.keys())}")
        if isinstance(r[k], bool) and isinstance(v, str):
            if v.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"robustness option {k!r} is true or false, got {v!r}")
            r[k] = v.strip().lower() in ("true", "1")
        else:
            r[k] = type(r[k])(v) if not isinstance(r[k], str) else str(v)
    return r


def test_examples(run: Run, r) -> tuple[np.ndarray, np.ndarray]:
    """The first ``r.n_examples`` test examples, validated."""
    ds = run.dataset
    n = min(int(r.n_examples), len(ds.test_images))
    x, y = ds.test_images[:n], ds.test_labels[:n]
    data_lib.validate_images(x, "test images")
    data_lib.validate_labels(y, ds.num_classes, "test labels")
    return x, y


def progress_bar(quiet: bool, description: str = "robustness"):
    """``(progress(description, done, total), close())`` driving a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=None, disable=quiet, file=sys.stderr, desc=description, unit="attack run")

    def progress(text, done, total):
        bar.total = total
        bar.set_description(text)
        bar.n = done
        bar.refresh()

    def close():
        bar.n = bar.total or 0
        bar.close()

    return progress, close


def solver_statistics(run: Run, x: np.ndarray, batch_size: int, mesh) -> dict:
    """Mean forward steps, relative residual and converged fraction of the model's own
    evaluation forward over all evaluated examples (DEQs)."""
    spec = run.spec

    @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
    def sums(variables, xb):
        _, stats = spec.module.apply(variables, xb, **spec.eval_kwargs)
        return [jnp.sum(stats.steps), jnp.sum(stats.rel_residual), jnp.sum(stats.converged)]

    variables = {"params": run.state.params, **run.state.model_state}
    total = np.zeros(3)
    for i in range(0, len(x), batch_size):
        total += np.asarray([float(v) for v in sums(variables, jnp.asarray(x[i : i + batch_size]))])
    steps, res, conv = total / len(x)
    return {"mean_steps": steps, "mean_rel_residual": res, "converged_fraction": conv}


def score(
    run: Run,
    evaluated,
    r,
    x,
    y,
    *,
    norm: str,
    eps_list,
    mesh,
    progress=None,
    solver_scope: str | None = None,
    store=None,
    stop=None,
) -> dict:
    """The report of one model (an :class:`experiments.views.Evaluated`) on one norm:
    every attack of ``r.attacks`` through every view, scored on the model's own forward
    (compacted when ``r.compact``: each example attacked at an ε only until a run breaks
    it), the family's report sections, (DEQs) the evaluated forward's solver statistics
    with the ``forward_not_converged`` flag, and every accuracy's ``n`` and exact 95%
    interval (:func:`add_intervals`). ``store`` / ``stop``: resuming an interrupted
    evaluation (:class:`RunStore`, :func:`deqjax.robustness.evaluate_robustness`)."""
    report = evaluate_robustness(
        evaluated.views,
        x,
        y,
        jax.random.PRNGKey(r.seed),
        eps_list=eps_list,
        norm=norm,
        attacks=split_list(r.attacks),
        n_iter=r.n_iter,
        n_queries=r.n_queries,
        restarts=r.restarts,
        batch_size=r.batch_size,
        progress=progress,
        mesh=mesh,
        score=evaluated.score,
        compact=bool(r.get("compact", False)),
        store=store,
        stop=stop,
    )
    report["model"] = run.config.model.name
    report["settings"] = {k: r[k] for k in REPORT_KEYS if k in r}
    for hook in run.spec.report_hooks:
        section = dict(hook(run.spec, run.state, x, y, eps_list, r))
        report["outcomes"].update(section.pop("outcomes", {}))
        report.update(section)
    if run.spec.is_deq:
        report["solver"] = solver_statistics(run, x, int(r.batch_size), mesh)
        if solver_scope:
            report["solver_scope"] = solver_scope
        flags = attacks.sanity_flags(converged_fraction=report["solver"]["converged_fraction"])
        report["sanity"]["flags"].update(flags.flags)
        report["sanity"]["explanations"].update(flags.explanations)
        report["sanity"]["unreliable"] = bool(any(report["sanity"]["flags"].values()))
    return add_intervals(report)


# --- intervals --------------------------------------------------------------------------
def accuracy_keys(report: dict) -> list[str]:
    """The report's accuracy sections: clean, per attack/view, worst case, certified."""
    keys = ["clean_accuracy", "robust_accuracy", "worst_case"]
    keys += sorted(k for k in report if k.startswith("certified_accuracy"))
    return [k for k in keys if k in report]


def _interval_tree(value, n: int):
    if isinstance(value, dict):
        return {k: _interval_tree(v, n) for k, v in value.items()}
    k = round(float(value) * n)
    if abs(float(value) * n - k) > 1e-6 * max(1, n):
        raise ValueError(f"accuracy {value} is not a count out of n = {n}")
    iv = stats.interval(k, n)
    return {"k": iv["k"], "n": iv["n"], "ci95": iv["ci95"]}


def add_intervals(report: dict) -> dict:
    """Add ``report["intervals"]``: for every accuracy section (:func:`accuracy_keys`) the
    same nesting with ``{"k", "n", "ci95": [lo, hi]}`` leaves — successes, examples and
    the exact Clopper–Pearson 95% interval (:func:`deqjax.stats.clopper_pearson`). Per-seed
    entries (``report["seeds"]``) get theirs too. Returns the report."""
    for entry in report.get("seeds", []):
        add_intervals(entry)
    n = int(report["n_examples"])
    report["intervals"] = {k: _interval_tree(report[k], n) for k in accuracy_keys(report)}
    return report


def _with_ci(report: dict, section: str, *path, digits: int = 3) -> str:
    value = report[section]
    for p in path:
        value = value[p]
    iv = report.get("intervals", {}).get(section)
    for p in path:
        iv = None if iv is None else iv.get(p)
    if not iv:
        return f"{value:.{digits}f}"
    lo, hi = iv["ci95"]
    return f"{value:.{digits}f} [{lo:.2f}, {hi:.2f}]"


def seed_summary(reports: list[dict]) -> dict:
    """Mean, sd (ddof 1) and the values over seeds of every accuracy of
    :func:`accuracy_keys` (same nesting; leaves ``{"mean", "sd", "values"}``), from the
    per-seed reports of one workdir (same images and settings)."""

    def tree(values):
        if isinstance(values[0], dict):
            return {k: tree([v[k] for v in values]) for k in values[0]}
        arr = np.asarray(values, float)
        sd = float(arr.std(ddof=1)) if arr.size > 1 else None
        return {"mean": float(arr.mean()), "sd": sd, "values": arr.tolist()}

    out = {k: tree([r[k] for r in reports]) for k in accuracy_keys(reports[0])}
    out["n_seeds"] = len(reports)
    return out


# --- resuming ---------------------------------------------------------------------------
class RunStore:
    """The finished attack runs (ε × attack/view) of one evaluation, one ``.npz`` each in
    ``directory`` (local or ``gs://``): what :func:`deqjax.robustness.evaluate_robustness`
    saves after each run and reads back instead of running it again. ``directory`` must
    name the evaluated settings (:func:`state_directory`). Only ``write=True`` processes
    write (process 0)."""

    def __init__(self, directory: str, write: bool = True):
        self.directory, self.write = directory, write

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name.replace("/", "__") + ".npz")

    def load(self, name: str) -> dict | None:
        data = common.read_bytes(self._path(name))
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data)) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a write cut short: run it again
            return None

    def save(self, name: str, arrays: dict) -> None:
        if not self.write:
            return
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path = self._path(name)
        if path.startswith("gs://"):
            common.write_bytes(path, buf.getvalue())
            return
        os.makedirs(self.directory, exist_ok=True)
        with open(path + ".tmp", "wb") as fh:  # never a half-written file under the name
            fh.write(buf.getvalue())
        os.replace(path + ".tmp", path)

    def count(self) -> int:
        from etils import epath

        p = epath.Path(self.directory)
        return len(list(p.glob("*.npz"))) if p.exists() else 0

    def clear(self) -> None:
        if not self.write:
            return
        from etils import epath

        p = epath.Path(self.directory)
        if p.exists():
            p.rmtree()


def state_directory(workdir: str, name: str, run: Run, r, x, y, **extra) -> str:
    """``WORKDIR/report_state/<name>-<hash>``: the hash covers the robustness options,
    the checkpoint's parameters and the evaluated images, so a changed setting or a newer
    checkpoint never resumes from runs of another evaluation."""
    h = hashlib.sha256()
    options = {k: r[k] for k in sorted(r.keys())}
    h.update(json.dumps({"options": options, **extra}, sort_keys=True, default=str).encode())
    for leaf in jax.tree.leaves(run.state.params):
        if getattr(leaf, "is_fully_addressable", True):
            h.update(np.ascontiguousarray(np.asarray(jax.device_get(leaf))).tobytes())
        else:  # spread over processes: its shape (and the step in ``extra``) name it
            h.update(str((leaf.shape, leaf.dtype)).encode())
    h.update(stats.examples_fingerprint(x, y).encode())
    return os.path.join(workdir, "report_state", f"{name}-{h.hexdigest()[:16]}")


def _seed_lines(report: dict) -> list[str]:
    """The across-seed table: mean ± sd of the clean and worst-case accuracies."""
    a, eps = report["across_seeds"], report["eps"]
    seeds = ", ".join(str(e["seed"]) for e in report.get("seeds", []))

    def fmt(t):
        sd = f" ± {t['sd']:.3f}" if t["sd"] is not None else ""
        return f"{t['mean']:.3f}{sd}"

    lines = [
        "",
        f"Over {a['n_seeds']} seeds ({seeds}; the table above is seed "
        f"{report['seeds'][0]['seed']}'s), mean ± sd:",
        "",
        "| | clean | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in eps) + " |",
        f"| worst case | {fmt(a['clean_accuracy'])} | "
        + " | ".join(fmt(a["worst_case"][str(e)]) for e in eps)
        + " |",
    ]
    return lines


def markdown(report: dict) -> str:
    """The report as a markdown table with its sanity flags and solver statistics."""
    eps = report["eps"]
    labels = list(report["robust_accuracy"][str(eps[0])])
    n = report["n_examples"]
    lines = [
        f"Clean accuracy: **{_with_ci(report, 'clean_accuracy', digits=4)}** on {n} "
        f"test examples; norm {report['norm']}.",
        "",
    ]
    if "intervals" in report:
        lines += [
            f"[lo, hi]: exact (Clopper–Pearson) 95% interval of the accuracy over the n = {n} "
            "examples.",
            "",
        ]
    if report.get("compact"):
        lines += [
            "Compacted evaluation: at each ε every run attacks only the examples that all "
            "rows above it left robust, so each row is the accuracy after it and every row "
            "above (cumulative); only the first row is a standalone attack. The worst case "
            "is the same as attacking every example with every run.",
            "",
        ]
    lines += [
        "| attack / gradient view | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
        "| --- | " + " | ".join("---" for _ in eps) + " |",
    ]
    for lab in labels:
        cells = " | ".join(_with_ci(report, "robust_accuracy", str(e), lab) for e in eps)
        lines.append(f"| {lab} | {cells} |")
    worst = " | ".join(f"**{_with_ci(report, 'worst_case', str(e))}**" for e in eps)
    lines.append(f"| **worst case** | {worst} |")
    for key in sorted(k for k in report if k.startswith("certified_accuracy")):
        suffix = key[len("certified_accuracy") :].strip("_")
        cells = " | ".join(_with_ci(report, key, str(e)) for e in eps)
        lines.append(f"| certified{f' ({suffix})' if suffix else ''} | {cells} |")
    if "across_seeds" in report:
        lines += _seed_lines(report)
    lines += ["", "Sanity flags (True = evaluation looks unreliable):", ""]
    for k, v in report["sanity"]["flags"].items():
        lines.append(f"- `{k}`: {v} — {report['sanity']['explanations'].get(k, '')}")
    scope = f" ({report['solver_scope']})" if "solver_scope" in report else ""
    for k, v in report.get("solver", {}).items():
        lines.append(f"- solver{scope} `{k}`: {v:.4g}")
    return "\n".join(lines) + "\n"


def plot_png(report: dict) -> bytes:
    """Accuracy against ε: one line per attack/view, the worst case (and the certified
    accuracy when present), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = report["eps"]
    fig, ax = plt.subplots(figsize=(6, 4))

    def errorbar(section, *path, **kw):
        acc, err = [], [[], []]
        for e in eps:
            v, iv = report[section][str(e)], report.get("intervals", {}).get(section, {})
            iv = iv.get(str(e), {})
            for p in path:
                v, iv = v[p], iv.get(p, {})
            acc.append(v)
            lo, hi = iv.get("ci95", (v, v))
            err[0].append(v - lo)
            err[1].append(hi - v)
        ax.errorbar(eps, acc, yerr=err, capsize=2, **kw)

    for lab in report["robust_accuracy"][str(eps[0])]:
        errorbar("robust_accuracy", lab, marker=".", lw=1, alpha=0.7, label=lab)
    errorbar("worst_case", fmt="k-", lw=2.5, marker="o", label="worst case")
    if "certified_accuracy" in report:
        errorbar("certified_accuracy", fmt="g--", lw=2, label="certified")
    ax.set_xlabel(f"ε ({report['norm']})")
    ax.set_ylabel("accuracy" + (" (cumulative rows)" if report.get("compact") else ""))
    ax.set_ylim(0, 1)
    ax.set_title(
        f"clean {report['clean_accuracy']:.3f}, n = {report['n_examples']}"
        + ("; bars: exact 95% intervals" if "intervals" in report else "")
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    return buf.getvalue()


def write(report: dict, base: str, png: str | None = None) -> str:
    """Write ``base.json``, ``base.md`` and the plot (``png``, default ``base.png``),
    local or ``gs://``; returns the markdown."""
    text = markdown(report)
    common.write_text(base + ".json", json.dumps(report, indent=2))
    common.write_text(base + ".md", text)
    common.write_bytes(png or base + ".png", plot_png(report))
    return text
