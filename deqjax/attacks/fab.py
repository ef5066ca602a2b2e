"""FAB: the Fast Adaptive Boundary attack (untargeted FAB and targeted FAB-T).

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020; FAB-T is the targeted version of AutoAttack (Croce & Hein,
"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020). Written from the paper and the reference code's
settings (fra31/auto-attack, ``fab_base.py``); pure and jit-able.

FAB looks for the **smallest** perturbation (L∞ or L2) that changes the decision.
One iteration at the current point x⁽ᵏ⁾, original point x₀:

1. Linearise the decision boundary: for each class j ≠ y,
   f_j(z) ≈ f_j(x⁽ᵏ⁾) + ∇f_jᵀ(z − x⁽ᵏ⁾) with f_j = z_j − z_y (FAB-T: only the target
   class t). Pick the class whose linearised boundary is nearest,
   j* = argmin_j |f_j| / ‖∇f_j‖_q (q the dual norm: L1 for L∞, L2 for L2), giving the
   hyperplane π = {z : ∇f_{j*}ᵀ z = ∇f_{j*}ᵀ x⁽ᵏ⁾ − f_{j*}(x⁽ᵏ⁾)}.
2. Project both x⁽ᵏ⁾ and x₀ onto π ∩ [0, 1]ⁿ with the minimal-norm displacement
   (:func:`project_hyperplane_box`, exact for L∞ and L2): δ⁽ᵏ⁾, δ₀.
3. Biased step (towards the original point): α = min(‖δ⁽ᵏ⁾‖/(‖δ⁽ᵏ⁾‖ + ‖δ₀‖), α_max),
   x⁽ᵏ⁺¹⁾ = clip((1 − α)(x⁽ᵏ⁾ + η δ⁽ᵏ⁾) + α(x₀ + η δ₀), 0, 1), α_max = 0.1,
   overshoot η = 1.05.
4. If x⁽ᵏ⁺¹⁾ is misclassified: keep it if it is the closest adversarial point so far,
   then step back towards x₀: x⁽ᵏ⁺¹⁾ ← x₀ + β(x⁽ᵏ⁺¹⁾ − x₀), β = 0.9.

Restart 0 starts at x₀; restart r ≥ 1 at x₀ + ½·eps·t/‖t‖ (t ~ U[−1, 1]ⁿ for L∞,
N(0, I) for L2), clipped to the box. The reference scales this start by
½·min(best distance so far, eps); it runs a restart only on the examples not yet
broken within eps, whose best distance exceeds eps, so the scale is ½·eps whenever a
restart can change the result — which is why our restarts can be independent and
vmapped. FAB-T runs each of the top-``n_target_classes`` other classes of the clean
prediction as target (a ``lax.scan``); untargeted FAB differentiates all C logits
(C vector–Jacobian products per iteration), FAB-T one difference of logits.

**Output (AutoAttack semantics).** FAB returns minimal perturbations, which may lie
beyond eps; a point found at distance > eps is *not* adversarial at radius eps. The
attack returns, per example, the closest misclassified point found if it lies in the
eps-ball, else x itself (so the output always satisfies the ball and box
constraints). ``return_distance=True`` also returns that smallest distance (inf if
none was found, 0 for an example misclassified already), over all restarts and
targets — the minimal-perturbation result of the paper. On bf16 / f16 images each
candidate x⁽ᵏ⁺¹⁾ is judged (misclassified? how far?) as it would be stored, rounded
to the images' dtype towards x₀; the iterates themselves stay in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.restarts import restart_keys

ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9
_BIG = 1e30


# ---------------------------------------------------------------------- projection
def project_hyperplane_box(t, w, b, norm):
    """Minimal-norm displacement onto a hyperplane within the box, per row.

    Solves, for each row of ``t`` (B, n) in [0, 1], ``w`` (B, n), ``b`` (B,):
      d* = argmin ‖d‖ (L∞ or L2)  s.t.  wᵀ(t + d) = b,  t + d ∈ [0, 1]ⁿ.
    With c = wᵀt − b and s = sign(c) the constraint asks to lower (s·w)ᵀz by |c|. Each
    coordinate moves against s·w_i, by at most its room r_i (t_i if s·w_i > 0, else
    1 − t_i). KKT gives d_i = −sign(s·w_i)·min(λ k_i, r_i) for one λ ≥ 0, k_i = 1 (L∞)
    or |w_i| (L2), and λ solves the piecewise-linear, non-decreasing equation
      F(λ) = Σ_i v_i min(λ, r_i/k_i) = |c|,   v_i = |w_i| k_i,
    found exactly from the sorted breakpoints r_i/k_i (no iteration). If even
    F(∞) < |c| no box point reaches the hyperplane and every coordinate moves by its
    full room (the box corner nearest to it), as the reference does. Coordinates with
    w_i = 0 do not move.
    """
    c = jnp.sum(w * t, axis=-1) - b
    sw = jnp.where(c >= 0, 1.0, -1.0)[:, None] * w
    target = jnp.abs(c)
    room = jnp.where(sw > 0, t, 1.0 - t)
    k = jnp.ones_like(w) if norm == "linf" else jnp.abs(w)
    v = jnp.abs(w) * k
    moves = k > 0
    bp = jnp.where(moves, room / jnp.where(moves, k, 1.0), _BIG)
    bps, vs = lax.sort((bp, v), dimension=-1, num_keys=1)
    n = w.shape[-1]
    cum_vbp = jnp.cumsum(vs * bps, axis=-1)  # Σ_{j ≤ i} v_j bp_j
    tail = jnp.flip(jnp.cumsum(jnp.flip(vs, -1), axis=-1), -1)  # Σ_{j ≥ i} v_j
    tail_after = jnp.concatenate([tail[:, 1:], jnp.zeros_like(tail[:, :1])], axis=-1)
    f_at_bp = cum_vbp + bps * tail_after  # F(bp_(i))
    i = jnp.sum(f_at_bp < target[:, None], axis=-1)  # breakpoints passed before F = |c|
    feasible = i < n
    ii = jnp.minimum(i, n - 1)[:, None]
    a = jnp.where(i > 0, jnp.take_along_axis(cum_vbp, jnp.maximum(ii - 1, 0), -1)[:, 0], 0.0)
    slope = jnp.take_along_axis(tail, ii, -1)[:, 0]
    lam = (target - a) / jnp.maximum(slope, 1e-30)
    step = jnp.where(feasible[:, None], jnp.minimum(lam[:, None] * k, room), room)
    return -jnp.sign(sw) * step


def _norm(d, norm):
    """Per-row L∞ or L2 norm of a flat (B, n) array."""
    if norm == "linf":
        return jnp.max(jnp.abs(d), axis=-1)
    return jnp.sqrt(jnp.sum(d * d, axis=-1))


def _dual_norm(g, norm):
    """‖g‖_q over the last axis, q the dual of the attack norm (L1 for L∞, L2 for L2)."""
    if norm == "linf":
        return jnp.sum(jnp.abs(g), axis=-1)
    return jnp.sqrt(jnp.sum(g * g, axis=-1))


# --------------------------------------------------------------------------- core
def _boundary(logits_fn, x1, y, target, nc, state):
    """Logit differences f_j = z_j − z_y and gradients ∇f_j at x1 (flat (B, n)), and the
    solver state to start the next forward from (``state``: see
    :func:`~deqjax.attacks._common.logits_and_state`; ``()`` for a plain logits function).

    Untargeted (``target`` None): all classes, (B, C) and (B, C, n), f_y excluded by a
    huge value (as the reference). Targeted: only j = target, (B, 1) and (B, 1, n)."""
    shape = x1.shape
    fn = lambda xf: C.logits_and_state(logits_fn, xf.reshape(shape), state)
    xf = x1.reshape(shape[0], math.prod(shape[1:]))
    z, vjp, state = jax.vjp(fn, xf, has_aux=True)
    ey = jax.nn.one_hot(y, nc, dtype=z.dtype)
    if target is None:
        cot = jnp.eye(nc, dtype=z.dtype)[:, None, :] - ey[None]  # (C, B, C)
        (g,) = jax.vmap(vjp)(cot)  # (C, B, n)
        df = z - jnp.sum(z * ey, -1, keepdims=True)
        df = jnp.where(ey > 0, 1e10, df)
        return df, jnp.swapaxes(g, 0, 1), state
    et = jax.nn.one_hot(target, nc, dtype=z.dtype)
    (g,) = vjp(et - ey)
    return jnp.sum(z * (et - ey), -1, keepdims=True), g[:, None], state


def _fab_run(logits_fn, x, y, x_init, target, nc, *, norm, steps, alpha_max, eta, beta):
    """One FAB run from ``x_init``; returns (closest adversarial point, its distance)
    per example, distance inf where none was found (point then x).

    A :class:`~deqjax.attacks.WarmStartLogits` threads its solver state: each
    gradient's solve starts from the previous candidate's solution and each candidate's
    from the gradient point's (consecutive points differ by one FAB step)."""
    b_, shape = x.shape[0], x.shape
    n = math.prod(shape[1:])
    x0 = x.reshape(b_, n)

    def body(s, _):
        x1, best_x, best_d, st = s
        df, dg, st = _boundary(logits_fn, x1.reshape(shape), y, target, nc, st)
        dist = jnp.abs(df) / (_dual_norm(dg, norm) + 1e-12)
        j = jnp.argmin(dist, axis=-1)
        w = jnp.take_along_axis(dg, j[:, None, None], 1)[:, 0]
        f = jnp.take_along_axis(df, j[:, None], 1)[:, 0]
        b = jnp.sum(w * x1, -1) - f  # hyperplane wᵀz = b: the linearised boundary
        cat = lambda u, v: jnp.concatenate([u, v])
        d = project_hyperplane_box(cat(x1, x0), cat(w, w), cat(b, b), norm)
        d1, d2 = d[:b_], d[b_:]
        a1 = jnp.maximum(_norm(d1, norm), 1e-8)
        a2 = jnp.maximum(_norm(d2, norm), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        xn = jnp.clip((1 - alpha) * (x1 + eta * d1) + alpha * (x0 + eta * d2), 0.0, 1.0)
        # the candidate as stored (low-precision images: rounded towards x0, so never
        # farther than xn); the iterates themselves stay unrounded
        xs = C.to_storage(xn, x0, None, "l2")
        zs, st = C.logits_and_state(logits_fn, xs.reshape(shape), st)
        adv = jnp.argmax(zs, -1) != y
        dn = _norm(xs - x0, norm)
        better = adv & (dn < best_d)
        best_x = jnp.where(better[:, None], xs, best_x)
        best_d = jnp.where(better, dn, best_d)
        x1 = jnp.where(adv[:, None], x0 + beta * (xn - x0), xn)
        return (x1, best_x, best_d, st), None

    st0 = C.initial_state(logits_fn, x_init)
    init = (x_init.reshape(b_, n), x0, C.batch_full(x, jnp.inf, x.dtype), st0)
    (_, best_x, best_d, _), _ = C.scan(body, init, None, length=steps)
    return best_x.reshape(shape), best_d


def _restart_start(key, x, eps, norm):
    """x + ½·eps·t/‖t‖ (t uniform in the L∞ cube or Gaussian), clipped to [0, 1]."""
    if norm == "linf":
        t = C.draw(lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0), key, x.shape)
        n = jnp.max(jnp.abs(t.reshape(x.shape[0], math.prod(x.shape[1:]))), -1)
    else:
        t = C.draw(lambda k, s: jax.random.normal(k, s, x.dtype), key, x.shape)
        n = jnp.sqrt(jnp.sum(t.reshape(x.shape[0], math.prod(x.shape[1:])) ** 2, -1))
    return jnp.clip(x + 0.5 * eps * t / C.bcast(jnp.maximum(n, 1e-12), x), 0.0, 1.0)


def _fab_restarts(logits_fn, x, y, key, target, nc, *, eps, norm, restarts, **kw):
    """``restarts`` vmapped runs (restart 0 from x itself); the closest point kept."""
    if restarts == 1:  # no vmap of size 1 around the model
        return _fab_run(logits_fn, x, y, x, target, nc, norm=norm, **kw)
    keys = restart_keys(key, restarts)
    rand = jnp.arange(restarts) > 0

    def one(k, r):
        x_init = jnp.where(r, _restart_start(k, x, eps, norm), x)
        return _fab_run(logits_fn, x, y, x_init, target, nc, norm=norm, **kw)

    xs, ds = jax.vmap(one)(keys, rand)  # (R, B, ...), (R, B)
    best = jnp.argmin(ds, axis=0)
    return C.pick(xs, best), C.pick(ds, best)


def _check_fab(steps, restarts, alpha_max, eta, beta):
    C.check_positive_int("steps", steps)
    C.check_positive_int("restarts", restarts)
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}.")
    if not eta >= 1.0:
        raise ValueError(f"eta (overshoot) must be >= 1, got {eta}.")
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta (backward step) must be in (0, 1], got {beta}.")


def _finish(x, y, logits_fn, best_x, best_d, eps, norm, return_distance):
    """Clean-misclassified examples: distance 0, point x. Then AutoAttack semantics:
    a minimal perturbation beyond eps is not adversarial at eps, return x there."""
    wrong = jnp.argmax(logits_fn(x), -1) != y
    best_d = jnp.where(wrong, 0.0, best_d)
    best_x = C.bwhere(wrong, x, best_x)
    inside = best_d <= eps
    x_adv = C.project(C.bwhere(inside, best_x, x), x, eps, norm)  # guards round-off
    return (x_adv, best_d) if return_distance else x_adv


@C.attack_api(positive_eps=True)
def fab(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    steps=100,
    restarts=1,
    alpha_max=ALPHA_MAX,
    eta=ETA,
    beta=BETA,
    return_distance=False,
):
    """Untargeted FAB (Croce & Hein 2020), L∞ or L2; see the module docstring.

    Args:
      logits_fn, x, y, key, eps, norm: as every attack (``key`` one key or one per
        example; restart 0 uses no randomness).
      steps: FAB iterations per restart (each: C+1 gradients' worth of work, 1 forward).
      restarts: vmapped runs; restart 0 from x, the others from random points at
        distance eps/2; the closest adversarial point over all runs is kept.
      alpha_max, eta, beta: the step bias cap, overshoot and backward step.
      return_distance: also return the smallest distance found per example (B,).

    Returns:
      x_adv (B, ...) in [0, 1] ∩ B_eps(x): the closest misclassified point found if
      within eps, else x (and the distances if asked).
    """
    nc = C.num_classes(logits_fn, x)
    _check_fab(steps, restarts, alpha_max, eta, beta)
    kw = dict(steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
    bx, bd = _fab_restarts(
        logits_fn, x, y, key, None, nc, eps=eps, norm=norm, restarts=restarts, **kw
    )
    return _finish(x, y, logits_fn, bx, bd, eps, norm, return_distance)


@C.attack_api(positive_eps=True)
def fab_targeted(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    steps=100,
    n_target_classes=9,
    restarts=1,
    alpha_max=ALPHA_MAX,
    eta=ETA,
    beta=BETA,
    return_distance=False,
    targets=None,
):
    """FAB-T (AutoAttack's targeted FAB): FAB against each of the top-``n_target_classes``
    other classes of the clean prediction, the closest adversarial point over all kept.

    ``n_target_classes`` must lie in [1, C−1]. ``targets``: indices j ∈ [0, k) of the
    targets to run (default all); target j uses the j-th of ``split(key, k)`` whichever
    targets run, so running them one at a time (the compacting ensemble) reproduces
    each target's run. Other arguments and the output as :func:`fab`.
    """
    nc = C.num_classes(logits_fn, x)
    _check_fab(steps, restarts, alpha_max, eta, beta)
    k = C.check_positive_int("n_target_classes", n_target_classes)
    if k > nc - 1:
        raise ValueError(
            f"n_target_classes={k} is out of range: the logits have {nc} classes, so at "
            f"most {nc - 1} other classes can be targets; pass n_target_classes <= {nc - 1}."
        )
    js = C.target_indices(targets, k)
    clean = logits_fn(x)
    keys = C.split_key(key, k)[js]
    kw = dict(steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)

    def body(carry, inp):
        bx, bd = carry
        j, kj = inp
        tx, td = _fab_restarts(
            logits_fn,
            x,
            y,
            kj,
            C.target_class(clean, j),
            nc,
            eps=eps,
            norm=norm,
            restarts=restarts,
            **kw,
        )
        closer = td < bd
        return (C.bwhere(closer, tx, bx), jnp.where(closer, td, bd)), None

    init = (x, C.batch_full(x, jnp.inf, x.dtype))
    (bx, bd), _ = C.scan(body, init, (js, keys))
    return _finish(x, y, logits_fn, bx, bd, eps, norm, return_distance)
