r"""Robustness report of a trained model.

    python -m experiments.evaluate --workdir runs/deq_mnist [--eps=0.1,0.3] [--norm=l2]
        [--attacks=pgd,apgd-ce,apgd-t,fab-t,square] [--n_examples=500]
        [--gradients=implicit,unroll,phantom] [--protocols=bpda,transfer]

Loads ``WORKDIR/config.json`` and the latest checkpoint, and writes
``WORKDIR/report.json``, ``WORKDIR/report.md`` and ``WORKDIR/robustness.png``
(accuracy against ε: one line per attack/gradient view, and the worst case).
Flags override the config's ``robustness`` block. The attacked views are those of
:func:`experiments.views.model_views`; the report is :func:`experiments.report.score`.
"""

from __future__ import annotations

import os

from experiments import cli, parallel, report
from experiments.views import has_input_defence, model_views
from experiments.workdir import load_run


def evaluate(workdir: str, overrides: dict | None = None, quiet: bool = False) -> dict:
    """Score the workdir's model (every attack through every view, worst case per ε),
    write ``report.{json,md}`` and ``robustness.png``, and return the report."""
    run = load_run(workdir)
    config = run.config
    mesh, _ = parallel.mesh_from_config(config)
    main = parallel.is_main_process()
    quiet = quiet or not main
    r = report.robustness_options(config, overrides)
    x, y = report.test_examples(run, r)
    models = model_views(run, r)
    label = config.model.name if config.model.name in models else next(iter(models))
    scope = None
    if has_input_defence(run):  # the defence's solves are not these
        er = config.entropy_reduction
        scope = (
            f"undefended forward; the entropy defence re-solves in {int(er.rounds)} rounds "
            f"of {int(er.round_steps)} steps"
        )
    progress, close = report.progress_bar(quiet)
    rep = report.score(
        run,
        models[label],
        r,
        x,
        y,
        norm=r.norm,
        eps_list=[float(e) for e in report.split_list(r.eps)],
        mesh=mesh,
        progress=progress,
        solver_scope=scope,
    )
    close()
    if not main:  # process 0 writes the files
        return rep
    text = report.write(
        rep, os.path.join(workdir, "report"), png=os.path.join(workdir, "robustness.png")
    )
    if not quiet:
        print(text, flush=True)
    return rep


def main(argv):
    del argv
    evaluate(cli.flag("workdir"), cli.report_overrides())


if __name__ == "__main__":
    cli.run_report(main, "a training workdir")
