"""Straight-through gradients and BPDA: attack a defence with another function's gradient.

Athalye, Carlini & Wagner, "Obfuscated gradients give a false sense of security",
ICML 2018 (BPDA, Backward Pass Differentiable Approximation); Tramèr, Carlini, Brendel &
Madry, "On adaptive attacks to adversarial example defenses", NeurIPS 2020.

Everything here rests on one identity: for arrays ``v`` and ``s`` of the same shape,

    straight_through(v, s) = v + (s − stop_gradient(s))

has the **value** of ``v`` (exactly: ``s − s = 0`` in floating point) and the
**derivative** of ``s``. Attacks evaluate the logits they see (loss, best-iterate
selection, step-size control) and follow their gradient, so a straight-through logits
function makes an attack score the defended model while it follows a surrogate's
direction.

* :func:`bpda` — value of the defended model at ``x``, gradient of a surrogate
  (an undefended model's gradient view) at ``x`` (Athalye et al.'s BPDA with the whole
  defence as the non-differentiable layer). Note that the attack's loss derivative is
  then taken at the *defended* logits, so its iterates are not the transfer attack's.
* :func:`guided` — the attack follows the surrogate entirely (values and gradients: its
  iterates are exactly those of the **transfer** attack with the same key) while the
  defended model chooses the returned iterate, restart and target (the attacks'
  ``select_fn``). Per example it is never weaker than the transfer attack of the same
  view (PGD, APGD, APGD-T): every example the transfer attack breaks, it breaks. This
  is what makes an adaptive evaluation at least as strong as transfer by construction
  (docs/concepts/evaluation.md), at the cost of one defended forward per iterate.
* :func:`bpda_purified` — for a defence that transforms its input,
  ``defence(x) -> (logits, x′)``: value of the defended logits, gradient of the
  surrogate at the transformed input ``x′`` with the transformation's Jacobian replaced
  by the identity (classic BPDA for purification defences).
* :func:`adaptive_views` composes both with **every** gradient view of the undefended
  model, adds full autodiff through the defence, and (for a random defence) wraps the
  defended forward in EOT; the transfer attacks are the undefended views themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
from jax import lax

from deqjax.attacks.eot import eot_logits_fn
from deqjax.attacks.sanity import TRANSFER_PREFIX, is_adaptive_view, is_transfer_view

# the families of views of a defended model (autodiff: through the whole defence)
PROTOCOLS = ("autodiff", "bpda", "guided", "bpda_purified", "transfer")

__all__ = [
    "PROTOCOLS",
    "adaptive_views",
    "bpda",
    "bpda_purified",
    "guided",
    "Guided",
    "is_adaptive_view",
    "is_transfer_view",
    "straight_through",
]


def straight_through(value, surrogate):
    """``value`` in the forward pass, ``surrogate``'s derivative in the backward pass
    (pytrees of matching structure and shapes)."""
    return jax.tree.map(lambda v, s: v + (s - lax.stop_gradient(s)), value, surrogate)


def bpda(defended: Callable, surrogate: Callable) -> Callable:
    """Logits function with the value of ``defended(x)`` and the input gradient of
    ``surrogate(x)`` (both ``x -> (B, C)`` logits)."""

    def logits_fn(x):
        return straight_through(lax.stop_gradient(defended(lax.stop_gradient(x))), surrogate(x))

    return logits_fn


class Guided:
    """A view whose attacks follow ``follow`` (called like it: ``view(x) = follow(x)``)
    and return the iterate that ``select`` — the model being evaluated — finds worst.
    :func:`deqjax.robustness.evaluate_robustness` passes ``select`` as ``select_fn`` to
    the attacks that take it (PGD, APGD, APGD-T); other attacks see a transfer view."""

    def __init__(self, follow: Callable, select: Callable):
        self.follow, self.select = follow, select

    def __call__(self, x):
        return self.follow(x)


def guided(defended: Callable, surrogate: Callable) -> Guided:
    """Attack ``surrogate``, keep what fools ``defended`` (see the module docstring)."""
    return Guided(surrogate, defended)


def bpda_purified(defence: Callable, surrogate: Callable) -> Callable:
    """BPDA through an input transformation: ``defence(x) -> (logits, x′)``.

    Value: the defended logits. Gradient: ``surrogate`` at
    ``x_st = x + stop_gradient(x′ − x)`` — the surrogate evaluated at the purified input,
    the purification's Jacobian replaced by the identity (Athalye et al. 2018, §4.1).
    """

    def logits_fn(x):
        logits, x_p = defence(lax.stop_gradient(x))
        x_st = x + lax.stop_gradient(x_p - x)
        return straight_through(lax.stop_gradient(logits), surrogate(x_st))

    return logits_fn


def adaptive_views(
    defended: Callable,
    undefended_views: Mapping[str, Callable],
    *,
    purify: Callable | None = None,
    random_defended: Callable | None = None,
    eot_key=None,
    eot_samples: int = 8,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> dict[str, Callable]:
    """Every view an adaptive evaluation of a defended model attacks, plus the transfer
    attacks it must beat.

    Args:
      defended: ``x -> logits`` of the defended model (deterministic). It is what
        every attack must be scored on (``evaluate_robustness(..., score=defended)``).
      undefended_views: ``{view: logits_fn}`` of the undefended model (for a DEQ its
        gradient views: implicit, unroll, intermediate states, simultaneous adjoint, …).
      purify: for an input-transforming defence, ``x -> (logits, x′)`` (usually the
        same computation as ``defended``); adds ``bpda_purified_<view>``.
      random_defended: for a randomised defence, ``(x, key) -> logits``; the adaptive
        views then use its EOT average over ``eot_samples`` draws from ``eot_key``
        (Athalye et al. 2018, §4.2) in place of ``defended`` for value and autodiff.
      protocols: which of :data:`PROTOCOLS` to build (all by default; fewer to save
        time — each view is a report row per attack; ``bpda_purified`` needs ``purify``).

    Returns ``{name: logits_fn}`` in this order: ``autodiff`` (through the whole
    defence), then for every undefended view ``bpda_<view>``, ``guided_<view>``,
    ``bpda_purified_<view>`` and ``transfer_<view>`` (the undefended view itself: an
    attack built on the undefended model, to be scored on the defended one).
    """
    if not undefended_views:
        raise ValueError("adaptive_views needs at least one gradient view of the undefended model")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown protocols {unknown or protocols}; choose from {PROTOCOLS}")
    if "bpda_purified" in protocols and purify is None:
        raise ValueError("protocol 'bpda_purified' needs purify=: the defence's (logits, x′)")
    attacked = defended
    if random_defended is not None:
        if eot_key is None:
            raise ValueError("a random defence needs eot_key (EOT draws come from explicit keys)")
        attacked = eot_logits_fn(random_defended, eot_key, eot_samples)
    views = {"autodiff": attacked} if "autodiff" in protocols else {}
    if "bpda" in protocols:
        views.update({f"bpda_{k}": bpda(attacked, v) for k, v in undefended_views.items()})
    if "guided" in protocols:
        views.update({f"guided_{k}": guided(attacked, v) for k, v in undefended_views.items()})
    if "bpda_purified" in protocols:
        views.update(
            {f"bpda_purified_{k}": bpda_purified(purify, v) for k, v in undefended_views.items()}
        )
    if "transfer" in protocols:
        views.update({f"{TRANSFER_PREFIX}{k}": v for k, v in undefended_views.items()})
    return views
