"""Warm-started DEQ solves inside iterative attacks (deqjax.models.warm_start_logits).

On a tiny MDEQ whose tolerance-stopped forward converges in ~8 (tol 1e-3) or ~10
(tol 1e-4) Anderson steps: a warm-started attack gives the cold attack's robust
accuracy, its adversarial examples are close (the gradients differ within the solver
tolerance), it takes far fewer forward solver steps, and the settings under which a
warm start would change the model or the gradient are refused.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax.attacks import WarmStartLogits
from deqjax.deq import DEQConfig
from deqjax.deq_gradients import AttackView
from deqjax.models import LyaDEQClassifier, MDEQClassifier, warm_start_logits, warm_start_refusal
from deqjax.solvers import SolverConfig


def config(tol: float, backward: str = "implicit") -> DEQConfig:
    return DEQConfig(
        forward=SolverConfig(max_iter=40, tol=tol),
        backward=backward,
        adjoint_max_iter=20,
        adjoint_tol=tol,
    )


def _scale(path, a):
    name = jax.tree_util.keystr(path)
    if "injection" in name and "kernel" in name:
        return 8.0 * a  # a strong injection makes the random cell a contraction
    if "gn_b" in name and "scale" in name:
        return 0.6 * a
    return a


@pytest.fixture(scope="module")
def tiny():
    """(model, variables, x, y): 32 random 12×12 images labelled by the model itself
    (clean accuracy 100 %, so robust accuracy measures the attack alone)."""
    model = MDEQClassifier(width=8, inner=8, groups=4, deq=config(1e-3))
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 12, 12, 1))
    v = model.init(jax.random.PRNGKey(1), x)
    v = {"params": jax.tree_util.tree_map_with_path(_scale, v["params"])}
    y = jnp.argmax(model.apply(v, x)[0], -1)
    return model, v, x, y


class Steps:
    """Total forward solver steps of every solve (``on_steps`` callback)."""

    def __init__(self):
        self.total = 0

    def __call__(self, steps):
        self.total += int(np.sum(steps))


def counted(model, v, cfg):
    steps = Steps()
    return warm_start_logits(model, v, config=cfg, on_steps=steps), steps


def robust(model, v, cfg, y, *xs_adv):
    """The accuracy on each of ``xs_adv`` (one jitted forward: one compile)."""
    logits = jax.jit(lambda xa: model.apply(v, xa, config=cfg)[0])
    return [float(np.mean(np.argmax(logits(xa), -1) == y)) for xa in xs_adv]


def test_calling_it_is_the_cold_forward(tiny):
    model, v, x, _ = tiny
    cfg = config(1e-3)
    ws = warm_start_logits(model, v, config=cfg)
    assert isinstance(ws, WarmStartLogits)
    np.testing.assert_array_equal(ws(x), model.apply(v, x, config=cfg)[0])


def test_warm_solve_gives_the_cold_value_and_gradient_within_tolerance(tiny):
    """From the fixed point of a nearby input, the solve needs fewer steps and lands
    on the same z*: logits and the input gradient agree to the solver tolerance."""
    model, v, x, y = tiny
    cfg = config(1e-4)
    ws = warm_start_logits(model, v, config=cfg)
    x2 = jnp.clip(x + 0.01 * jnp.sign(jax.random.normal(jax.random.PRNGKey(3), x.shape)), 0, 1)
    _, z_prev = ws.apply(x, ws.init(x))

    def loss(xb, z0):
        logits, _ = ws.apply(xb, z0)
        return jnp.sum(A.ce_loss(logits, y)), logits

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compile, two calls
    (_, cold), g_cold = value_and_grad(x2, ws.init(x2))
    (_, warm), g_warm = value_and_grad(x2, z_prev)
    assert float(jnp.max(jnp.abs(warm - cold))) < 1e-3 * float(jnp.max(jnp.abs(cold)))
    rel = float(jnp.linalg.norm(g_warm - g_cold) / jnp.linalg.norm(g_cold))
    assert rel < 1e-2, rel
    # steps: the warm solve starts near its solution
    steps = jax.jit(lambda z0: model.apply(v, x2, z0, config=cfg, method="warm_forward")[2].steps)
    assert int(steps(z_prev).sum()) < 0.7 * int(steps(ws.init(x2)).sum())


def test_warm_pgd_matches_cold_pgd(tiny):
    """Same key, tol 1e-4: the same robust accuracy (non-trivial: about 2/3), nearly
    the same adversarial examples and loss, at fewer solver steps."""
    model, v, x, y = tiny
    cfg = config(1e-4)
    ws, warm_steps = counted(model, v, cfg)
    cs, cold_steps = counted(model, v, cfg)
    key = jax.random.PRNGKey(2)
    kw = dict(eps=0.3, steps=20)
    x_cold = A.pgd(lambda xb: cs(xb), x, y, key, **kw)  # a plain logits_fn: cold solves
    x_warm = A.pgd(ws, x, y, key, **kw)
    logits = jax.jit(lambda xa: model.apply(v, xa, config=cfg)[0])  # one compile, four calls
    robust_acc = lambda xa: float(np.mean(np.argmax(logits(xa), -1) == y))
    r_cold, r_warm = robust_acc(x_cold), robust_acc(x_warm)
    assert 0.3 < r_cold < 0.9, r_cold
    assert r_warm == r_cold
    assert float(jnp.mean(jnp.abs(x_warm - x_cold) > 1e-4)) < 0.1
    ce = lambda xa: float(jnp.mean(A.ce_loss(logits(xa), y)))
    assert abs(ce(x_warm) - ce(x_cold)) < 0.02 * abs(ce(x_cold))
    assert warm_steps.total < cold_steps.total


@pytest.mark.parametrize(
    "attack",
    ["pgd", pytest.param("apgd_targeted", marks=pytest.mark.e2e)],  # APGD-T runs apgd_core
)
def test_warm_attacks_take_far_fewer_solver_steps(tiny, attack):
    """tol 1e-3, ε = 0.05, 20 steps: each solve starts one attack step from its
    solution (APGD-T, which runs APGD's core per target, is marked e2e: pytest -m e2e). PGD
    runs 2 vmapped restarts (the solver state is per restart); APGD-T 2 targets (each
    target's run starts from the clean solution)."""
    model, v, x, y = tiny
    cfg = config(1e-3)
    ws, warm_steps = counted(model, v, cfg)
    cs, cold_steps = counted(model, v, cfg)
    key = jax.random.PRNGKey(2)
    kw = dict(pgd=dict(steps=20, restarts=2), apgd=dict(steps=20), apgd_targeted=dict(steps=20))[
        attack
    ]
    if attack == "apgd_targeted":
        kw.update(n_target_classes=2)
    fn = getattr(A, attack)
    x_cold = fn(lambda xb: cs(xb), x, y, key, eps=0.05, **kw)
    x_warm = fn(ws, x, y, key, eps=0.05, **kw)
    assert x_warm.shape == x.shape
    assert float(jnp.max(jnp.abs(x_warm - x))) <= 0.05 + 1e-6
    r_warm, r_cold = robust(model, v, cfg, y, x_warm, x_cold)
    assert r_warm == r_cold
    ratio = warm_steps.total / cold_steps.total
    # measured: PGD 0.50, APGD-T 0.61
    assert ratio <= (0.6 if attack == "pgd" else 0.7), ratio


@pytest.mark.parametrize("attack", ["fab_targeted", "square"])
def test_warm_fab_and_square_match_cold_at_fewer_solver_steps(tiny, attack):
    """tol 1e-4, ε = 0.3, same key: FAB-T (solves warm from gradient point to candidate
    and on) and Square (each query's solve warm from the current point) give the cold
    attack's robust accuracy at far fewer forward solver steps. Measured: FAB-T 0.41
    robust both ways, steps 0.61 of cold; Square steps 0.41-0.49 of cold."""
    model, v, x, y = tiny
    cfg = config(1e-4)
    ws, warm_steps = counted(model, v, cfg)
    cs, cold_steps = counted(model, v, cfg)
    key = jax.random.PRNGKey(2)
    if attack == "fab_targeted":
        kw = dict(steps=10, n_target_classes=2)
    else:
        kw = dict(n_queries=60)
    fn = getattr(A, attack)
    x_cold = fn(lambda xb: cs(xb), x, y, key, eps=0.3, **kw)
    x_warm = fn(ws, x, y, key, eps=0.3, **kw)
    assert float(jnp.max(jnp.abs(x_warm - x))) <= 0.3 + 1e-6
    r_cold, r_warm = robust(model, v, cfg, y, x_cold, x_warm)
    if attack == "fab_targeted":
        assert r_cold < 0.9, r_cold  # the attack does work here
    assert r_warm == r_cold
    ratio = warm_steps.total / cold_steps.total
    assert ratio <= 0.75, ratio


@pytest.mark.parametrize(
    "cfg, view, match",
    [
        (config(1e-3, "unroll"), None, "changes the 'unroll' gradient"),
        (config(1e-3), AttackView("unroll"), "changes the 'unroll' gradient"),
        (config(1e-3), AttackView("intermediate"), "changes the 'intermediate' gradient"),
        (
            DEQConfig(forward=SolverConfig(method="broyden", tol=1e-3), backward="shine"),
            None,
            "inverse-Jacobian estimate",
        ),
        (config(0.0), None, "forward.tol = 0"),
        (config(1e-3), AttackView(defence="early_exit"), "defence"),
    ],
)
def test_settings_a_warm_start_would_change_are_refused(tiny, cfg, view, match):
    model, v, _, _ = tiny
    with pytest.raises(ValueError, match=match):
        warm_start_logits(model, v, config=cfg, view=view)
    # the same reason without raising (the experiments pick warm or cold views with it)
    assert re.search(match, warm_start_refusal(model, v, config=cfg, view=view))


def test_phantom_gradient_is_allowed(tiny):
    model, v, x, _ = tiny
    assert warm_start_refusal(model, v, config=config(1e-3, "phantom")) is None
    assert warm_start_refusal(model, v) is None  # the model's own config
    assert "no warm_forward" in warm_start_refusal(nn.Dense(3), {})
    ws = warm_start_logits(model, v, config=config(1e-3, "phantom"))
    assert ws(x).shape == (32, 10)


def test_lyadeq_is_refused():
    model = LyaDEQClassifier(
        num_classes=3, width=4, inner=4, groups=2, icnn_widths=(8,), orth_features=6
    )
    x = jnp.zeros((2, 12, 12, 1))
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # the check reads no values
    with pytest.raises(ValueError, match="has no equilibrium"):
        warm_start_logits(model, v)
    assert "has no equilibrium" in warm_start_refusal(model, v)


@pytest.mark.parametrize("kind", ["trades"])  # PGD-AT's inner attack is pgd (tested above)
def test_adversarial_training_with_warm_starts_matches_cold(tiny, kind):
    """experiments/train.py with adv.warm_start: the training loss and its parameter
    gradient equal the cold inner attack's within the solver tolerance (tol 1e-4;
    measured on these 8 examples: loss 2.2e-4, gradient 5.3e-3 relative)."""
    from experiments import models, train
    from tests.helpers import tiny_config

    _, v, x, y = tiny
    x, y = x[:8], y[:8]
    c = tiny_config()
    c.train.loss = kind
    c.model.head = "gap"  # the fixture's model
    c.deq.update(max_iter=40, tol=1e-4, adjoint_max_iter=20, adjoint_tol=1e-4)
    c.adv.update(eps=0.1, step=0.025, steps=5, attack_gradient="implicit")
    spec = models.build(c, 10)
    probe = jnp.zeros((len(y), 2))

    def loss_and_grad(warm):
        c.adv.warm_start = warm
        fn = train.make_loss_fn(spec, c)
        # jitted, as in training (eagerly, every solve of the inner attack recompiles)
        (loss, _), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(
            v["params"], {}, x, y, jax.random.PRNGKey(4), probe
        )
        return loss, g

    loss_c, g_c = loss_and_grad(False)
    loss_w, g_w = loss_and_grad(True)
    flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])
    rel = float(jnp.linalg.norm(flat(g_w) - flat(g_c)) / jnp.linalg.norm(flat(g_c)))
    assert abs(float(loss_w) - float(loss_c)) < 1e-2 * abs(float(loss_c))
    assert rel < 2e-2, rel
