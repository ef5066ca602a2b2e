"""Model-agnostic adversarial attacks and robustness evaluation.

Every attack is a pure, jit-able function
``attack(logits_fn, x, y, key, *, eps, norm="linf"|"l2", ...) -> x_adv`` with
``logits_fn(x) -> (B, C)`` any JAX function, ``x`` in [0, 1] of shape (B, ...),
``y`` int labels (B,). ``x_adv`` always lies in [0, 1] and in the eps-ball.
``key`` is one PRNG key, or one key per example (``example_keys``) so that an
example's random draws do not depend on the batch it is attacked in.

**Precision.** ``x`` may be bfloat16 / float16 (and the model's logits too): the
attacks compute in float32 (at least), the model sees its inputs in ``x``'s dtype,
and ``x_adv`` comes back in ``x``'s dtype, in [0, 1] and in the eps-ball *as stored*
(each coordinate rounded towards ``x``).

**Sharding.** The attacks run on batches sharded over an Explicit- or Auto-axis mesh
(``jax.set_mesh``) and inside ``jax.shard_map`` (default ``check_vma=True``). Shard
per-example keys (``example_keys``) with the batch (``evaluate_ensemble`` takes them
too) and the sharded result equals the unsharded one; with one key, each shard draws
its randomness as if it were the whole batch.

**Runtime checks.** Bad values raise ``ValueError``: at once when they are concrete,
and, when they are traced (``jax.jit``), when the program runs: ``eps`` finite and
>= 0 (> 0 for FAB), ``x`` finite in [0, 1], labels in [0, C), ``step_size`` >= 0 (the
program's error names the problem). One predicate evaluation and a ``lax.cond`` per
attack call, a host callback only on failure. Switch the in-program checks off with
``DEQJAX_RUNTIME_CHECKS=0`` (at import) or ``deqjax.attacks.set_runtime_checks(False)``
(applies to attacks traced afterwards). ``key`` must be a PRNG key (not ``None`` or an
int); an empty batch returns empty results without calling the model.
"""

from deqjax.attacks._common import (
    WarmStartLogits,
    ce_loss,
    dlr_loss,
    example_keys,
    margin,
    project,
    random_start,
    runtime_checks_enabled,
    set_runtime_checks,
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
    "runtime_checks_enabled",
    "sanity_flags",
    "set_runtime_checks",
    "square",
    "targeted_dlr_loss",
    "with_restarts",
]
