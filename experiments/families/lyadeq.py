"""LyaDEQ (SPEC §2): the MDEQ feature extractor and cell, made Lyapunov-stable by the
projected dynamics, then an orthogonal layer and the classifier. Its report gets the
stability check (equilibria reached from perturbed initial states)."""

from __future__ import annotations

import jax
import numpy as np

from deqjax.models.lyadeq import LyaDEQClassifier, lyadeq_stability_check
from experiments.spec import ModelSpec, deq_config


def stability_hook(spec, state, x, y, eps_list, r):
    variables = {"params": state.params, **state.model_state}
    n = min(len(x), 16)
    _, rep = jax.jit(
        lambda xb, k: lyadeq_stability_check(spec.module, variables, xb, k, n_perturb=16, scale=0.1)
    )(x[:n], jax.random.PRNGKey(0))
    return {
        "stability": {
            "n_examples": n,
            "n_perturb": 16,
            "scale": 0.1,
            "max_distance": float(np.max(rep.max_distance)),
            "mean_distance": float(np.mean(rep.mean_distance)),
            "max_relative": float(np.max(rep.max_relative)),
            "fraction_converged": float(np.mean(rep.fraction_converged)),
            "mean_initial_distance": float(np.mean(rep.initial_distance)),
        }
    }


def build(config, num_classes: int) -> ModelSpec:
    """The ``lyadeq`` family: :class:`LyaDEQClassifier` with the stability report section."""
    m, ly = config.model, config.lyapunov
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
        deq=deq_config(config.deq),
    )
    return ModelSpec(
        module,
        is_deq=True,
        eval_kwargs={"config": deq_config(config.deq, evaluation=True)},
        report_hooks=(stability_hook,),
    )
