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
import io
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deqjax import attacks
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
)


def robustness_options(
    config: ml_collections.ConfigDict, overrides: dict | None = None
) -> ml_collections.ConfigDict:
    """``config.robustness`` with ``overrides`` applied (cast to each key's type); an
    unknown key is an error naming the valid ones."""
    r = ml_collections.ConfigDict(config.robustness.to_dict())
    for k, v in (overrides or {}).items():
        if k not in r:
            raise ValueError(f"unknown robustness option {k!r}; choose from {sorted(r.keys())}")
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
) -> dict:
    """The report of one model (an :class:`experiments.views.Evaluated`) on one norm:
    every attack of ``r.attacks`` through every view, scored on the model's own forward,
    the family's report sections, and (DEQs) the evaluated forward's solver statistics
    with the ``forward_not_converged`` flag."""
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
    )
    report["model"] = run.config.model.name
    report["settings"] = {k: r[k] for k in REPORT_KEYS if k in r}
    for hook in run.spec.report_hooks:
        report.update(hook(run.spec, run.state, x, y, eps_list, r))
    if run.spec.is_deq:
        report["solver"] = solver_statistics(run, x, int(r.batch_size), mesh)
        if solver_scope:
            report["solver_scope"] = solver_scope
        flags = attacks.sanity_flags(converged_fraction=report["solver"]["converged_fraction"])
        report["sanity"]["flags"].update(flags.flags)
        report["sanity"]["explanations"].update(flags.explanations)
        report["sanity"]["unreliable"] = bool(any(report["sanity"]["flags"].values()))
    return report


def markdown(report: dict) -> str:
    """The report as a markdown table with its sanity flags and solver statistics."""
    eps = report["eps"]
    labels = list(report["robust_accuracy"][str(eps[0])])
    lines = [
        f"Clean accuracy: **{report['clean_accuracy']:.4f}** on {report['n_examples']} "
        f"test examples; norm {report['norm']}.",
        "",
        "| attack / gradient view | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
        "| --- | " + " | ".join("---" for _ in eps) + " |",
    ]
    for lab in labels:
        cells = " | ".join(f"{report['robust_accuracy'][str(e)][lab]:.3f}" for e in eps)
        lines.append(f"| {lab} | {cells} |")
    worst = " | ".join(f"**{report['worst_case'][str(e)]:.3f}**" for e in eps)
    lines.append(f"| **worst case** | {worst} |")
    for key in sorted(k for k in report if k.startswith("certified_accuracy")):
        suffix = key[len("certified_accuracy") :].strip("_")
        cells = " | ".join(f"{report[key][str(e)]:.3f}" for e in eps)
        lines.append(f"| certified{f' ({suffix})' if suffix else ''} | {cells} |")
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
    for lab in report["robust_accuracy"][str(eps[0])]:
        acc = [report["robust_accuracy"][str(e)][lab] for e in eps]
        ax.plot(eps, acc, marker=".", lw=1, alpha=0.7, label=lab)
    worst = [report["worst_case"][str(e)] for e in eps]
    ax.plot(eps, worst, "k-", lw=2.5, marker="o", label="worst case")
    if "certified_accuracy" in report:
        cert = [report["certified_accuracy"][str(e)] for e in eps]
        ax.plot(eps, cert, "g--", lw=2, label="certified")
    ax.set_xlabel(f"ε ({report['norm']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"clean {report['clean_accuracy']:.3f}")
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
