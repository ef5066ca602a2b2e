"""Model-agnostic adversarial attacks and robustness evaluation.

Every attack is a pure, jit-able function
``attack(logits_fn, x, y, key, *, eps, norm="linf"|"l2", ...) -> x_adv`` with
``logits_fn(x) -> (B, C)`` any JAX function, ``x`` in [0, 1] of shape (B, ...),
``y`` int labels (B,). ``x_adv`` always lies in [0, 1] and in the eps-ball.
``key`` is one PRNG key, or one key per example (``example_keys``) so that an
example's random draws do not depend on the batch it is attacked in.
"""

from deqjax.attacks._common import (
    WarmStartLogits,
    ce_loss,
    dlr_loss,
    example_keys,
    margin,
    project,
    random_start,
    targeted_dlr_loss,
)
from deqjax.attacks.apgd import apgd, apgd_targeted, checkpoints
from deqjax.attacks.ensemble import (
    ATTACK_NAMES,
    EnsembleResult,
    evaluate_ensemble,
    make_attack,
    preset,
)
from deqjax.attacks.eot import eot_logits_fn
from deqjax.attacks.fab import fab, fab_targeted, project_hyperplane_box
from deqjax.attacks.fgsm_pgd import fgsm, pgd
from deqjax.attacks.restarts import with_restarts
from deqjax.attacks.sanity import SanityReport, check_evaluation, input_gradient_stats, sanity_flags
from deqjax.attacks.square import p_schedule, square

__all__ = [
    "ATTACK_NAMES",
    "EnsembleResult",
    "SanityReport",
    "WarmStartLogits",
    "apgd",
    "apgd_targeted",
    "ce_loss",
    "check_evaluation",
    "checkpoints",
    "dlr_loss",
    "eot_logits_fn",
    "evaluate_ensemble",
    "example_keys",
    "fab",
    "fab_targeted",
    "fgsm",
    "input_gradient_stats",
    "make_attack",
    "margin",
    "p_schedule",
    "pgd",
    "preset",
    "project",
    "project_hyperplane_box",
    "random_start",
    "sanity_flags",
    "square",
    "targeted_dlr_loss",
    "with_restarts",
]
