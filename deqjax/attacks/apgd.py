"""Auto-PGD (APGD-CE, APGD-DLR) and targeted APGD-T.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020, Algorithm 1:

  η⁽⁰⁾ = 2·eps,  x⁽¹⁾ = Π(x⁽⁰⁾ + η s(∇f(x⁽⁰⁾)))
  z⁽ᵏ⁺¹⁾ = Π(x⁽ᵏ⁾ + η⁽ᵏ⁾ s(∇f(x⁽ᵏ⁾)))
  x⁽ᵏ⁺¹⁾ = Π(x⁽ᵏ⁾ + α(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾)),  α = 0.75,

s = sign (L∞) or g/‖g‖₂ (L2). Checkpoints w_j = ⌈p_j N⌉ with p₀ = 0, p₁ = 0.22,
p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06). At a checkpoint the step is halved
and the iterate restarted from the best point x_max (and its gradient) when
  (1) Σ_{i=w_{j−1}}^{w_j−1} 1[f(x⁽ⁱ⁺¹⁾) > f(x⁽ⁱ⁾)] < ρ·(w_j − w_{j−1}),  ρ = 0.75, or
  (2) η was not reduced at w_{j−1} and f_max did not improve since w_{j−1}.
All state (η, counters, best points) is per example; the loop is a ``lax.scan``.
The returned point is the lowest-margin misclassified iterate if one was found,
else the highest-loss iterate **(choice, as the reference code)**.

APGD-T runs APGD on the targeted DLR loss for each of the top-k (default 9)
non-top classes of the clean prediction (``lax.scan`` over targets) and keeps the
per-example worst case.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from deqjax.attacks import _common as C
from deqjax.attacks.restarts import run_with_restarts

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int):
    """Checkpoint iterations w_1 < w_2 < … ≤ steps (Croce & Hein 2020, Sec. 3.2)."""
    p = [0.0, 0.22]
    while True:
        nxt = round(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06), 10)  # no float drift
        if nxt > 1.0:
            break
        p.append(nxt)
    w = sorted({max(1, math.ceil(pj * steps)) for pj in p[1:]})
    return [wj for wj in w if wj <= steps]


def _schedule(steps):
    """Static per-iteration arrays: is-checkpoint flag, interval length, momentum."""
    ws = checkpoints(steps)
    is_ck = np.zeros(steps, bool)
    length = np.ones(steps, np.float32)
    prev = 0
    for wj in ws:
        is_ck[wj - 1] = True  # check after the iterate x^(wj)
        length[wj - 1] = wj - prev
        prev = wj
    mom = np.full(steps, MOMENTUM, np.float32)
    mom[0] = 1.0  # first step has no momentum
    return jnp.asarray(is_ck), jnp.asarray(length), jnp.asarray(mom)


def apgd_core(
    logits_fn,
    x,
    y,
    key,
    loss_fn,
    extra=(),
    *,
    eps,
    norm,
    steps,
    rand_init=True,
    select_fn=None,
    state0=None,
):
    """APGD maximising per-example ``loss_fn(logits, y, *extra)``; returns
    ``(x_adv, loss_trace (steps+1, B))``. Inputs must be validated by the caller.
    ``select_fn`` (default ``logits_fn``) chooses the returned iterate; the iterates
    themselves depend on ``logits_fn`` only. For a
    :class:`~deqjax.attacks.WarmStartLogits`, each iterate's solve starts from the
    previous iterate's solution, the first from ``state0`` (default: cold)."""
    lg = C.loss_grad_state(logits_fn, loss_fn)
    is_ck, length, mom = _schedule(steps)
    x0 = C.random_start(key, x, eps, norm) if rand_init else x
    st0 = C.initial_state(logits_fn, x0) if state0 is None else state0
    f0, z0, g0, st0 = lg(x0, y, st0, *extra)

    def selected(xk, fk, zk):  # loss and margin that choose the returned iterate
        if select_fn is None:
            return fk, C.margin(zk, y)
        zs = select_fn(lax.stop_gradient(xk))
        return loss_fn(zs, y, *extra), C.margin(zs, y)

    fs0, m0 = selected(x0, f0, z0)
    eta0 = C.batch_full(x, 2.0 * eps, x.dtype)
    zeros = C.batch_full(x, 0.0, x.dtype)
    init = dict(
        xc=x0,
        xp=x0,
        g=g0,
        f=f0,
        xb=x0,
        fb=f0,
        gb=g0,
        eta=eta0,
        succ=zeros,
        fb_last=f0,
        red_last=C.batch_full(x, False, bool),
        xr=x0,
        fr=fs0,
        mr=m0,
        st=st0,
    )

    def body(s, inp):
        ck, L, a = inp
        eta = C.bcast(s["eta"], x)
        zk = C.project(s["xc"] + eta * C.ascent_direction(s["g"], norm), x, eps, norm)
        xn = C.project(s["xc"] + a * (zk - s["xc"]) + (1 - a) * (s["xc"] - s["xp"]), x, eps, norm)
        fn, zn, gn, st = lg(xn, y, s["st"], *extra)
        fs, ms = selected(xn, fn, zn)
        succ = s["succ"] + (fn > s["f"]).astype(x.dtype)
        imp = fn > s["fb"]
        xb, fb, gb = (
            C.bwhere(imp, xn, s["xb"]),
            jnp.where(imp, fn, s["fb"]),
            C.bwhere(imp, gn, s["gb"]),
        )
        # returned point: lowest-margin misclassified, else highest loss
        better = jnp.where((ms < 0) | (s["mr"] < 0), ms < s["mr"], fs > s["fr"])
        xr, fr, mr = (
            C.bwhere(better, xn, s["xr"]),
            jnp.where(better, fs, s["fr"]),
            jnp.where(better, ms, s["mr"]),
        )
        # checkpoint: halve the step and restart from the best point
        cond1 = succ < RHO * L
        cond2 = (~s["red_last"]) & (s["fb_last"] >= fb)
        red = ck & (cond1 | cond2)
        new = dict(
            xp=s["xc"],
            xc=C.bwhere(red, xb, xn),
            g=C.bwhere(red, gb, gn),
            f=jnp.where(red, fb, fn),
            xb=xb,
            fb=fb,
            gb=gb,
            eta=jnp.where(red, 0.5 * s["eta"], s["eta"]),
            succ=jnp.where(ck, 0.0, succ),
            fb_last=jnp.where(ck, fb, s["fb_last"]),
            red_last=jnp.where(ck, red, s["red_last"]),
            xr=xr,
            fr=fr,
            mr=mr,
            st=st,
        )
        return new, fn

    s, trace = C.scan(body, init, (is_ck, length, mom))
    return s["xr"], jnp.concatenate([f0[None], trace], axis=0)


def _apgd_single(
    logits_fn, x, y, key, *, eps, norm, steps, loss, rand_init, return_trace, select_fn=None
):
    nc = C.num_classes(logits_fn, x)
    steps = C.check_positive_int("steps", steps)
    x_adv, trace = apgd_core(
        logits_fn,
        x,
        y,
        key,
        C.get_loss(loss, nc),
        eps=eps,
        norm=norm,
        steps=steps,
        rand_init=rand_init,
        select_fn=select_fn,
    )
    return (x_adv, trace) if return_trace else x_adv


@C.attack_api()
def apgd(
    logits_fn,
    x,
    y,
    key,
    *,
    eps,
    norm="linf",
    steps=100,
    loss="ce",
    restarts=1,
    rand_init=True,
    return_trace=False,
    select_fn=None,
):
    """APGD-CE / APGD-DLR (Croce & Hein 2020). ``steps`` gradient steps per restart
    (static); ``restarts`` vmapped independent restarts, per-example worst case kept.
    Returns x_adv in [0, 1] ∩ B_eps(x) (and the (steps+1, B) loss trace if asked).
    ``select_fn``: the logits that choose the returned iterate and restart (default
    ``logits_fn``; see :func:`deqjax.attacks.pgd`)."""
    return run_with_restarts(
        _apgd_single,
        restarts,
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        norm=norm,
        steps=steps,
        loss=loss,
        rand_init=rand_init,
        return_trace=return_trace,
        select_fn=select_fn,
    )


def _apgd_t_single(
    logits_fn, x, y, key, *, eps, norm, steps, n_target_classes, rand_init, targets, select_fn=None
):
    nc = C.num_classes(logits_fn, x)
    steps = C.check_positive_int("steps", steps)
    k = C.check_positive_int("n_target_classes", n_target_classes)
    if nc < 4:
        raise ValueError(
            f"APGD-T uses the targeted DLR loss, which needs >= 4 classes; "
            f"logits have {nc}. Use apgd(..., loss='ce') instead."
        )
    k = min(k, nc - 1)
    js = C.target_indices(targets, k)
    # for a WarmStartLogits, every target's first solve starts from the clean solution
    clean, clean_state = C.logits_and_state(logits_fn, x, C.initial_state(logits_fn, x))
    keys = C.split_key(key, k)[js]

    def body(x_worst, inp):
        j, kk = inp
        xa, _ = apgd_core(
            logits_fn,
            x,
            y,
            kk,
            C.targeted_dlr_loss,
            (C.target_class(clean, j),),
            eps=eps,
            norm=norm,
            steps=steps,
            rand_init=rand_init,
            select_fn=select_fn,
            state0=clean_state,
        )
        return C.keep_worst(select_fn or logits_fn, x_worst, xa, y), None

    x_worst, _ = C.scan(body, x, (js, keys))
    return x_worst


@C.attack_api()
def apgd_targeted(
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
    rand_init=True,
    targets=None,
    select_fn=None,
):
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss against each of the
    top-``n_target_classes`` other classes (capped at C−1); per-example worst case.

    ``targets``: indices j ∈ [0, k) of the targets to run (default all; see
    :func:`deqjax.attacks._common.target_indices`). Target j draws from the j-th of
    ``split(key, k)`` whichever targets run, so running the targets one at a time
    (the compacting ensemble) reproduces each target's run of the full attack.
    ``select_fn``: the logits that choose the returned iterate, target and restart
    (default ``logits_fn``; see :func:`deqjax.attacks.pgd`)."""
    return run_with_restarts(
        _apgd_t_single,
        restarts,
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        norm=norm,
        steps=steps,
        n_target_classes=n_target_classes,
        rand_init=rand_init,
        targets=targets,
        select_fn=select_fn,
    )
