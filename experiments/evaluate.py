r"""Robustness report of a trained model.

    python -m experiments.evaluate --workdir runs/deq_mnist [--eps=0.1,0.3] [--norm=l2]
        [--attacks=pgd,apgd-ce,apgd-t,square] [--n_examples=500] [--gradients=implicit,phantom]

Loads ``WORKDIR/config.json`` and the latest checkpoint, and writes
``WORKDIR/report.json``, ``WORKDIR/report.md`` and ``WORKDIR/robustness.png``
(accuracy against ε: one line per attack/gradient view, and the worst case).
Flags override the config's ``robustness`` block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from deqjax import data as data_lib
from deqjax.robustness import evaluate_robustness
from experiments import common, models, parallel

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
    "batch_size",
    "seed",
)


def _split(s) -> list[str]:
    return [p.strip() for p in str(s).split(",") if p.strip()]


def load_run(workdir: str):
    """(config, spec, state, dataset) of a training workdir."""
    path = os.path.join(workdir, "config.json")
    if common.read_text(path) is None:
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a directory written by experiments.train"
        )
    config = ml_collections.ConfigDict(json.loads(common.read_text(path)))
    ds = data_lib.load_dataset(
        config.dataset, config.data_dir or None, config.limit_train, config.limit_test
    )
    spec = models.build(config, ds.num_classes)
    template = common.init_state(
        spec.module, common.build_optimizer(config.train, 1), ds.image_shape, config.seed
    )
    mesh, shard_params = parallel.mesh_from_config(config)  # restored as training laid it out
    template = parallel.put_state(template, parallel.state_shardings(mesh, template, shard_params))
    state = common.restore_latest(common.checkpoint_manager(workdir), template)
    if state is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints: train first")
    if spec.prepare_eval is not None:
        spec, state = spec.prepare_eval(spec, state, ds.image_shape)
    return config, spec, state, ds


def entropy_views(spec: models.ModelSpec, state, er, undefended: dict) -> dict:
    """Views of a DEQ defended by input entropy reduction (SPEC §5), labelled by protocol:
    ``adaptive_bpda`` (scores every attack: defended logits, BPDA gradient),
    ``adaptive_autodiff`` (differentiates through the whole defence) and
    ``nonadaptive_<view>`` (the authors' protocol: attacks built on the undefended
    model, scored on the defended one)."""
    from deqjax.regulation import bpda_defended_logits, entropy_reduction

    variables = {"params": state.params, **state.model_state}
    module = spec.module
    eval_cfg = spec.eval_kwargs["config"]
    round_cfg = dataclasses.replace(
        eval_cfg, forward=dataclasses.replace(eval_cfg.forward, max_iter=int(er.round_steps))
    )

    def defence(x):
        return entropy_reduction(
            lambda xx: module.apply(variables, xx, method="inject"),
            lambda u, z0: module.apply(variables, u, z0, round_cfg, method="solve_from")[0],
            lambda u, z: module.apply(
                variables,
                u,
                z,
                int(er.phantom_steps),
                float(er.phantom_damping),
                method="phantom_from",
            ),
            lambda z: module.apply(variables, z, method="classify"),
            x,
            rounds=int(er.rounds),
            steps=int(er.steps),
            eps=float(er.eps),
            step_size=float(er.step_size),
        )

    plain = undefended.get("implicit") or next(iter(undefended.values()))
    views = {
        "adaptive_bpda": lambda x: bpda_defended_logits(defence, plain, x),
        "adaptive_autodiff": lambda x: defence(x)[0],
    }
    views.update({f"nonadaptive_{k}": v for k, v in undefended.items()})
    return views


def gradient_views(spec: models.ModelSpec, state, r, entropy_cfg=None) -> dict:
    """``{view name: logits_fn}``: the gradient paths attacks follow (one for explicit nets).
    The first view scores every attack."""
    variables = {"params": state.params, **state.model_state}
    base = dict(spec.eval_kwargs)

    def view(**kw):
        return lambda x: spec.module.apply(variables, x, **base, **kw)[0]

    if not spec.is_deq:
        return {"autodiff": view()}
    out = {}
    for g in _split(r.gradients):
        if g == "intermediate":
            for i in _split(r.state_indices):
                out[f"intermediate_z{i}"] = view(
                    gradient="intermediate",
                    state_index=int(i),
                    attack_steps=r.attack_steps,
                    attack_damping=r.attack_damping,
                )
        else:
            out[g] = view(gradient=g, attack_steps=r.attack_steps, attack_damping=r.attack_damping)
    if entropy_cfg is not None and entropy_cfg.enabled:
        return entropy_views(spec, state, entropy_cfg, out)
    return out


def write_markdown(report: dict, path: str) -> str:
    eps = report["eps"]
    labels = list(report["robust_accuracy"][str(eps[0])])
    lines = [
        f"Clean accuracy: **{report['clean_accuracy']:.4f}** "
        f"on {report['n_examples']} test examples; "
        f"norm {report['norm']}.",
        "",
        "| attack / gradient view | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
        "| --- | " + " | ".join("---" for _ in eps) + " |",
    ]
    for lab in labels:
        lines.append(
            f"| {lab} | "
            + " | ".join(f"{report['robust_accuracy'][str(e)][lab]:.3f}" for e in eps)
            + " |"
        )
    lines.append(
        "| **worst case** | "
        + " | ".join(f"**{report['worst_case'][str(e)]:.3f}**" for e in eps)
        + " |"
    )
    for key in sorted(k for k in report if k.startswith("certified_accuracy")):
        suffix = key[len("certified_accuracy") :].strip("_")
        lines.append(
            f"| certified{f' ({suffix})' if suffix else ''} | "
            + " | ".join(f"{report[key][str(e)]:.3f}" for e in eps)
            + " |"
        )
    lines += ["", "Sanity flags (True = evaluation looks unreliable):", ""]
    for k, v in report["sanity"]["flags"].items():
        lines.append(f"- `{k}`: {v} — {report['sanity']['explanations'].get(k, '')}")
    scope = f" ({report['solver_scope']})" if "solver_scope" in report else ""
    for k, v in report.get("solver", {}).items():
        lines.append(f"- solver{scope} `{k}`: {v:.4g}")
    text = "\n".join(lines) + "\n"
    common.write_text(path, text)
    return text


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = report["eps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab in report["robust_accuracy"][str(eps[0])]:
        ax.plot(
            eps,
            [report["robust_accuracy"][str(e)][lab] for e in eps],
            marker=".",
            lw=1,
            alpha=0.7,
            label=lab,
        )
    ax.plot(
        eps,
        [report["worst_case"][str(e)] for e in eps],
        "k-",
        lw=2.5,
        marker="o",
        label="worst case",
    )
    if "certified_accuracy" in report:
        ax.plot(
            eps, [report["certified_accuracy"][str(e)] for e in eps], "g--", lw=2, label="certified"
        )
    ax.set_xlabel(f"ε ({report['norm']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"clean {report['clean_accuracy']:.3f}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    import io

    from etils import epath

    buf = io.BytesIO()  # through epath: the workdir may be gs://…
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    epath.Path(path).write_bytes(buf.getvalue())


def evaluate(workdir: str, overrides: dict | None = None, quiet: bool = False) -> dict:
    config, spec, state, ds = load_run(workdir)
    mesh, _ = parallel.mesh_from_config(config)
    main = parallel.is_main_process()
    quiet = quiet or not main
    r = ml_collections.ConfigDict(config.robustness.to_dict())
    for k, v in (overrides or {}).items():
        if k not in r:
            raise ValueError(f"unknown robustness option {k!r}; choose from {sorted(r.keys())}")
        r[k] = type(r[k])(v) if not isinstance(r[k], str) else str(v)
    n = min(int(r.n_examples), len(ds.test_images))
    x, y = ds.test_images[:n], ds.test_labels[:n]
    data_lib.validate_images(x, "test images")
    data_lib.validate_labels(y, ds.num_classes, "test labels")
    eps = [float(e) for e in _split(r.eps)]
    from tqdm import tqdm

    bar = tqdm(total=None, disable=quiet, file=sys.stderr, desc="robustness", unit="attack run")

    def progress(description, done, total):
        bar.total = total
        bar.set_description(description)
        bar.n = done
        bar.refresh()

    entropy_cfg = config.get("entropy_reduction")
    report = evaluate_robustness(
        gradient_views(spec, state, r, entropy_cfg),
        x,
        y,
        jax.random.PRNGKey(r.seed),
        eps_list=eps,
        norm=r.norm,
        attacks=_split(r.attacks),
        n_iter=r.n_iter,
        n_queries=r.n_queries,
        restarts=r.restarts,
        batch_size=r.batch_size,
        progress=progress,
        mesh=mesh,
    )
    bar.n = bar.total or 0
    bar.close()
    report["model"] = config.model.name
    report["settings"] = {k: r[k] for k in REPORT_KEYS if k in r}
    for hook in spec.report_hooks:
        report.update(hook(spec, state, x, y, eps, r))
    if spec.is_deq:

        @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
        def solver_stats(variables, xb):
            _, stats = spec.module.apply(variables, xb, **spec.eval_kwargs)
            return [jnp.mean(stats.steps), jnp.mean(stats.rel_residual), jnp.mean(stats.converged)]

        steps, res, conv = solver_stats(
            {"params": state.params, **state.model_state}, x[: r.batch_size]
        )
        report["solver"] = {
            "mean_steps": float(steps),
            "mean_rel_residual": float(res),
            "converged_fraction": float(conv),
        }
        if entropy_cfg is not None and entropy_cfg.enabled:  # the defence's solves are not these
            report["solver_scope"] = (
                f"undefended forward; the entropy defence re-solves in "
                f"{int(entropy_cfg.rounds)} rounds of {int(entropy_cfg.round_steps)} steps"
            )
    if not main:  # process 0 writes the files
        return report
    common.write_text(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
    text = write_markdown(report, os.path.join(workdir, "report.md"))
    plot(report, os.path.join(workdir, "robustness.png"))
    if not quiet:
        print(text, flush=True)
    return report


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    overrides = {k: getattr(f, k) for k in REPORT_KEYS if getattr(f, k) is not None}
    evaluate(f.workdir, overrides)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "a training workdir")
    for key in REPORT_KEYS:
        flags.DEFINE_string(key, None, f"override robustness.{key}")
    flags.mark_flags_as_required(["workdir"])
    from experiments import cli

    cli.define_distributed_flags(flags)
    app.run(cli.with_distributed(main))
