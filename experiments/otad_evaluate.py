r"""Robustness reports of an OTAD workdir: the same network without OTAD, with the
CIP solver, and (``otad_nn``) with the neural CIP (Gai, Wang & Zhang,
arXiv:2408.00329; docs/methods/otad.md).

    python -m experiments.otad_evaluate --workdir runs/otad_mnist_nn [--n_examples=100] [--refit]

Runs :func:`experiments.otad_fit.fit` first when its files are missing. For every model
and norm (``robustness.norm/eps``, then ``otad.also_norm/also_eps``) writes
``report_{model}_{norm}.json/.md/.png`` with :func:`experiments.report.write`, and a
comparison table of the worst cases in ``otad_report.md`` and ``otad_report.json``.

Models and views (:func:`experiments.families.otad.model_views`; every view of a model
computes that model's logits, and an example counts as robust only if it survives every
attack through every view):

* ``otad_resnet``: ``autodiff`` -- the plain network;
* ``otad`` / ``otad_nn``: the adaptive views of :func:`deqjax.bpda.adaptive_views`
  (``robustness.protocols``): ``autodiff`` -- through the CIP solver (implicit gradient
  of the dual QP; the neighbour selection is piecewise constant) or white-box through
  the neural CIP; ``bpda_autodiff`` -- value of the OTAD model, gradient of the
  original network (BPDA, Athalye et al. 2018); ``transfer_autodiff`` -- attacks on the
  original network, scored on the OTAD model.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from deqjax.otad import otad_logits
from experiments import cli, common, parallel, report
from experiments.families import otad as fam
from experiments.otad_fit import fit
from experiments.views import model_views
from experiments.workdir import load_config, load_run


def cip_records(spec, state, fit, config, x, batch_size: int) -> dict:
    """Solver statistics of the CIP on the evaluated clean examples."""
    o = config.otad
    keys = None if o.neighbours == "embedding" else jnp.asarray(fit.keys)
    run = jax.jit(
        lambda xb: otad_logits(
            spec.module,
            {"params": state.params},
            jnp.asarray(fit.x0),
            jnp.asarray(fit.z),
            xb,
            **fam.cip_kwargs(o),
            index_keys=keys,
            query_keys=None if keys is None else xb.reshape(xb.shape[0], -1),
        )[1]
    )
    recs = [run(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    rec = {
        k: np.concatenate([np.asarray(r[k]) for r in recs])
        for k in ("L_used", "relaxed", "feasible")
    }
    return {
        "form": o.form,
        "k": int(o.k),
        "l": float(o.l),
        "L": float(o.L),
        "relaxed_fraction": float(rec["relaxed"].mean()),
        "infeasible_fraction": float(1.0 - rec["feasible"].mean()),
        "mean_L_used": float(rec["L_used"].mean()),
        "max_L_used": float(rec["L_used"].max()),
    }


def _norm_runs(config, r):
    runs = [(r.norm, r.eps)]
    if config.otad.also_norm and config.otad.also_eps:
        runs.append((config.otad.also_norm, config.otad.also_eps))
    return runs


def evaluate(
    workdir: str,
    overrides: dict | None = None,
    *,
    refit: bool = False,
    quiet: bool = False,
    models: tuple | None = None,
) -> dict:
    """Reports of every model of the workdir (module docstring); returns
    ``{model: {norm: report}}`` plus ``"cip"`` (solver statistics) and ``"fit"``."""
    config = load_config(workdir)
    fam.check_otad_config(config)
    needs_fit = config.model.name != "otad_resnet"
    if needs_fit and (refit or common.read_bytes(os.path.join(workdir, fam.INDEX_FILE)) is None):
        fit(workdir, quiet=quiet)
    run = load_run(workdir)
    mesh, _ = parallel.mesh_from_config(config)
    r = report.robustness_options(config, overrides)
    x, y = report.test_examples(run, r)
    evaluated = model_views(run, r)
    if models is not None:
        evaluated = {m: v for m, v in evaluated.items() if m in models}
    out = {"model": config.model.name}
    if "otad" in evaluated:
        fit_data = fam.load_fit(workdir, config)
        out["cip"] = cip_records(run.spec, run.state, fit_data, config, x, int(r.batch_size))
    fit_stats = common.read_text(os.path.join(workdir, fam.FIT_FILE))
    if fit_stats is not None:
        out["fit"] = json.loads(fit_stats)
    for name, ev in evaluated.items():
        out[name] = {}
        for norm, eps in _norm_runs(config, r):
            eps_list = [float(e) for e in report.split_list(eps)]
            rep = report.score(run, ev, r, x, y, norm=norm, eps_list=eps_list, mesh=mesh)
            rep["model"] = name
            if name == "otad" and "cip" in out:
                rep["cip"] = out["cip"]
            report.write(rep, os.path.join(workdir, f"report_{name}_{norm}"))
            out[name][norm] = rep
    common.write_text(os.path.join(workdir, "otad_report.json"), json.dumps(out, indent=2))
    text = comparison_markdown(out)
    common.write_text(os.path.join(workdir, "otad_report.md"), text)
    if not quiet:
        print(text, flush=True)
    return out


LABELS = {
    "otad_resnet": "ResNet (no OTAD)",
    "otad": "OTAD (CIP solver)",
    "otad_nn": "OTAD-NN (neural CIP)",
}


def comparison_markdown(out: dict) -> str:
    """One table per norm: clean and worst-case accuracy per model, then per view."""
    lines = []
    names = [m for m in ("otad_resnet", "otad", "otad_nn") if m in out]
    norms = list(out[names[0]]) if names else []
    for norm in norms:
        eps = out[names[0]][norm]["eps"]
        lines += [
            f"**{norm}** ({out[names[0]][norm]['n_examples']} test examples; worst case "
            f"over {', '.join(out[names[0]][norm]['attacks'])} and the views listed)",
            "",
            "| model | views | clean | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in eps) + " |",
        ]
        for m in names:
            rep = out[m][norm]
            lines.append(
                f"| {LABELS[m]} | {', '.join(rep['views'])} | {rep['clean_accuracy']:.3f} | "
                + " | ".join(f"{rep['worst_case'][str(float(e))]:.3f}" for e in eps)
                + " |"
            )
            if len(rep["views"]) > 1:
                for v in rep["views"]:
                    cells = [
                        min(
                            val
                            for lab, val in rep["robust_accuracy"][str(float(e))].items()
                            if lab.endswith("/" + v)
                        )
                        for e in eps
                    ]
                    lines.append(
                        f"| &nbsp;&nbsp;{LABELS[m]} | {v}: best single gradient attack | | "
                        + " | ".join(f"{c:.3f}" for c in cells)
                        + " |"
                    )
        unreliable = [m for m in names if out[m][norm]["sanity"]["unreliable"]]
        lines += [
            "",
            "Sanity flags raised for: "
            + (
                ", ".join(
                    f"{m} ({', '.join(k for k, f in out[m][norm]['sanity']['flags'].items() if f)})"
                    for m in unreliable
                )
                or "none"
            ),
            "",
        ]
    if "cip" in out:
        c = out["cip"]
        lines.append(
            f"CIP ({c['form']} form, K={c['k']}, l={c['l']:g}, L={c['L']:g}) on the clean "
            f"test points: L relaxed for {c['relaxed_fraction']:.0%}, mean L used "
            f"{c['mean_L_used']:.3g} (max {c['max_L_used']:.3g}), LP infeasible at every "
            f"tried L for {c['infeasible_fraction']:.0%}."
        )
    if "fit" in out and "cip_val_rel_error" in out["fit"]:
        f = out["fit"]
        lines.append(
            f"Neural CIP: relative error {f['cip_val_rel_error']:.3f} against the solver on "
            f"held-out queries, same class as the solver's feature for "
            f"{f['cip_val_class_agreement']:.1%}."
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    evaluate(cli.flag("workdir"), cli.report_overrides(), refit=cli.flag("refit"))


if __name__ == "__main__":
    cli.run_report(
        main,
        "a training workdir of an OTAD config",
        extra_flags=lambda flags: flags.DEFINE_bool(
            "refit", False, "rebuild the index (and neural CIP) first"
        ),
    )
