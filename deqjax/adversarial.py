"""Adversarial-training losses (pure, usable inside ``jax.jit`` / ``jax.grad``).

* PGD-AT (Madry et al., "Towards deep learning models resistant to adversarial
  attacks", ICLR 2018):  min_θ E[ max_{‖δ‖≤eps} CE(f_θ(x + δ), y) ], inner max by
  PGD from a uniform random start.
* TRADES (Zhang et al., "Theoretically principled trade-off between robustness
  and accuracy", ICML 2019):
  L = CE(f_θ(x), y) + β · KL(p_θ(x) ‖ p_θ(x_adv)),
  x_adv from x + 0.001·N(0, I) by ``steps`` sign-gradient ascent steps on the KL
  (L∞; normalised-gradient steps for L2), projected to B_eps(x) ∩ [0, 1].
* Mixed clean/adversarial loss: (1 − w)·CE(f_θ(x), y) + w·CE(f_θ(x_adv), y)
  (Goodfellow et al. 2015 use w = 0.5).

Each loss is split into its inner maximisation (``*_adversarial_examples``) and its
outer objective of logits (``*_objective``), so a training loop can compute the clean
and adversarial logits in one forward pass (``experiments/train.py`` does) and still
use exactly this maths; ``*_loss`` composes the two for a plain ``apply_fn``.

Gradient paths: the inner attack sees ``stop_gradient(params)`` (only x is
differentiated) and may use a separate ``attack_apply_fn`` (e.g. a DEQ with an
unrolled/phantom backward for the attack and the implicit one for training); the
adversarial input is then ``stop_gradient``-ed so the outer loss is
differentiated with respect to ``params`` only. ``apply_fn(params, x) -> logits``.

Warm starts: ``attack_logits(params) -> logits_fn`` (instead of ``attack_apply_fn``)
builds the inner attack's logits function from the frozen parameters; when it is a
:class:`~deqjax.attacks.WarmStartLogits` (a DEQ, :func:`deqjax.models.warm_start_logits`)
each inner step's solve starts from the previous step's equilibrium (TRADES' first
from the clean input's). The outer objective is always ``apply_fn``'s (cold) forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.fgsm_pgd import pgd


def pgd_at_objective(logits_adv, y):
    """Madry et al.'s outer objective: mean_i CE(f_θ(x_adv_i), y_i)."""
    return jnp.mean(C.ce_loss(logits_adv, y))


def trades_objective(logits, logits_adv, y, beta):
    """TRADES' outer objective: mean_i [CE(f_θ(x_i), y_i) + β·KL(p_θ(x_i) ‖ p_θ(x_adv_i))]."""
    return jnp.mean(C.ce_loss(logits, y) + beta * _kl(logits, logits_adv))


def mixed_objective(logits, logits_adv, y, weight):
    """(1 − weight)·mean CE(clean) + weight·mean CE(adversarial), weight ∈ [0, 1]."""
    if not isinstance(weight, jax.Array) and not (0.0 <= float(weight) <= 1.0):
        raise ValueError(f"weight must be in [0, 1], got {weight}.")
    return (1.0 - weight) * jnp.mean(C.ce_loss(logits, y)) + weight * jnp.mean(
        C.ce_loss(logits_adv, y)
    )


def _attack_logits(apply_fn, attack_apply_fn, params, attack_logits=None):
    frozen = jax.tree_util.tree_map(lax.stop_gradient, params)
    if attack_logits is not None:
        if attack_apply_fn is not None:
            raise ValueError("give attack_apply_fn or attack_logits, not both")
        return attack_logits(frozen)
    fn = attack_apply_fn if attack_apply_fn is not None else apply_fn
    return lambda xx: fn(frozen, xx)


def pgd_adversarial_examples(
    apply_fn,
    params,
    x,
    y,
    key,
    *,
    eps,
    step,
    steps,
    norm="linf",
    attack_apply_fn=None,
    rand_init=True,
    attack_logits=None,
):
    """PGD adversarial inputs for training (no gradient flows to params or x)."""
    logits_fn = _attack_logits(apply_fn, attack_apply_fn, params, attack_logits)
    x_adv = pgd(
        logits_fn, x, y, key, eps=eps, norm=norm, steps=steps, step_size=step, rand_init=rand_init
    )
    return lax.stop_gradient(x_adv)


def pgd_at_loss(
    apply_fn,
    params,
    x,
    y,
    key,
    *,
    eps,
    step,
    steps,
    norm="linf",
    attack_apply_fn=None,
    rand_init=True,
):
    """PGD adversarial-training loss mean_i CE(f_θ(x_adv_i), y_i) (Madry et al. 2018).

    Reference setting (CIFAR-10, DEQ robustness papers): eps=8/255, step=2/255,
    steps=10, L∞, uniform random start.
    """
    x_adv = pgd_adversarial_examples(
        apply_fn,
        params,
        x,
        y,
        key,
        eps=eps,
        step=step,
        steps=steps,
        norm=norm,
        attack_apply_fn=attack_apply_fn,
        rand_init=rand_init,
    )
    return pgd_at_objective(apply_fn(params, x_adv), y)


def mixed_adversarial_loss(
    apply_fn, params, x, y, key, *, eps, step, steps, norm="linf", weight=0.5, attack_apply_fn=None
):
    """(1 − weight)·CE(clean) + weight·CE(PGD adversarial); weight ∈ [0, 1]."""
    x_adv = pgd_adversarial_examples(
        apply_fn,
        params,
        x,
        y,
        key,
        eps=eps,
        step=step,
        steps=steps,
        norm=norm,
        attack_apply_fn=attack_apply_fn,
    )
    return mixed_objective(apply_fn(params, x), apply_fn(params, x_adv), y, weight)


def _kl(logits_p, logits_q):
    """Per-example KL(softmax(p) ‖ softmax(q))."""
    lp = jax.nn.log_softmax(logits_p, -1)
    lq = jax.nn.log_softmax(logits_q, -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def trades_adversarial_examples(
    apply_fn,
    params,
    x,
    key,
    *,
    eps,
    step=None,
    steps=10,
    norm="linf",
    attack_apply_fn=None,
    attack_logits=None,
):
    """TRADES inner maximisation of KL(p(x) ‖ p(x')) over x' ∈ B_eps(x) ∩ [0, 1]."""
    C.check_norm(norm)
    C.check_eps(eps)
    steps = C.check_positive_int("steps", steps)
    step = eps / 4.0 if step is None else step  # TRADES CIFAR: 0.007 for eps 0.031
    logits_fn = _attack_logits(apply_fn, attack_apply_fn, params, attack_logits)
    # the solver state a WarmStartLogits carries (() for a plain logits function): the
    # first step's solve starts from the clean input's solution
    p_nat, st = C.logits_and_state(logits_fn, x, C.initial_state(logits_fn, x))
    p_nat = lax.stop_gradient(p_nat)
    kl_grad = C.loss_grad_state(logits_fn, lambda logits, p: _kl(p, logits))
    x0 = C.project(x + 0.001 * jax.random.normal(key, x.shape, x.dtype), x, eps, norm)

    def body(_, carry):
        xa, st = carry
        _, _, g, st = kl_grad(xa, p_nat, st)
        return C.project(xa + step * C.ascent_direction(g, norm), x, eps, norm), st

    x_adv, _ = lax.fori_loop(0, steps, body, (x0, st))
    return lax.stop_gradient(x_adv)


def trades_loss(
    apply_fn,
    params,
    x,
    y,
    key,
    *,
    eps,
    step=None,
    steps=10,
    beta=6.0,
    norm="linf",
    attack_apply_fn=None,
):
    """TRADES loss mean_i [CE(f_θ(x_i), y_i) + β·KL(p_θ(x_i) ‖ p_θ(x_adv_i))]
    (Zhang et al. 2019; β = 6, eps = 0.031, step = 0.007, 10 steps on CIFAR-10)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    C.check_inputs(lambda xx: apply_fn(params, xx), x, y)
    x_adv = trades_adversarial_examples(
        apply_fn,
        params,
        x,
        key,
        eps=eps,
        step=step,
        steps=steps,
        norm=norm,
        attack_apply_fn=attack_apply_fn,
    )
    return trades_objective(apply_fn(params, x), apply_fn(params, x_adv), y, beta)
