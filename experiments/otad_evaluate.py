r"""Robustness reports of an OTAD workdir: the same network without OTAD, with the
CIP solver, and (``otad_nn``) with the neural CIP (Gai, Wang & Zhang,
arXiv:2408.00329; SPEC sections 6 and 7).

    python -m experiments.otad_evaluate --workdir runs/otad_mnist_nn [--n_examples=100] [--refit]

Runs :func:`experiments.families.otad.fit` first when its files are missing.
For every model and norm (``robustness.norm/eps``, then ``otad.also_norm/also_eps``)
writes ``report_{model}_{norm}.json/.md/.png`` with
:func:`experiments.evaluate.write_markdown`/``plot``, and a comparison table of the
worst cases in ``otad_report.md`` and ``otad_report.json``.

Gradient views (all views of a model compute the same logits; an example counts as
robust only if it survives every attack through every view):

* ``resnet``: ``autodiff`` -- the plain network;
* ``otad``: ``bpda`` -- forward = OTAD logits, backward = the original network's
  gradient (straight-through ``stop_gradient(cip) + net - stop_gradient(net)``,
  Athalye et al. 2018); ``cip_implicit`` -- autodiff through the CIP solver
  (implicit gradient of the dual QP; neighbour selection is piecewise constant);
* ``otad_nn``: ``autodiff`` -- full white-box through the neural CIP; ``bpda``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deqjax import data as data_lib
from deqjax.otad import NeuralCIP, neural_otad_logits, otad_logits
from deqjax.robustness import evaluate_robustness
from experiments import evaluate as evaluate_lib
from experiments.families import otad as fam

VIEWS = {"otad": ("bpda", "cip_implicit"), "otad_nn": ("autodiff", "bpda")}


def bpda(forward, backward):
    """Straight-through logits: the value of ``forward(x)``, the gradient of
    ``backward(x)`` (BPDA, Athalye, Carlini & Wagner 2018). Exact in value, since
    ``b - stop_gradient(b) == 0`` in floating point."""

    def fn(x):
        b = backward(x)
        return jax.lax.stop_gradient(forward(jax.lax.stop_gradient(x))) + (
            b - jax.lax.stop_gradient(b)
        )

    return fn


def model_logits(spec, state, fit: fam.OTADFit, config) -> dict:
    """``{"resnet", "otad"[, "otad_nn"]}``: batched logits functions of images."""
    module, variables = spec.module, {"params": state.params}
    o = config.otad
    index_x0, index_z = jnp.asarray(fit.x0), jnp.asarray(fit.z)
    keys = None if o.neighbours == "embedding" else jnp.asarray(fit.keys)

    def query(x):
        return None if keys is None else x.reshape(x.shape[0], -1)

    out = {"resnet": lambda x: module.apply(variables, x)[0]}
    kw = fam.cip_kwargs(o)
    out["otad"] = lambda x: otad_logits(
        module, variables, index_x0, index_z, x, **kw, index_keys=keys, query_keys=query(x)
    )[0]
    if fit.cip_params is not None:
        net = NeuralCIP(hidden=int(o.cip_hidden))
        out["otad_nn"] = lambda x: neural_otad_logits(
            module,
            variables,
            net,
            fit.cip_params,
            index_x0,
            index_z,
            x,
            k=int(o.k),
            index_keys=keys,
            query_keys=query(x),
        )
    return out


def model_views(logits: dict, config) -> dict:
    """``{model: {view: logits_fn}}`` (module docstring); views from ``config.otad``."""
    net = logits["resnet"]
    chosen = {
        "otad": evaluate_lib._split(config.otad.views_cip),
        "otad_nn": evaluate_lib._split(config.otad.views_nn),
    }
    out = {"resnet": {"autodiff": net}}
    for name in ("otad", "otad_nn"):
        if name not in logits:
            continue
        make = {
            "bpda": bpda(logits[name], net),
            "autodiff": logits[name],
            "cip_implicit": logits[name],
        }
        bad = [v for v in chosen[name] if v not in VIEWS[name]]
        if bad or not chosen[name]:
            raise ValueError(
                f"views {bad or chosen[name]} not available for {name}; choose from {VIEWS[name]}"
            )
        out[name] = {v: make[v] for v in chosen[name]}
    return out


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
    config, spec, state, ds = evaluate_lib.load_run(workdir)
    fam.check_otad_config(config)
    r = ml_collections.ConfigDict(config.robustness.to_dict())
    for k, v in (overrides or {}).items():
        if k not in r:
            raise ValueError(f"unknown robustness option {k!r}; choose from {sorted(r.keys())}")
        r[k] = type(r[k])(v) if not isinstance(r[k], str) else str(v)
    if config.model.name != "otad_resnet" and (
        refit or not os.path.exists(os.path.join(workdir, fam.INDEX_FILE))
    ):
        fam.fit(workdir, quiet=quiet)
    if config.model.name == "otad_resnet":
        fit = fam.OTADFit(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1))
    else:
        fit = fam.load_fit(workdir, config)
    n = min(int(r.n_examples), len(ds.test_images))
    x, y = ds.test_images[:n], ds.test_labels[:n]
    data_lib.validate_images(x, "test images")
    data_lib.validate_labels(y, ds.num_classes, "test labels")
    logits = model_logits(spec, state, fit, config)
    if config.model.name == "otad_resnet":
        logits = {"resnet": logits["resnet"]}
    views = model_views(logits, config)
    if models is not None:
        views = {m: v for m, v in views.items() if m in models}
    out = {"model": config.model.name}
    if "otad" in logits:
        out["cip"] = cip_records(spec, state, fit, config, x, int(r.batch_size))
    fit_path = os.path.join(workdir, fam.FIT_FILE)
    if os.path.exists(fit_path):
        out["fit"] = json.load(open(fit_path))
    for name, v in views.items():
        out[name] = {}
        for norm, eps in _norm_runs(config, r):
            eps_list = [float(e) for e in evaluate_lib._split(eps)]
            rep = evaluate_robustness(
                v,
                x,
                y,
                jax.random.PRNGKey(r.seed),
                eps_list=eps_list,
                norm=norm,
                attacks=evaluate_lib._split(r.attacks),
                n_iter=r.n_iter,
                n_queries=r.n_queries,
                restarts=r.restarts,
                batch_size=r.batch_size,
            )
            rep["model"] = name
            if name == "otad" and "cip" in out:
                rep["cip"] = out["cip"]
            base = os.path.join(workdir, f"report_{name}_{norm}")
            with open(base + ".json", "w") as fh:
                json.dump(rep, fh, indent=2)
            evaluate_lib.write_markdown(rep, base + ".md")
            evaluate_lib.plot(rep, base + ".png")
            out[name][norm] = rep
    with open(os.path.join(workdir, "otad_report.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    text = comparison_markdown(out)
    with open(os.path.join(workdir, "otad_report.md"), "w") as fh:
        fh.write(text)
    if not quiet:
        print(text, flush=True)
    return out


LABELS = {
    "resnet": "ResNet (no OTAD)",
    "otad": "OTAD (CIP solver)",
    "otad_nn": "OTAD-NN (neural CIP)",
}


def comparison_markdown(out: dict) -> str:
    """One table per norm: clean and worst-case accuracy per model, then per view."""
    lines = []
    names = [m for m in ("resnet", "otad", "otad_nn") if m in out]
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
    from absl import flags

    del argv
    f = flags.FLAGS
    overrides = {k: getattr(f, k) for k in evaluate_lib.REPORT_KEYS if getattr(f, k) is not None}
    evaluate(f.workdir, overrides, refit=f.refit)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "a training workdir of an OTAD config")
    flags.DEFINE_bool("refit", False, "rebuild the index (and neural CIP) first")
    for key in evaluate_lib.REPORT_KEYS:
        flags.DEFINE_string(key, None, f"override robustness.{key}")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
