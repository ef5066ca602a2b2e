r"""Gradient-obfuscation sweep of a trained DEQ (docs/methods/deq_attacks.md).

    python -m experiments.obfuscation --workdir runs/deq_mnist_trades \
        [--eps=0.1,0.2,0.3] [--state_indices=1,2,4,8] [--attack_steps=2,5] \
        [--attack_damping=0.5,1.0] [--eval_max_iter=12,40] [--n_examples=100] [--n_iter=10]

The same PGD (L∞, random start, ``n_iter`` steps of 2.5·ε/n_iter) follows every DEQ gradient
path — the naive implicit gradient, phantom, unroll, the ensemble of states, the
simultaneous adjoint and every intermediate state z_i unrolled K_a steps with damping λ
— and every adversarial example is scored on the model's own forward solve. Repeated for
each evaluation solver budget (``eval_max_iter``): the papers' obfuscation appears when
the forward solve and the implicit backward disagree, which a short budget provokes.

Writes ``WORKDIR/obfuscation.json`` and ``WORKDIR/obfuscation.md``: robust accuracy per
view and ε, and for each budget the gap ``naive − strongest intermediate state`` (positive:
the naive attack overestimates robustness).
"""

from __future__ import annotations

import itertools
import json
import os

import jax

from deqjax.robustness import evaluate_robustness
from experiments import cli, common, parallel
from experiments.spec import split_list
from experiments.views import deq_views
from experiments.workdir import load_run

NAIVE = "implicit"
WHOLE_PATH_VIEWS = ("implicit", "phantom", "unroll", "ensemble", "simultaneous_adjoint")


def sweep_views(
    spec, state, eval_max_iter: int, state_indices, attack_steps, attack_damping
) -> dict:
    """``{view name: logits_fn}`` for one evaluation solver budget: every whole-path
    view, and ``z{i}_K{k}_lam{λ}`` for every intermediate state, K_a and λ."""
    cfg = spec.eval_kwargs["config"].with_forward(max_iter=int(eval_max_iter))
    k0, lam0 = int(attack_steps[0]), float(attack_damping[0])
    views = deq_views(
        spec, state, WHOLE_PATH_VIEWS, attack_steps=k0, attack_damping=lam0, config=cfg
    )
    for i, k, lam in itertools.product(state_indices, attack_steps, attack_damping):
        i = min(int(i), int(eval_max_iter) - 1)  # trajectory rows 0 … budget − 1
        (view,) = deq_views(
            spec,
            state,
            ["intermediate"],
            state_indices=[i],
            attack_steps=int(k),
            attack_damping=float(lam),
            config=cfg,
        ).values()
        views[f"z{i}_K{k}_lam{lam}"] = view
    return views


def obfuscation_sweep(
    workdir: str,
    *,
    eps="0.1,0.2,0.3",
    state_indices="1,2,4,8",
    attack_steps="5",
    attack_damping="0.5",
    eval_max_iter="",
    n_examples=100,
    n_iter=10,
    seed=0,
    batch_size=100,
    quiet=False,
) -> dict:
    config, spec, state, ds, _ = load_run(workdir)
    mesh, _ = parallel.mesh_from_config(config)
    if not spec.is_deq:
        raise ValueError(f"{workdir} holds a {config.model.name!r} model: the sweep needs a DEQ")
    budgets = [int(b) for b in split_list(eval_max_iter)] or [int(config.deq.eval_max_iter)]
    eps_list = [float(e) for e in split_list(eps)]
    x, y = ds.test_images[: int(n_examples)], ds.test_labels[: int(n_examples)]
    out = {
        "workdir": workdir,
        "eps": eps_list,
        "n_examples": int(len(x)),
        "n_iter": int(n_iter),
        "attack": "pgd linf",
        "budgets": {},
    }
    for budget in budgets:
        views = sweep_views(
            spec,
            state,
            budget,
            split_list(state_indices),
            split_list(attack_steps),
            split_list(attack_damping),
        )
        rep = evaluate_robustness(
            views,
            x,
            y,
            jax.random.PRNGKey(seed),
            eps_list=eps_list,
            norm="linf",
            attacks=["pgd"],
            n_iter=int(n_iter),
            restarts=1,
            batch_size=int(batch_size),
            mesh=mesh,
        )
        acc = {
            str(e): {k.removeprefix("pgd/"): v for k, v in rep["robust_accuracy"][str(e)].items()}
            for e in eps_list
        }
        gap = {}
        for e in eps_list:
            inter = {k: v for k, v in acc[str(e)].items() if k.startswith("z")}
            best = min(inter, key=inter.get)
            gap[str(e)] = {
                "naive": acc[str(e)][NAIVE],
                "strongest_intermediate": best,
                "strongest_intermediate_accuracy": inter[best],
                "naive_minus_intermediate": acc[str(e)][NAIVE] - inter[best],
            }
        out["budgets"][str(budget)] = {
            "clean_accuracy": rep["clean_accuracy"],
            "robust_accuracy": acc,
            "gap": gap,
            "sanity": rep["sanity"]["flags"],
        }
        if not quiet:
            print(
                f"eval_max_iter={budget}: clean {rep['clean_accuracy']:.3f}; "
                + "; ".join(
                    f"ε={e}: naive {g['naive']:.3f} vs {g['strongest_intermediate']} "
                    f"{g['strongest_intermediate_accuracy']:.3f}"
                    for e, g in gap.items()
                ),
                flush=True,
            )
    common.write_text(os.path.join(workdir, "obfuscation.json"), json.dumps(out, indent=2))
    common.write_text(os.path.join(workdir, "obfuscation.md"), to_markdown(out))
    return out


def to_markdown(out: dict) -> str:
    eps = out["eps"]
    lines = [
        f"PGD-{out['n_iter']} (L∞) on {out['n_examples']} "
        "test examples, robust accuracy per gradient view.",
        "",
    ]
    for budget, b in out["budgets"].items():
        lines += [
            f"**Evaluation solve: {budget} steps** (clean accuracy {b['clean_accuracy']:.3f})",
            "",
            "| gradient view | " + " | ".join(f"ε={e:g}" for e in eps) + " |",
            "| --- | " + " | ".join("---" for _ in eps) + " |",
        ]
        for view in b["robust_accuracy"][str(eps[0])]:
            lines.append(
                f"| {view} | "
                + " | ".join(f"{b['robust_accuracy'][str(e)][view]:.3f}" for e in eps)
                + " |"
            )
        lines.append(
            "| **naive − strongest z_i** | "
            + " | ".join(f"**{b['gap'][str(e)]['naive_minus_intermediate']:+.3f}**" for e in eps)
            + " |"
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    obfuscation_sweep(
        cli.flag("workdir"),
        eps=cli.flag("eps"),
        state_indices=cli.flag("state_indices"),
        attack_steps=cli.flag("attack_steps"),
        attack_damping=cli.flag("attack_damping"),
        eval_max_iter=cli.flag("eval_max_iter"),
        n_examples=cli.flag("n_examples"),
        n_iter=cli.flag("n_iter"),
        seed=cli.flag("seed"),
    )


def _flags(flags):
    flags.DEFINE_string("eps", "0.1,0.2,0.3", "L∞ radii")
    flags.DEFINE_string("state_indices", "1,2,4,8", "intermediate states attacked")
    flags.DEFINE_string("attack_steps", "5", "K_a values (unrolled steps after z_i)")
    flags.DEFINE_string("attack_damping", "0.5", "λ values")
    flags.DEFINE_string("eval_max_iter", "", "evaluation solver budgets (default: the config's)")
    flags.DEFINE_integer("n_examples", 100, "test examples")
    flags.DEFINE_integer("n_iter", 10, "PGD steps")
    flags.DEFINE_integer("seed", 0, "PRNG seed")


if __name__ == "__main__":
    cli.run_workdir(main, "a training workdir of a DEQ model", _flags)
