r"""Does a trained DEQ's evaluation forward converge? Solver statistics per budget.

    python -m experiments.convergence --workdir runs/deq_mnist [--budgets=40,60,100]

For each evaluation budget (``deq.eval_max_iter``; the config's own when ``--budgets``
is not given) the model's evaluation forward runs on the whole test split and reports
the mean number of solver steps, the mean relative residual and the fraction of test
images whose solve reached the tolerance (the quantity behind the report's
``forward_not_converged`` flag). Writes ``WORKDIR/convergence.json``. A workdir of
``train.seeds = K > 1`` gets one entry per seed under ``seeds`` (the top level is seed 0's).
"""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import cli, common, models, parallel, report
from experiments.spec import split_list
from experiments.workdir import load_seed_runs


def convergence(workdir: str, budgets=None, batch_size: int = 250) -> dict:
    """``{budget: {mean_steps, mean_rel_residual, converged_fraction}}`` of the
    workdir's DEQ over its test split, one entry per evaluation budget (and, for a
    multi-seed workdir, ``seeds``: each seed's, with its ``seed``)."""
    runs = load_seed_runs(workdir)
    per_seed = [_convergence(r, budgets, batch_size) for r in runs]
    out = dict(per_seed[0])
    if len(runs) > 1:
        out["seeds"] = [
            {"seed": int(r.config.seed), **o} for r, o in zip(runs, per_seed, strict=True)
        ]
    return out


def _convergence(run, budgets, batch_size: int) -> dict:
    workdir = run.workdir
    if not run.spec.is_deq:
        raise ValueError(f"{workdir} holds a {run.config.model.name!r} model, not a DEQ")
    own = int(run.config.deq.eval_max_iter)
    budgets = [own] if not budgets else [int(b) for b in split_list(budgets)]
    if any(b < 1 for b in budgets):
        raise ValueError(f"budgets must be >= 1 solver steps, got {budgets}")
    mesh, _ = parallel.mesh_from_config(run.config)
    x = np.asarray(run.dataset.test_images)
    out = {"n_examples": len(x), "tol": float(run.config.deq.tol), "budgets": {}}
    for b in budgets:
        config = run.config.copy_and_resolve_references()
        config.deq.eval_max_iter = b
        spec = models.build(config, run.dataset.num_classes)
        stats = report.solver_statistics(run._replace(spec=spec), x, batch_size, mesh)
        out["budgets"][str(b)] = {k: float(v) for k, v in stats.items()}
    return out


def main(argv):
    del argv
    workdir = cli.flag("workdir")
    out = convergence(workdir, cli.flag("budgets"))
    if parallel.is_main_process():
        common.write_text(os.path.join(workdir, "convergence.json"), json.dumps(out, indent=1))
        for one in out.get("seeds", [out]):
            who = f"seed {one['seed']}, " if "seed" in one else ""
            for b, s in one["budgets"].items():
                print(
                    f"{who}budget {b}: converged {s['converged_fraction']:.3f}, "
                    f"mean steps {s['mean_steps']:.1f}, mean rel. residual "
                    f"{s['mean_rel_residual']:.2e} ({one['n_examples']} test images)"
                )


if __name__ == "__main__":
    cli.run_workdir(
        main,
        "a training workdir of a DEQ",
        lambda flags: flags.DEFINE_string("budgets", None, "evaluation budgets, e.g. 40,60"),
    )
