r"""Gradient-obfuscation sweep of a trained DEQ (SPEC §3, seed 001).

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

import dataclasses
import itertools
import json
import os

import jax

from deqjax.robustness import evaluate_robustness
from experiments import common
from experiments.evaluate import _split, load_run

NAIVE = "implicit"
WHOLE_PATH_VIEWS = ("implicit", "phantom", "unroll", "ensemble", "simultaneous_adjoint")


def sweep_views(
    spec, state, eval_max_iter: int, state_indices, attack_steps, attack_damping
) -> dict:
    """``{view name: logits_fn}`` for one evaluation solver budget."""
    variables = {"params": state.params, **state.model_state}
    cfg = spec.eval_kwargs["config"]
    cfg = dataclasses.replace(
        cfg, forward=dataclasses.replace(cfg.forward, max_iter=int(eval_max_iter))
    )
    kwargs = {**spec.eval_kwargs, "config": cfg}

    def view(**kw):
        return lambda x: spec.module.apply(variables, x, **kwargs, **kw)[0]

    views = {
        g: view(
            gradient=g, attack_steps=int(attack_steps[0]), attack_damping=float(attack_damping[0])
        )
        for g in WHOLE_PATH_VIEWS
    }
    for i, k, lam in itertools.product(state_indices, attack_steps, attack_damping):
        i = min(int(i), int(eval_max_iter) - 1)  # trajectory rows 0 … budget − 1
        views[f"z{i}_K{k}_lam{lam}"] = view(
            gradient="intermediate", state_index=i, attack_steps=int(k), attack_damping=float(lam)
        )
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
    config, spec, state, ds = load_run(workdir)
    if not spec.is_deq:
        raise ValueError(f"{workdir} holds a {config.model.name!r} model: the sweep needs a DEQ")
    budgets = [int(b) for b in _split(eval_max_iter)] or [int(config.deq.eval_max_iter)]
    eps_list = [float(e) for e in _split(eps)]
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
            spec, state, budget, _split(state_indices), _split(attack_steps), _split(attack_damping)
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
    from absl import flags

    del argv
    f = flags.FLAGS
    obfuscation_sweep(
        f.workdir,
        eps=f.eps,
        state_indices=f.state_indices,
        attack_steps=f.attack_steps,
        attack_damping=f.attack_damping,
        eval_max_iter=f.eval_max_iter,
        n_examples=f.n_examples,
        n_iter=f.n_iter,
        seed=f.seed,
    )


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "a training workdir of a DEQ model")
    flags.DEFINE_string("eps", "0.1,0.2,0.3", "L∞ radii")
    flags.DEFINE_string("state_indices", "1,2,4,8", "intermediate states attacked")
    flags.DEFINE_string("attack_steps", "5", "K_a values (unrolled steps after z_i)")
    flags.DEFINE_string("attack_damping", "0.5", "λ values")
    flags.DEFINE_string("eval_max_iter", "", "evaluation solver budgets (default: the config's)")
    flags.DEFINE_integer("n_examples", 100, "test examples")
    flags.DEFINE_integer("n_iter", 10, "PGD steps")
    flags.DEFINE_integer("seed", 0, "PRNG seed")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
