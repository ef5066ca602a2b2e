"""The ``mondeq`` model family: monotone operator equilibrium networks (Winston & Kolter
2020) with the provable ℓ2 certificate of Pabbaraju, Winston & Kolter (2021) in the
robustness report (docs/methods/mondeq.md).

The model is :class:`deqjax.mondeq.MonDEQClassifier`: a DEQ whose cell is one
forward–backward or Peaceman–Rachford step (``model.splitting``, step ``model.alpha``),
solved by the ``deq`` block's solver (``fixed_point`` with damping 1: the plain
splitting) and differentiated by its backward (``implicit``). The report is a DEQ's
(attacks through the ``robustness.gradients`` views, solver statistics) plus a
certificate section like the ``cpl`` family's: ``certified_accuracy`` at the report's
radii from :func:`deqjax.mondeq.certify` (CPL's margin certificate with the Lipschitz
bound ``‖W_out‖₂‖U‖₂/m``, both norms Gram-iteration upper bounds, minus the solver's
slack), the bound and its parts, and whether the forward–backward step satisfies its
convergence condition at the trained parameters.

``python -m experiments.mondeq_table NAME=WORKDIR ...`` prints the docs' comparison table
from trained workdirs of this family and of ``cpl``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from deqjax.cpl import certified_accuracy
from deqjax.mondeq import MonDEQClassifier, certify, fb_max_step, norm_bounds
from experiments.spec import ModelSpec, deq_config


def _batched(apply, x, bs):
    return jnp.concatenate([apply(x[i : i + bs]) for i in range(0, len(x), bs)])


def certify_hook(spec: ModelSpec, state, x, y, eps_list, r) -> dict:
    """Certified accuracy at the report's radii and the certificate's ingredients."""
    module = spec.module
    p = module.mondeq_params(state.params, x.shape[1:])
    config = spec.eval_kwargs["config"]
    bs = int(r.batch_size)
    y = jnp.asarray(y)
    t0 = time.time()
    cert = certify(
        p, x, y, splitting=module.splitting, alpha=module.alpha, config=config, batch_size=bs
    )
    seconds = time.time() - t0
    variables = {"params": state.params, **state.model_state}
    attacked = _batched(jax.jit(lambda a: module.apply(variables, a, config=config)[0]), x, bs)
    fb_step = fb_max_step(p)
    acc = certified_accuracy(cert.radius, cert.correct, eps_list)
    return {
        "certified_accuracy": {str(float(e)): v for e, v in acc.items()},
        "certified_radius_mean": float(jnp.mean(cert.radius)),
        "certified_radius_median": float(jnp.median(cert.radius)),
        "certificate": {
            "provable": "radius = margin / (sqrt(2) L) - solver slack, L = |W_out| |U| / m "
            "with Gram-iteration upper bounds on both norms",
            "lipschitz_bound": cert.lipschitz,
            "norm_bounds": norm_bounds(p),
            "m": p.m,
            "normalize": p.normalize,
            "splitting": module.splitting,
            "alpha": module.alpha,
            "fb_max_step": fb_step,
            # only meaningful for a forward–backward model (PR converges for any alpha)
            "fb_step_condition_holds": (
                bool(module.alpha < fb_step) if module.splitting == "fb" else None
            ),
            "solver_slack_max": float(jnp.max(cert.slack)),
            "attacked_vs_certified_max_logit_diff": float(jnp.max(jnp.abs(attacked - cert.logits))),
            "certify_seconds": seconds,
        },
    }


def build(config, num_classes: int) -> ModelSpec:
    """The ``mondeq`` family: :class:`MonDEQClassifier` and the certificate section."""
    m = config.model
    module = MonDEQClassifier(
        num_classes=num_classes,
        kind=str(m.kind),
        width=int(m.width),
        m=float(m.m),
        splitting=str(m.splitting),
        alpha=float(m.alpha),
        kernel_size=int(m.get("kernel_size", 3)),
        stride=int(m.get("stride", 1)),
        pool=int(m.get("pool", 1)),
        normalize=bool(m.normalize),
        deq=deq_config(config.deq),
    )
    return ModelSpec(
        module,
        is_deq=True,
        eval_kwargs={"config": deq_config(config.deq, evaluation=True)},
        report_hooks=(certify_hook,),
    )
