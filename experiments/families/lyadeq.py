"""LyaDEQ (Chu et al. 2024): the MDEQ injection and cell, made Lyapunov-stable by the projected
dynamics and run as a finite-time system (K steps ``z ← z + h F̂(z)`` from 0), then an
orthogonal layer and the classifier.

K = ``lyapunov.steps`` and h = ``lyapunov.step_size`` define the model; the ``deq``
block must describe the same K steps (``solver=fixed_point``, ``max_iter`` =
``eval_max_iter`` = K, ``tol=0``, ``damping`` = h: the lyadeq configs tie these keys to
the two ``lyapunov`` ones) — checked here, so training and test run the same model.

The report of a LyaDEQ gets a ``stability`` section (``V`` along the trajectory: the
fraction of steps that increase it; the spread of ``z_K`` over perturbed starts) and a
``gradient_norms`` section (the loss gradient reaching the ICNN next to the cell's, and
how far each ICNN parameter moved from its initialisation).

``python -m experiments.families.lyadeq --out docs/results/lyadeq_vs_deq.png NAME=WORKDIR ...``
draws the comparison plot of docs/results/lyadeq.md
(worst case and naive view against ε) from reports; ``python -m experiments.compare``
gives the same models' exact intervals and paired tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deqjax.models.lyadeq import LyaDEQClassifier, lyadeq_stability_check
from experiments.spec import ModelSpec


def check_finite_time(config) -> None:
    """The ``deq`` block must be the K-step model of the ``lyapunov`` block."""
    ly, dq = config.lyapunov, config.deq
    k, h = int(ly.steps), float(ly.step_size)
    need = {
        "solver": "fixed_point",
        "max_iter": k,
        "eval_max_iter": k,
        "tol": 0.0,
        "damping": h,
        "random_states_max": 0,
    }
    bad = {key: dq[key] for key, v in need.items() if dq[key] != v}
    if bad:
        raise ValueError(
            f"a LyaDEQ is the finite-time system of lyapunov.steps = {k} steps of size "
            f"lyapunov.step_size = {h}, the same in training and at test time; "
            f"the deq block disagrees: {bad}, need { ({key: need[key] for key in bad}) }. "
            "Change lyapunov.steps / lyapunov.step_size (the lyadeq configs tie the deq "
            "keys to them)"
        )


def _tree_norm(tree) -> float:
    return float(optax.global_norm(tree))


def gradient_hook(spec, state, x, y, eps_list, r, *, seed):
    """Norms of the clean cross-entropy gradient (the model's own backward) on the first
    ``robustness.batch_size`` test images, per parameter group, and the relative distance
    of the ICNN from its initialisation (and the smallest per-leaf largest change: did
    every ICNN parameter move)."""
    n = min(len(x), int(r.batch_size))
    model_state = state.model_state

    def loss(params):
        logits = spec.module.apply({"params": params, **model_state}, x[:n])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[:n]).mean()

    g = jax.jit(jax.grad(loss))(state.params)
    cell = g["equilibrium"]["cell"]
    init_key = jax.random.split(jax.random.PRNGKey(seed))[0]  # as experiments.common.init_state
    init = spec.module.init(init_key, jnp.zeros((2,) + x.shape[1:], jnp.float32))["params"]
    icnn, icnn0 = state.params["equilibrium"]["cell"]["icnn"], init["equilibrium"]["cell"]["icnn"]
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(icnn), jax.tree.leaves(icnn0))
    ]
    change = jax.tree.map(jnp.subtract, icnn, icnn0)
    leaf_grads = [float(jnp.linalg.norm(v)) for v in jax.tree.leaves(cell["icnn"])]
    return {
        "gradient_norms": {
            "n_examples": n,
            "backward": spec.module.backward,
            "icnn": _tree_norm(cell["icnn"]),
            "icnn_min_leaf": min(leaf_grads),
            "base_cell": _tree_norm(cell["base_cell"]),
            "injection": _tree_norm(g["injection"]),
            "head": _tree_norm(g["head"]),
            "icnn_relative_change_from_init": _tree_norm(change) / _tree_norm(icnn0),
            "icnn_min_leaf_max_abs_change": min(moved),
        }
    }


def stability_hook(spec, state, x, y, eps_list, r, *, n_spread=16, n_perturb=16, scale=0.1):
    """V along the model's trajectory on the first ``robustness.batch_size`` test images
    (fraction of steps that increase it; how often and how much the projection changes
    ``F``; where the ICNN term of V is alive), and the spread of ``z_K`` over
    ``n_perturb`` starts ``z₀ = δ`` on ``n_spread`` of them."""
    variables = {"params": state.params, **state.model_state}
    n = min(len(x), int(r.batch_size))
    run = jax.jit(
        lambda xb, k, m: lyadeq_stability_check(spec.module, variables, xb, k, m, scale),
        static_argnums=2,
    )
    st = run(x[:n], jax.random.PRNGKey(0), 1)
    m = min(n, n_spread)
    sp = run(x[:m], jax.random.PRNGKey(1), n_perturb)
    inc, corr = np.asarray(st.v_increases), np.asarray(st.corrections)
    rep = sp.spread
    return {
        "stability": {
            "steps": int(spec.module.steps),
            "step_size": float(spec.module.step_size),
            "n_examples": n,
            "fraction_v_increases": float(inc.mean()),
            "fraction_v_increases_after_first_step": float(inc[:, 1:].mean())
            if inc.shape[1] > 1
            else 0.0,
            "mean_v_per_step": [float(v) for v in np.asarray(st.v_values).mean(0)],
            "fraction_projection_active": float((corr > 0).mean()),
            "mean_relative_correction": float(corr.mean()),
            "fraction_icnn_term_alive": float(np.asarray(st.icnn_active).mean()),
            "spread": {
                "n_examples": m,
                "n_perturb": n_perturb,
                "scale": scale,
                "mean_initial_distance": float(np.mean(rep.initial_distance)),
                "mean_distance": float(np.mean(rep.mean_distance)),
                "max_distance": float(np.max(rep.max_distance)),
                "max_relative": float(np.max(rep.max_relative)),
                "mean_contraction": float(np.mean(rep.contraction)),
                "fraction_prediction_changed": float(np.mean(sp.changed_prediction)),
            },
        }
    }


def build(config, num_classes: int) -> ModelSpec:
    """The ``lyadeq`` family: :class:`LyaDEQClassifier` (the finite-time system
    of docs/methods/lyadeq.md)
    with the stability and gradient-norm report sections."""
    check_finite_time(config)
    m, ly, dq = config.model, config.lyapunov, config.deq
    module = LyaDEQClassifier(
        num_classes=num_classes,
        width=m.width,
        inner=m.inner,
        groups=m.groups,
        head_kind=m.head,
        icnn_widths=tuple(int(w) for w in str(ly.icnn_widths).split(",")),
        alpha=ly.alpha,
        eta=ly.eta,
        d=ly.d,
        orthogonal=ly.orthogonal,
        orthogonal_kind=ly.orthogonal_kind,
        orth_features=ly.orth_features,
        steps=int(ly.steps),
        step_size=float(ly.step_size),
        backward=dq.backward,
        phantom_steps=int(dq.phantom_steps),
    )
    return ModelSpec(
        module,
        is_deq=True,
        eval_kwargs={"config": module.deq},
        report_hooks=(stability_hook, functools.partial(gradient_hook, seed=int(config.seed))),
    )


# --- the docs' comparison: table and plot from reports ------------------------------


def _naive(report) -> str:
    """The careless attack: PGD (else the first attack) through the gradient an attack
    gets by default — ``implicit`` for a DEQ, the model's own backward (its first view,
    ``unroll``) for a LyaDEQ."""
    attack = "pgd" if "pgd" in report["attacks"] else report["attacks"][0]
    view = "implicit" if "implicit" in report["views"] else report["views"][0]
    return f"{attack}/{view}"


def comparison_table(named) -> str:
    """Markdown: per model the clean accuracy and, per ε, the naive attack (:func:`_naive`)
    / the worst case over every attack and view. ``named``: ``[(label, report)]``."""
    eps = named[0][1]["eps"]
    lines = [
        "| model | clean | " + " | ".join(f"ε={e:g} naive / worst" for e in eps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in eps) + " |",
    ]
    for name, rep in named:
        acc, worst, naive = rep["robust_accuracy"], rep["worst_case"], _naive(rep)
        cells = [f"{acc[str(e)][naive]:.2f} / **{worst[str(e)]:.2f}**" for e in eps]
        lines.append(f"| {name} | {rep['clean_accuracy']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_plot(named, path: str) -> None:
    """Accuracy against ε: worst case (solid) and the naive attack (dashed) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rep in named:
        eps, naive_label = [0.0] + rep["eps"], _naive(rep)
        clean = [rep["clean_accuracy"]]
        worst = clean + [rep["worst_case"][str(e)] for e in rep["eps"]]
        naive = clean + [rep["robust_accuracy"][str(e)][naive_label] for e in rep["eps"]]
        (line,) = ax.plot(eps, worst, "-o", lw=2, label=f"{name}: worst case")
        ax.plot(
            eps, naive, "--", color=line.get_color(), lw=1, label=f"{name}: naive ({naive_label})"
        )
    ax.set_xlabel("ε (L∞)")
    ax.set_ylabel("accuracy, first 100 test images")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    """Print :func:`comparison_table` and, when the reports hold per-example outcomes, the
    exact intervals and paired tests of ``python -m experiments.compare``; draw
    :func:`comparison_plot`."""
    import argparse

    from experiments import compare

    p = argparse.ArgumentParser(description="LyaDEQ vs DEQ table and plot from reports")
    p.add_argument("--out", required=True, help="the plot (.png)")
    p.add_argument("runs", nargs="+", help="LABEL=WORKDIR (with a report.json)")
    args = p.parse_args(argv)
    runs = compare.parse_runs(args.runs)
    named = [(label, compare.load_report(w, require_outcomes=False)) for label, w in runs.items()]
    print(comparison_table(named))
    if all("outcomes" in rep for _, rep in named):
        print("\n" + compare.markdown(compare.compare_reports(dict(named))), end="")
    comparison_plot(named, args.out)


if __name__ == "__main__":
    main()
