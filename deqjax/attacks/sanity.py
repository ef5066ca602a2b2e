"""Sanity checks that flag a robustness evaluation as unreliable.

Following the gradient-masking checklist of Athalye, Carlini & Wagner,
"Obfuscated gradients give a false sense of security", ICML 2018, and Carlini et
al., "On evaluating adversarial robustness", 2019, plus the Square-attack check
of Croce & Hein 2020. Each flag is True when the evaluation looks *unreliable*:

* ``gradient_free_beats_gradient``: a score-based attack (Square) reaches lower
  robust accuracy than every gradient attack ⇒ gradients are masked.
* ``zero_gradients`` / ``nonfinite_gradients``: the fraction of examples whose
  input gradient of the margin loss is exactly zero / not finite exceeds a
  threshold. The margin z_y − max_{i≠y} z_i is used instead of CE because the CE
  gradient underflows to exactly 0 in float32 on confidently classified inputs.
* ``accuracy_rises_with_eps``: robust accuracy increases with the radius.
* ``loss_not_increasing``: for too many examples the attack loss at the end of
  the attack is not above its value at the start.
* ``adaptive_weaker_than_transfer``: for a defended model evaluated both ways (view
  names as :func:`deqjax.bpda.adaptive_views` writes them: ``autodiff``, ``bpda_*``,
  ``guided_*`` and ``bpda_purified_*`` are adaptive, ``transfer_*`` are attacks built on the
  undefended model), the strongest adaptive attack leaves a higher robust accuracy than
  the strongest transfer attack. An adaptive attack that knows the defence should never
  be weaker (Tramèr et al. 2020, "On adaptive attacks to adversarial example
  defenses"): its gradient through the defence is poor.
* ``forward_not_converged``: fewer than ``min_converged`` (90%) of the evaluated
  examples' forward solves reached the solver tolerance (DEQs): the implicit gradient
  the attacks use is then the gradient of something the model does not compute.

:func:`sanity_flags` is a host-side function of already computed results; the
statistics helper :func:`input_gradient_stats` is pure and jit-able.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deqjax.attacks import _common as C
from deqjax.attacks.ensemble import GRADIENT_FREE

TRANSFER_PREFIX = "transfer_"
_ADAPTIVE_PREFIXES = ("autodiff", "bpda_", "guided_")


def _view_of(label: str) -> str:
    """The gradient view of a report label ``attack/view`` (gradient-free attacks run
    once, on the first — for a defence: the adaptive ``autodiff`` — view)."""
    return label.split("/", 1)[1] if "/" in label else "autodiff"


def is_transfer_view(label: str) -> bool:
    """Whether a view name (or ``attack/view`` label) is a transfer attack."""
    return _view_of(label).startswith(TRANSFER_PREFIX)


def is_adaptive_view(label: str) -> bool:
    """Whether a view name (or ``attack/view`` label) is an adaptive attack."""
    return _view_of(label).startswith(_ADAPTIVE_PREFIXES)


class SanityReport(NamedTuple):
    flags: dict  # name -> bool (True = evaluation looks unreliable)
    explanations: dict  # name -> str

    @property
    def unreliable(self) -> bool:
        return any(self.flags.values())


def input_gradient_stats(logits_fn, x, y):
    """Per-example input-gradient health of the margin loss (pure, jit-able).

    Returns dict with ``zero`` (B,) bool (gradient exactly 0), ``nonfinite`` (B,)
    bool, ``norm`` (B,) L2 norm, and the fractions ``frac_zero`` / ``frac_nonfinite``.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    C.check_inputs(logits_fn, x, y)
    _, _, g = C.loss_and_grad(logits_fn, lambda z, yy: -C.margin(z, yy))(x, y)
    flat = g.reshape(g.shape[0], -1)
    nonfinite = ~jnp.all(jnp.isfinite(flat), axis=1)
    zero = jnp.all(flat == 0, axis=1)
    return dict(
        zero=zero,
        nonfinite=nonfinite,
        norm=jnp.linalg.norm(flat, axis=1),
        frac_zero=jnp.mean(zero),
        frac_nonfinite=jnp.mean(nonfinite),
    )


def _group_worst(results: dict) -> float:
    """Worst case over a group of attacks: per example when given (B,) robust flags,
    else the lowest accuracy."""
    vals = [np.asarray(v) for v in results.values()]
    if all(v.ndim == 1 for v in vals):
        return float(np.logical_and.reduce([v.astype(bool) for v in vals]).mean())
    return min(_acc(v) for v in vals)


def _acc(v):
    v = np.asarray(v)
    return float(v.mean()) if v.ndim else float(v)


def sanity_flags(
    *,
    per_attack=None,
    gradient_free=GRADIENT_FREE,
    grad_stats=None,
    eps_curve=None,
    loss_traces=None,
    converged_fraction=None,
    max_zero_frac=0.01,
    max_stuck_frac=0.5,
    min_converged=0.9,
    tol=0.0,
) -> SanityReport:
    """Host-side reliability flags from results already computed.

    Args:
      per_attack: {attack name: robust accuracy or (B,) robust flags}; names that
        start with one of ``gradient_free`` count as gradient-free.
      grad_stats: output of :func:`input_gradient_stats`.
      eps_curve: sequence of (eps, robust accuracy) pairs.
      loss_traces: {attack name: loss trace (T, B)} (e.g. ``pgd(..., return_trace=True)``).
      max_zero_frac: tolerated fraction of examples with zero input gradient.
      max_stuck_frac: tolerated fraction of examples whose loss did not increase.
      converged_fraction: fraction of evaluated examples whose forward solve converged.
      min_converged: the fraction below which ``forward_not_converged`` is raised.
      tol: slack on accuracy comparisons.
    Only the checks whose inputs are given are reported.
    """
    flags, why = {}, {}
    if per_attack:
        gf = {k: _acc(v) for k, v in per_attack.items() if k.startswith(tuple(gradient_free))}
        gb = {k: _acc(v) for k, v in per_attack.items() if not k.startswith(tuple(gradient_free))}
        if gf and gb:
            best_gf, best_gb = min(gf.values()), min(gb.values())
            flags["gradient_free_beats_gradient"] = best_gf < best_gb - tol
            why["gradient_free_beats_gradient"] = (
                f"gradient-free robust acc {best_gf:.4f} vs best gradient attack {best_gb:.4f}"
                + (
                    "; gradients are likely masked/obfuscated"
                    if best_gf < best_gb - tol
                    else "; ok"
                )
            )
        adaptive = {k: v for k, v in per_attack.items() if is_adaptive_view(k)}
        transfer = {k: v for k, v in per_attack.items() if is_transfer_view(k)}
        if adaptive and transfer:
            va, vt = _group_worst(adaptive), _group_worst(transfer)
            weaker = va > vt + tol
            flags["adaptive_weaker_than_transfer"] = weaker
            why["adaptive_weaker_than_transfer"] = (
                f"adaptive worst case {va:.4f} ({len(adaptive)} attack/view pairs) vs transfer "
                f"worst case {vt:.4f} ({len(transfer)})"
                + (
                    "; the adaptive attacks' gradients through the defence are poor: strengthen "
                    "them (more steps, BPDA over more views, EOT)"
                    if weaker
                    else "; ok"
                )
            )
    if grad_stats is not None:
        fz, fn = float(grad_stats["frac_zero"]), float(grad_stats["frac_nonfinite"])
        flags["zero_gradients"] = fz > max_zero_frac
        why["zero_gradients"] = (
            f"{fz:.1%} of examples have an exactly zero input gradient "
            f"(threshold {max_zero_frac:.1%})"
        )
        flags["nonfinite_gradients"] = fn > 0
        why["nonfinite_gradients"] = f"{fn:.1%} of examples have NaN/inf input gradients"
    if eps_curve is not None:
        pts = sorted((float(e), _acc(a)) for e, a in eps_curve)
        rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(pts, pts[1:]) if a1 > a0 + tol]
        flags["accuracy_rises_with_eps"] = bool(rises)
        why["accuracy_rises_with_eps"] = (
            "robust accuracy rises with eps: "
            + ", ".join(f"{a0:.4f}@{e0:g} -> {a1:.4f}@{e1:g}" for e0, a0, e1, a1 in rises)
            if rises
            else "robust accuracy is non-increasing in eps; ok"
        )
    if converged_fraction is not None:
        c = float(converged_fraction)
        flags["forward_not_converged"] = c < min_converged
        why["forward_not_converged"] = f"{c:.1%} of the evaluated forward solves converged" + (
            f" (< {min_converged:.0%}): the implicit gradient is the gradient of an equilibrium "
            "the model does not reach; trust the unroll/intermediate views and Square, and "
            "consider a larger solver budget or Jacobian regularisation"
            if c < min_converged
            else "; ok"
        )
    if loss_traces:
        stuck = {
            k: float(np.mean(np.asarray(t)[-1] <= np.asarray(t)[0])) for k, t in loss_traces.items()
        }
        bad = {k: v for k, v in stuck.items() if v > max_stuck_frac}
        flags["loss_not_increasing"] = bool(bad)
        why["loss_not_increasing"] = ", ".join(
            f"{k}: loss did not increase for {v:.1%} of examples" for k, v in stuck.items()
        )
    return SanityReport(flags, why)


def check_evaluation(
    logits_fn, x, y, key, *, eps, norm="linf", steps=20, n_queries=300, **flag_kwargs
) -> SanityReport:
    """Quick masking check: PGD (with trace), Square, and input-gradient stats."""
    from deqjax.attacks.fgsm_pgd import pgd
    from deqjax.attacks.square import square

    k1, k2 = jax.random.split(key)
    x, y = jnp.asarray(x), jnp.asarray(y)
    xp, trace = jax.jit(
        lambda x, y, k: pgd(logits_fn, x, y, k, eps=eps, norm=norm, steps=steps, return_trace=True)
    )(x, y, k1)
    xs = jax.jit(
        lambda x, y, k: square(logits_fn, x, y, k, eps=eps, norm=norm, n_queries=n_queries)
    )(x, y, k2)
    rob = lambda xa: np.asarray(jnp.argmax(logits_fn(xa), -1) == y)
    return sanity_flags(
        per_attack={"pgd": rob(xp), "square": rob(xs)},
        grad_stats=jax.jit(lambda x, y: input_gradient_stats(logits_fn, x, y))(x, y),
        loss_traces={"pgd": trace},
        **flag_kwargs,
    )
