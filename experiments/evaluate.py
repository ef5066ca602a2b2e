r"""Robustness report of a trained model.

    python -m experiments.evaluate --workdir runs/deq_mnist [--eps=0.1,0.3] [--norm=l2]
        [--attacks=pgd,apgd-ce,apgd-t,fab-t,square] [--n_examples=500]
        [--gradients=implicit,unroll,phantom] [--protocols=bpda,transfer]

Loads ``WORKDIR/config.json`` and the latest checkpoint, and writes
``WORKDIR/report.json``, ``WORKDIR/report.md`` and ``WORKDIR/robustness.png``
(accuracy against ε: one line per attack/gradient view, and the worst case).
Flags override the config's ``robustness`` block. The attacked views are those of
:func:`experiments.views.model_views`; the report is :func:`experiments.report.score`.

Every accuracy carries its ``n`` and exact 95% interval, and ``outcomes`` holds the
per-example results (``python -m experiments.compare`` tests two reports on the same
images). With ``--compact=true`` (the default) an example broken at an ε is not attacked
again at that ε. Each finished attack run (ε × attack/view) is saved under
``WORKDIR/report_state/``: a report killed or preempted (SIGTERM: it stops after the
current run) resumes from them when the same command runs again; they are removed once
the report is written.
"""

from __future__ import annotations

import itertools
import os

from deqjax.robustness import EvaluationStopped
from experiments import cli, parallel, report
from experiments.views import has_input_defence, model_views
from experiments.workdir import load_seed_runs


def evaluate(workdir: str, overrides: dict | None = None, quiet: bool = False) -> dict | None:
    """Score the workdir's model (every attack through every view, worst case per ε),
    write ``report.{json,md}`` and ``robustness.png``, and return the report; None when
    a SIGTERM stopped it (the finished runs are saved: the same call resumes).

    A workdir trained with ``train.seeds = K > 1`` is scored once per seed on the same
    images: the report's top level is seed 0's (what tools reading one model see),
    ``seeds`` lists every seed's report (with its ``seed``) and ``across_seeds`` the mean
    and sd over seeds of each accuracy (:func:`experiments.report.seed_summary`)."""
    runs = load_seed_runs(workdir)
    config = runs[0].config
    mesh, _ = parallel.mesh_from_config(config)
    main = parallel.is_main_process()
    quiet = quiet or not main
    r = report.robustness_options(config, overrides)
    x, y = report.test_examples(runs[0], r)
    scope = None
    if has_input_defence(runs[0]):  # the defence's solves are not these
        er = config.entropy_reduction
        scope = (
            f"undefended forward; the entropy defence re-solves in {int(er.rounds)} rounds "
            f"of {int(er.round_steps)} steps"
        )
    runs_done = itertools.count(1)  # the step a multi-process preemption agrees on
    reports, stores = [], []
    for i, run in enumerate(runs):
        models = model_views(run, r)
        label = config.model.name if config.model.name in models else next(iter(models))
        store = report.RunStore(
            report.state_directory(workdir, "report", run, r, x, y, model=label, seed=i),
            write=main,
        )
        stores.append(store)
        resumed = store.count()
        if resumed and not quiet:
            print(f"resuming: {resumed} attack runs already done ({store.directory})", flush=True)
        if len(runs) > 1 and not quiet:
            print(f"seed {run.config.seed} ({i + 1} of {len(runs)})", flush=True)
        progress, close = report.progress_bar(quiet)
        try:
            with parallel.PreemptionGuard() as guard:
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
                    store=store,
                    stop=lambda guard=guard: guard.reached(next(runs_done)),
                )
        except EvaluationStopped as stopped:
            close()
            print(f"SIGTERM: {stopped}; saved in {store.directory}; rerun to resume", flush=True)
            return None
        close()
        reports.append(rep)
    rep = reports[0]
    if len(runs) > 1:
        rep = dict(rep)
        rep["seeds"] = [
            {"seed": int(run.config.seed), **one} for run, one in zip(runs, reports, strict=True)
        ]
        rep["across_seeds"] = report.seed_summary(reports)
    if not main:  # process 0 writes the files
        return rep
    text = report.write(
        rep, os.path.join(workdir, "report"), png=os.path.join(workdir, "robustness.png")
    )
    for store in stores:
        store.clear()
    if not quiet:
        print(text, flush=True)
    return rep


def main(argv):
    del argv
    evaluate(cli.flag("workdir"), cli.report_overrides())


if __name__ == "__main__":
    cli.run_report(main, "a training workdir")
