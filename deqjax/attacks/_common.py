"""Shared pieces of the attack suite: validation, projections, losses, steps.

Every attack in :mod:`deqjax.attacks` is a pure function
``attack(logits_fn, x, y, key, *, eps, norm, ...) -> x_adv`` where
``logits_fn(x_batch) -> (B, C)`` is any JAX function. The helpers here are the
pieces they share; :func:`attack_api` is the one entry every public attack goes
through. Shape / name / sign checks run in Python at trace time. Value checks
(``eps`` finite and >= 0, ``x`` finite in [0, 1], labels in range) raise a plain
``ValueError`` when the values are concrete; when they are traced (under ``jax.jit``)
they run inside the program and raise when it runs (:func:`raise_if`; switch them off
with :func:`set_runtime_checks` or ``DEQJAX_RUNTIME_CHECKS=0``).

**Precision.** Images may be bfloat16 / float16 (and the model too): an attack computes
in at least float32 (:func:`compute_dtype`), calls the model on its iterates cast to
the images' dtype, and returns ``x_adv`` in the images' dtype. Every point it keeps is
rounded to that dtype *towards x* (:func:`to_storage`), so ``x_adv`` lies in [0, 1]
and in the eps-ball exactly as stored, and the model saw exactly the returned point.

**Sharding.** Under an Explicit-axis mesh the labels and per-example keys are
resharded like the batch of ``x`` and per-example constants are created with its
sharding (:func:`batch_full`); inside ``jax.shard_map`` (default ``check_vma=True``)
loop carries are cast to vary over the mesh axes the loop body's outputs vary over
(:func:`scan`). With per-example keys sharded with the batch, a sharded attack equals
the unsharded one.

A ``logits_fn`` may also be a :class:`WarmStartLogits`: a model whose forward is an
iterative solve (a DEQ) and that can start it from a state carried between calls.
PGD and APGD then start each iterate's solve from the previous iterate's solution
(see :class:`WarmStartLogits`); every other use of it is its cold forward.

Losses follow Croce & Hein, "Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks", ICML 2020 (DLR, targeted DLR)
and Andriushchenko et al., "Square Attack", ECCV 2020 (margin loss).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from deqjax.solvers import (
    batch_axis_spec,
    batch_sharded_like,
    manual_axes,
    vary_over,
    varying_axes,
)

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr")
_TINY = 1e-12


# ----------------------------------------------------------------- runtime checks
def _env_checks() -> bool:
    return os.environ.get("DEQJAX_RUNTIME_CHECKS", "1").strip().lower() not in (
        "0",
        "false",
        "off",
        "no",
    )


_RUNTIME_CHECKS = [_env_checks()]


def set_runtime_checks(enabled: bool) -> None:
    """Turn the in-program value checks of traced arguments on (default) or off.

    Read when an attack is traced: JAX caches a function's trace, so a function traced
    before the call (even wrapped in a new ``jax.jit``) keeps the checks it was traced
    with. ``DEQJAX_RUNTIME_CHECKS=0`` (or false/off/no) in the environment sets the
    default at import. Concrete (non-traced) bad values raise either way."""
    _RUNTIME_CHECKS[0] = bool(enabled)


def runtime_checks_enabled() -> bool:
    return _RUNTIME_CHECKS[0]


_SUSPENDED = contextvars.ContextVar("deqjax_attack_checks_suspended", default=False)


@contextlib.contextmanager
def checks_done():
    """Within the block, :func:`raise_if` adds nothing: the values were checked once
    already (the ensemble checks its inputs, then runs its attacks on them)."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def raise_if(conds) -> None:
    """Raise ``ValueError(message)`` when the program runs and a traced ``bad`` is True.

    ``conds``: ``[(bad, message, values), ...]`` with ``bad`` a traced scalar bool and
    ``message.format(*values)`` the error (``values``: traced scalars). One host
    callback, inside a ``lax.cond``: a run without errors only evaluates the
    predicates. The callback is ``jax.debug.callback(partitioned=True)``, an effect (no
    output to tie, never removed as dead code) that every device of a partitioned
    program runs: a callback on one device only (``jax.pure_callback``, as
    ``equinox.error_if`` uses) raises there while the others wait in their next
    collective (on CPU the process aborts after 40 s). Inside ``shard_map`` each device
    checks its own shard (no collective: an attack may run inside per-device control
    flow). Under ``vmap`` the ``cond`` becomes a select, so the callback decides from
    the predicates it receives."""
    conds = [c for c in conds if c is not None]
    if not conds or not runtime_checks_enabled() or _SUSPENDED.get():
        return
    bads = jnp.stack([jnp.asarray(b, bool) for b, _, _ in conds])
    vals = [
        jnp.stack([jnp.asarray(v, jnp.float32) for v in vs] or [jnp.zeros(())]) for *_, vs in conds
    ]
    msgs = [m for _, m, _ in conds]

    def report(bads, *vals):  # under vmap, called once per batch element
        for bad, msg, v in zip(np.asarray(bads), msgs, vals):
            if bad:
                raise ValueError(msg.format(*np.asarray(v).tolist()))

    def fail():
        jax.debug.callback(report, bads, *vals, partitioned=True)

    lax.cond(jnp.any(bads), fail, lambda: None)


# ------------------------------------------------------------------------- checks
def is_concrete(a) -> bool:
    """True when ``a`` holds concrete values (not a tracer under jit/vmap/grad)."""
    return not isinstance(a, jax.core.Tracer)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {NORMS}.")
    return norm


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; use one of {LOSSES}.")
    return loss


def _eps_conds(eps, positive: bool):
    """Checks of a traced ``eps``: (bad, message, values) triples."""
    e = jnp.asarray(eps, jnp.float32)
    return [
        (~jnp.isfinite(e), "eps must be finite, got {:.4g}; pass e.g. eps=8/255.", (e,)),
        (e < 0, "eps must be >= 0, got {:.4g}; pass a non-negative radius.", (e,)),
    ] + (
        [(~(e > 0), "FAB needs eps > 0 (it scales the random restarts), got {:.4g}.", (e,))]
        if positive
        else []
    )


def check_eps(eps, positive: bool = False):
    """Reject negative or NaN radii (``positive``: also 0). Concrete ``eps``: a
    ``ValueError`` now; traced: the checks to run in the program (see
    :func:`raise_if`), returned as a list."""
    if not is_concrete(eps):
        if jnp.ndim(eps) != 0:
            raise ValueError(f"eps must be a scalar, got shape {jnp.shape(eps)}.")
        return _eps_conds(eps, positive)
    e = np.asarray(eps)
    if e.ndim != 0:
        raise ValueError(f"eps must be a scalar, got shape {e.shape}.")
    if not np.isfinite(e):
        raise ValueError(f"eps must be finite, got {float(e)}; pass e.g. eps=8/255.")
    if e < 0:
        raise ValueError(f"eps must be >= 0, got {float(e)}; pass a non-negative radius.")
    if positive and not e > 0:
        raise ValueError(
            f"FAB needs eps > 0 (it scales the random restarts and decides which "
            f"minimal perturbations count), got {float(e)}."
        )
    return []


def check_nonnegative(name: str, v):
    """``v >= 0`` (e.g. a step size: a negative one would descend). Concrete: a
    ``ValueError`` now; traced: the check to run in the program (a list, see
    :func:`raise_if`)."""
    if v is None:
        return []
    if is_concrete(v):
        if not np.all(np.asarray(v) >= 0):
            raise ValueError(f"{name} must be >= 0, got {v}.")
        return []
    v = jnp.asarray(v)
    return [(jnp.any(~(v >= 0)), f"{name} must be >= 0, got {{:.4g}}.", (jnp.min(v),))]


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be a static Python int >= {minimum}, got {v!r}.")
    return int(v)


def num_classes(logits_fn, x) -> int:
    """C of ``logits_fn(x) -> (B, C)``, from its shape (``jax.eval_shape``: no FLOPs).
    An empty batch is probed with one example (models often reshape to (B, -1))."""
    probe = x if x.shape[0] else jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
    out = jax.eval_shape(logits_fn, probe)
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != probe.shape[0]:
        raise ValueError(
            "logits_fn(x) must return logits of shape (B, C) = "
            f"({x.shape[0]}, C), got {getattr(out, 'shape', type(out))}."
        )
    return int(out.shape[1])


def empty_result(run, x):
    """What ``run(x_batch)`` returns for the empty batch ``x``, without calling it on
    an empty batch (models often reshape to (B, -1)): shapes from tracing it on 1 and 2
    examples (the axes that change are batch axes, made 0), ``x`` for ``x_adv``."""
    shapes = [
        jax.eval_shape(run, jax.ShapeDtypeStruct((b,) + x.shape[1:], x.dtype)) for b in (1, 2)
    ]

    def empty(s1, s2):
        shape = tuple(0 if a != b else a for a, b in zip(s1.shape, s2.shape))
        return jnp.zeros(shape, s1.dtype)

    out = jax.tree.map(empty, *shapes)
    if isinstance(out, tuple):
        return (x.astype(out[0].dtype),) + tuple(out[1:])
    return x.astype(out.dtype)


def _value_conds(x, y, nc):
    """Checks of traced ``x`` / ``y`` values (see :func:`check_inputs`)."""
    conds = []
    if not is_concrete(x) and x.size:
        lo, hi = jnp.min(x).astype(jnp.float32), jnp.max(x).astype(jnp.float32)
        conds.append(
            (
                ~jnp.all(jnp.isfinite(x)),
                "x contains NaN or inf; attacks need finite inputs in [0, 1].",
                (),
            )
        )
        conds.append(
            (
                (lo < 0) | (hi > 1),
                "x must lie in [0, 1], got range [{:.4g}, {:.4g}]; rescale your images "
                "(e.g. divide uint8 images by 255).",
                (lo, hi),
            )
        )
    if not is_concrete(y) and y.size:
        lo, hi = jnp.min(y), jnp.max(y)
        conds.append(
            (
                (lo < 0) | (hi >= nc),
                f"labels must lie in [0, {nc - 1}] (logits have {nc} classes), got range "
                "[{:.0f}, {:.0f}].",
                (lo, hi),
            )
        )
    return conds


def check_inputs(logits_fn, x, y, *, traced_checks: bool = False) -> int:
    """Validate ``x`` (B, ...) and ``y`` (B,); return the number of classes C.

    Shapes are checked at trace time (``jax.eval_shape`` of ``logits_fn``, which
    costs no FLOPs); values now when concrete, and with ``traced_checks`` in the
    program when traced (see :func:`raise_if`).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be batched with shape (B, ...), got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"x must be floating point in [0, 1], got dtype {x.dtype}; "
            "convert e.g. with x.astype(jnp.float32) / 255."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.shape}.")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}.")
    nc = num_classes(logits_fn, x)
    if is_concrete(x):
        xv = np.asarray(x, np.float32)
        if not np.all(np.isfinite(xv)):
            raise ValueError("x contains NaN or inf; attacks need finite inputs in [0, 1].")
        if xv.size and (xv.min() < 0.0 or xv.max() > 1.0):
            raise ValueError(
                f"x must lie in [0, 1], got range [{xv.min():.4g}, {xv.max():.4g}]; "
                "rescale your images (e.g. divide uint8 images by 255)."
            )
    if is_concrete(y):
        yv = np.asarray(y)
        if yv.size and (yv.min() < 0 or yv.max() >= nc):
            raise ValueError(
                f"labels must lie in [0, {nc - 1}] (logits have "
                f"{nc} classes), got range [{yv.min()}, {yv.max()}]."
            )
    if traced_checks:
        raise_if(_value_conds(x, y, nc))
    return nc


_NO_KEY = object()


def validate(logits_fn, x, y, eps, norm, key=_NO_KEY, *, positive_eps=False, nonnegative=None):
    """All standard attack checks (one :func:`raise_if` for the traced ones);
    ``nonnegative``: further ``{name: value}`` that must be >= 0 (e.g. a step size).

    Returns ``(x, y, num_classes)``, or ``(x, y, num_classes, key)`` when ``key`` is
    given, as JAX arrays; under an Explicit mesh ``y`` and per-example keys are
    resharded like the batch of ``x``."""
    check_norm(norm)
    conds = check_eps(eps, positive_eps)
    x, y = jnp.asarray(x), jnp.asarray(y)
    if key is not _NO_KEY:
        key = check_key(key, x.shape[0])
    for name, v in (nonnegative or {}).items():
        conds = conds + check_nonnegative(name, v)
    nc = check_inputs(logits_fn, x, y, traced_checks=False)
    raise_if(conds + _value_conds(x, y, nc))
    y = batch_sharded_like(y, x)
    if key is _NO_KEY:
        return x, y, nc
    return x, y, nc, (batch_sharded_like(key, x) if is_batched_key(key) else key)


# ------------------------------------------------------------------- mixed precision
_STORAGE = contextvars.ContextVar("deqjax_attack_storage_dtype", default=None)


def compute_dtype(dtype):
    """The dtype an attack computes in: at least float32 (bf16 / f16 images upcast)."""
    return jnp.promote_types(dtype, jnp.float32)


@contextlib.contextmanager
def storage_dtype(dtype):
    """Within the block, :func:`to_storage` rounds to ``dtype`` (None: no rounding)."""
    token = _STORAGE.set(dtype)
    try:
        yield
    finally:
        _STORAGE.reset(token)


def _storage_of(p):
    dt = _STORAGE.get()
    return None if dt is None or jnp.dtype(dt) == p.dtype else jnp.dtype(dt)


def to_storage(p, x, eps, norm):
    """Round ``p`` (feasible: in the box and the ball around ``x``) to the images'
    storage dtype, each coordinate **towards x**; identity when the attack computes
    in the images' dtype. Round to nearest, then move every coordinate the rounding
    pushed away from ``x`` one ulp back (``nextafter`` towards ``x``, itself
    representable): every |p_i − x_i| can only shrink, so the box and both norms'
    balls hold as stored. For L∞ a coordinate still beyond eps (``p`` itself over by
    round-off) moves one more ulp in. Returned in ``p``'s dtype, exactly representable
    in the storage dtype."""
    dt = _storage_of(p)
    if dt is None:
        return p
    r = p.astype(dt)
    xr = x.astype(dt)
    rf = r.astype(p.dtype)
    over = jnp.abs(rf - x) > jnp.abs(p - x)
    r = jnp.where(over, jnp.nextafter(r, xr), r)
    if norm == "linf":
        r = jnp.where(jnp.abs(r.astype(p.dtype) - x) > eps, jnp.nextafter(r, xr), r)
    return r.astype(p.dtype)


def with_dtypes(logits_fn, in_dtype, out_dtype):
    """``logits_fn`` called on inputs cast to ``in_dtype`` (the images') and returning
    logits cast to ``out_dtype`` (the attack's); keeps a :class:`WarmStartLogits` one."""
    if logits_fn is None:
        return None
    if isinstance(logits_fn, WarmStartLogits):
        ws = logits_fn

        def apply(x, state):
            z, new = ws.apply(x.astype(in_dtype), state)
            return z.astype(out_dtype), new

        # (replace keeps tol and merge_gradient)
        init = lambda x: ws.init(x.astype(in_dtype))
        return dataclasses.replace(ws, init=init, apply=apply)
    return lambda x: logits_fn(x.astype(in_dtype)).astype(out_dtype)


def attack_api(*, needs_key: bool = True, positive_eps: bool = False, nonnegative=()):
    """Decorator of a public attack ``fn(logits_fn, x, y, key, *, eps, norm, **kw)``:
    validates everything once (:func:`validate`; ``needs_key``: ``key`` must be a PRNG
    key; ``positive_eps``: eps > 0; ``nonnegative``: names of keyword arguments that
    must be >= 0), then runs ``fn`` in the compute dtype (:func:`compute_dtype`) with
    ``logits_fn`` (and a ``select_fn`` in ``kw``) seeing the images' dtype, the storage
    rounding of :func:`to_storage` on, and returns ``x_adv`` in the images' dtype
    (further outputs, e.g. traces, stay in the compute dtype)."""

    def deco(fn):
        @functools.wraps(fn)
        def attack(logits_fn, x, y, key=None, *, eps, norm="linf", **kw):
            checks = dict(
                positive_eps=positive_eps, nonnegative={n: kw.get(n) for n in nonnegative}
            )
            if needs_key:
                x, y, _, key = validate(logits_fn, x, y, eps, norm, key, **checks)
            else:
                x, y, _ = validate(logits_fn, x, y, eps, norm, **checks)
            if x.shape[0] == 0:  # nothing to attack, and the model is not called
                y0, k0 = jnp.zeros((), y.dtype), jax.random.PRNGKey(0)
                dummy = lambda xb: attack(
                    logits_fn, xb, jnp.full(xb.shape[:1], y0), k0, eps=eps, norm=norm, **kw
                )
                return empty_result(dummy, x)
            dt = x.dtype
            ct = compute_dtype(dt)
            f = with_dtypes(logits_fn, dt, ct)
            if kw.get("select_fn") is not None:
                kw["select_fn"] = with_dtypes(kw["select_fn"], dt, ct)
            with storage_dtype(None if ct == dt else dt):
                out = fn(f, x.astype(ct), y, key, eps=eps, norm=norm, **kw)
            if isinstance(out, tuple):
                return (out[0].astype(dt),) + tuple(out[1:])
            return out.astype(dt)

        return attack

    return deco


# ------------------------------------------------------------------------ sharding
def replicate(a):
    """``a`` replicated under an Explicit mesh (for a gather / sort along the batch)."""
    if all(p is None for p in (getattr(jax.typeof(a).sharding, "spec", None) or ())):
        return a
    return jax.sharding.reshard(a, P())


def shard_rows_like(a, x):
    """``a`` (n, ...) with its rows sharded as ``x``'s batch under an Explicit mesh when
    the mesh axes divide n (else unchanged)."""
    want = batch_axis_spec(x)
    if want is None:
        return a
    mesh = jax.sharding.get_abstract_mesh()
    size = math.prod(mesh.shape[ax] for ax in (want if isinstance(want, tuple) else (want,)))
    return batch_sharded_like(a, x) if a.shape[0] % size == 0 else a


def batch_full(x, value, dtype=None):
    """A per-example (B,) array of ``value``, sharded like ``x``'s batch axis (Explicit
    mesh), so that it can meet per-example results in ``jnp.where`` / loop carries."""
    want = batch_axis_spec(x)
    return jnp.full(x.shape[:1], value, dtype, out_sharding=None if want is None else P(want))


def _loop_types(body, init, xs):
    """``init`` cast, leaf by leaf, to vary over the ``shard_map`` axes the leaf varies
    over in the output of ``body(init, xs[0])`` (to a fixed point: a leaf may vary
    because another does). No-op outside ``shard_map``."""
    if not manual_axes():
        return init
    x0 = None if xs is None else jax.tree.map(lambda a: a[0], xs)
    for _ in range(len(jax.tree.leaves(init)) + 1):
        out = jax.eval_shape(lambda c, x: body(c, x)[0], init, x0)
        want = jax.tree.map(lambda i, o: varying_axes(i) | varying_axes(o), init, out)
        if all(w == varying_axes(i) for w, i in zip(jax.tree.leaves(want), jax.tree.leaves(init))):
            return init
        init = jax.tree.map(lambda i, w: vary_over(i, w), init, want)
    return init


def scan(body, init, xs=None, length=None):
    """``lax.scan`` whose carry is typed to work inside ``jax.shard_map`` with its
    default ``check_vma=True``: a carry built from constants (per-example losses, step
    sizes, counters) is invariant across the mesh while the body's output varies over
    the axes the data (or the keys, or the model) vary over (see :func:`_loop_types`)."""
    return lax.scan(body, _loop_types(body, init, xs), xs, length=length)


# ---------------------------------------------------------------------------- keys
# An attack's ``key`` is either ONE PRNG key (raw uint32 (2,) or typed ()), from which
# batch-shaped noise is drawn, or one key PER EXAMPLE (raw (B, 2) or typed (B,)), from
# which each example's noise is drawn separately. With per-example keys an example's
# random draws do not depend on which other examples share its batch or where it sits
# in it, so a batch can be reordered or split (the compacting ensemble) without
# changing any example's result. One key reproduces the previous draws bit for bit.
def _is_typed(key) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def is_batched_key(key) -> bool:
    """True for per-example keys (raw (B, 2) / typed (B,)), False for one key."""
    return key.ndim == (1 if _is_typed(key) else 2)


def check_key(key, batch: int):
    """Check ``key`` is one PRNG key or ``batch`` per-example keys; return it as an array."""
    if key is None or isinstance(key, (bool, int, float, np.integer, np.floating)):
        raise TypeError(
            f"key must be a PRNG key, e.g. jax.random.key(0) or jax.random.PRNGKey(0) (or "
            f"one key per example, example_keys(key, {batch})), got {key!r}."
        )
    key = jnp.asarray(key)
    if not (_is_typed(key) or key.dtype == jnp.uint32):
        raise TypeError(
            f"key must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0): a typed "
            f"key or uint32 key data), got an array of dtype {key.dtype}."
        )
    base = 0 if _is_typed(key) else 1
    if key.ndim not in (base, base + 1) or (not _is_typed(key) and key.shape[-1] != 2):
        raise ValueError(
            f"key must be one PRNG key (jax.random.PRNGKey(0)) or one key per example "
            f"(shape ({batch}, 2)), got shape {key.shape}."
        )
    if is_batched_key(key) and key.shape[0] != batch:
        raise ValueError(
            f"per-example keys must number the examples: got {key.shape[0]} keys for a "
            f"batch of {batch}; build them with example_keys(key, {batch})."
        )
    return key


def example_keys(key, n: int):
    """``n`` per-example keys ``fold_in(key, i)``, i = 0 … n−1 (example i's key depends
    only on ``key`` and its index i, not on the batch it is attacked in)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def split_key(key, n: int):
    """``jax.random.split`` for one or per-example keys; the new axis comes first."""
    if is_batched_key(key):
        return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(key), 0, 1)
    return jax.random.split(key, n)


def draw(sampler, key, shape):
    """``sampler(key, shape)`` with one key, or per example ``sampler(key_i, shape[1:])``."""
    if is_batched_key(key):
        return jax.vmap(lambda k: sampler(k, shape[1:]))(key)
    return sampler(key, shape)


# ------------------------------------------------------------------------- targets
def target_indices(targets, k: int):
    """Indices j ∈ [0, k) of the targets a targeted attack runs (default: all k, in
    order). Target j is the class with the (j+2)-th highest clean logit (j = 0: the
    runner-up), as in AutoAttack's APGD-T / FAB-T. Traced indices are allowed (the
    compacting ensemble runs one target at a time); concrete ones are range-checked."""
    if targets is None:
        return jnp.arange(k)
    t = jnp.atleast_1d(jnp.asarray(targets))
    if t.ndim != 1 or not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"targets must be integer indices in [0, {k}), got {targets!r}.")
    if is_concrete(t) and t.size and (int(t.min()) < 0 or int(t.max()) >= k):
        raise ValueError(
            f"targets must lie in [0, {k}) (n_target_classes={k}), got {np.asarray(t)}."
        )
    return t


def argsort_rows(a):
    """``jnp.argsort(a, axis=-1, stable=True)``, with the index operand created with
    ``a``'s sharding (``jnp.argsort``'s own is replicated, which an Explicit mesh
    rejects)."""
    iota = lax.broadcasted_iota(jnp.int32, a.shape, a.ndim - 1, out_sharding=jax.typeof(a).sharding)
    return lax.sort((a, iota), dimension=a.ndim - 1, is_stable=True, num_keys=1)[1]


def pick(stack, idx, axis=1):
    """Per example, the entry of ``stack``'s leading axis (restarts) that ``idx`` (B,)
    names; ``axis``: the batch axis of ``stack``. Selects (``jnp.where``) instead of a
    gather, so the result is sharded like the batch."""
    shape = [1] * (stack.ndim - 1)
    shape[axis - 1] = -1
    sel = jnp.reshape(idx, shape)
    out = stack[0]
    for r in range(1, stack.shape[0]):
        out = jnp.where(sel == r, stack[r], out)
    return out


def target_class(clean_logits, j):
    """Per example, the class with the (j+2)-th highest clean logit (j may be traced)."""
    order = argsort_rows(clean_logits)  # ascending
    return jnp.take(order, clean_logits.shape[-1] - 2 - j, axis=-1)


# ------------------------------------------------------------------------ geometry
def _bnorm(d):
    """Per-example L2 norm, broadcastable against ``d``."""
    axes = tuple(range(1, d.ndim))
    return jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))


def project(x_adv, x, eps, norm):
    """Project ``x_adv`` onto {‖x_adv − x‖ ≤ eps} ∩ [0, 1]^n.

    Ball projection then box clip. Since ``x`` is in the box, clipping moves each
    coordinate of δ toward 0, so the result stays inside the ball in both norms
    (it is the exact projection onto the intersection for L∞; for L2 it is the
    usual feasible approximation). Inside an attack on low-precision images the
    result is rounded to their dtype towards ``x`` (:func:`to_storage`); called
    directly with bf16 / f16 ``x``, it computes in float32 and returns ``x``'s dtype,
    feasible as stored.
    """
    ct = compute_dtype(x.dtype)
    if ct != x.dtype and _STORAGE.get() is None:
        with storage_dtype(x.dtype):
            return project(x_adv.astype(ct), x.astype(ct), eps, norm).astype(x.dtype)
    d = x_adv - x
    if norm == "linf":
        d = jnp.clip(d, -eps, eps)
    else:
        n = _bnorm(d)
        d = d * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))
    return to_storage(jnp.clip(x + d, 0.0, 1.0), x, eps, norm)


def random_start(key, x, eps, norm):
    """Uniform sample from the eps-ball around ``x`` (then box-clipped).

    L∞: δ ~ U[−eps, eps]^n. L2: uniform in the ball, δ = eps·u^{1/n}·g/‖g‖ with
    g ~ N(0, I), u ~ U[0, 1] (n = number of features per example). ``key``: one key
    or per-example keys (see :func:`draw`).
    """
    if norm == "linf":
        d = draw(lambda k, s: jax.random.uniform(k, s, x.dtype, -1.0, 1.0), key, x.shape) * eps
    else:
        kg, ku = split_key(key, 2)
        g = draw(lambda k, s: jax.random.normal(k, s, x.dtype), kg, x.shape)
        n = math.prod(x.shape[1:])
        u_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        u = draw(lambda k, s: jax.random.uniform(k, s, x.dtype), ku, u_shape)
        d = eps * u ** (1.0 / n) * g / jnp.maximum(_bnorm(g), _TINY)
    return to_storage(jnp.clip(x + d, 0.0, 1.0), x, eps, norm)


def ascent_direction(g, norm):
    """Steepest-ascent direction of unit norm: sign(g) for L∞, g/‖g‖₂ for L2 (0 if g=0)."""
    if norm == "linf":
        return jnp.sign(g)
    return g / jnp.maximum(_bnorm(g), _TINY)


def bcast(v, x):
    """Reshape a per-example (B,) array to broadcast against ``x`` (B, ...)."""
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def bwhere(cond, a, b):
    """Per-example select: ``cond`` (B,) picks rows of ``a`` else ``b``."""
    return jnp.where(bcast(cond, a), a, b)


# --------------------------------------------------------------------------- losses
def sort_desc(logits):
    """``jnp.sort(logits, axis=-1)[:, ::-1]`` (values and derivative), as a gather by
    :func:`argsort_rows`: ``jnp.sort``'s derivative makes a replicated index operand,
    which an Explicit mesh rejects."""
    order = argsort_rows(lax.stop_gradient(logits))[:, ::-1]
    return jnp.take_along_axis(logits, order, axis=-1)


def ce_loss(logits, y):
    """Per-example cross-entropy −log softmax(z)_y, shape (B,)."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]


def margin(logits, y):
    """Per-example margin z_y − max_{i≠y} z_i (negative ⇔ misclassified)."""
    zy = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return zy - jnp.max(other, axis=-1)


def dlr_loss(logits, y):
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6), per example:

    DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12),
    π the logits sorted in decreasing order. Needs C ≥ 3.
    """
    zs = sort_desc(logits)
    return -margin(logits, y) / (zs[:, 0] - zs[:, 2] + _TINY)


def targeted_dlr_loss(logits, y, t):
    """Targeted DLR (Croce & Hein 2020, eq. 7), maximised by the attacker:

    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12). Needs C ≥ 4.
    """
    zs = sort_desc(logits)
    zy = jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    zt = jnp.take_along_axis(logits, t[:, None], -1)[:, 0]
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + _TINY)


def get_loss(name: str, num_classes: int):
    check_loss(name)
    if name == "dlr" and num_classes < 3:
        raise ValueError(
            f"the DLR loss needs >= 3 classes, logits have {num_classes}; "
            "use loss='ce' for binary problems."
        )
    return ce_loss if name == "ce" else dlr_loss


# ------------------------------------------------------------------- warm starts
@dataclasses.dataclass(frozen=True)
class WarmStartLogits:
    """A logits function whose forward solve can start from a carried state.

    ``init(x) -> state``: the cold start for a batch ``x`` (a pytree whose leaves have
    the batch axis first; for a DEQ the zero state). ``apply(x, state) -> (logits,
    new_state)``: the logits with the solve started at ``state``, and the state to
    start the next call from (for a DEQ its equilibrium ``z*``; no gradient flows
    through it). Calling the object is the cold forward ``apply(x, init(x))[0]``, so
    anything that takes a ``logits_fn`` takes it, and scoring with it scores the model
    as defined.

    Consecutive iterates of an iterative attack differ by one step, so the previous
    iterate's fixed point starts the next solve close to its solution: with a
    tolerance-stopped solver most solves then take a few steps (Bai, Kolter & Koltun
    2019 reuse fixed points across time steps the same way). Every iterative attack
    threads the state: :func:`~deqjax.attacks.pgd`, :func:`~deqjax.attacks.apgd` and
    :func:`~deqjax.attacks.apgd_targeted` through their iterations (per restart, per
    target), :func:`~deqjax.attacks.fab` / :func:`~deqjax.attacks.fab_targeted` from
    each gradient point to its candidate and on, :func:`~deqjax.attacks.square` from the
    current point to each query (kept per example where a query is accepted). The value
    an attack sees at an iterate is the warm-started solve's, within the solver
    tolerance of the cold one, and its gradient is the model's gradient at that
    solution. FAB's projections are the most sensitive to that tolerance: measured on a
    tiny MDEQ (tests/test_warm_start.py), warm and cold FAB agree exactly at tol 1e-4
    and 1e-5 but not at 1e-3 (warm found fewer adversarial points there), so give
    warm-started FAB a forward tolerance of 1e-4 or tighter (``tol``, when set, is that
    tolerance: :func:`deqjax.robustness.evaluate_robustness` runs FAB cold through a
    view whose ``tol`` is unknown or looser). Build one for a DEQ classifier with
    :func:`deqjax.models.warm_start_logits`.

    ``merge_gradient(new_state, state_grad) -> new_state`` (optional): for a state that
    also carries something the backward computes — a DEQ's adjoint, whose start is a
    state leaf and whose "gradient" is the solved adjoint —
    :func:`loss_grad_state` differentiates the loss with respect to the state too and
    builds the next state with it. Without it the state is not differentiated.
    """

    init: Callable
    apply: Callable
    # the forward solve's tolerance where known (FAB needs <= 1e-4 to use the warm start)
    tol: float | None = None
    merge_gradient: Callable | None = None

    def __call__(self, x):
        return self.apply(x, self.init(x))[0]


def initial_state(logits_fn, x):
    """The cold state of a :class:`WarmStartLogits` for ``x``; ``()`` for a plain one."""
    return logits_fn.init(x) if isinstance(logits_fn, WarmStartLogits) else ()


def logits_and_state(logits_fn, x, state):
    """``(logits, next state)``: warm-started from ``state`` for a
    :class:`WarmStartLogits`, ``(logits_fn(x), state)`` for a plain logits function."""
    if isinstance(logits_fn, WarmStartLogits):
        logits, new = logits_fn.apply(x, state)
        return logits, jax.tree.map(lax.stop_gradient, new)
    return logits_fn(x), state


def loss_grad_state(logits_fn, loss_fn):
    """``f(x, y, state, *extra) -> (per-example loss, logits, dloss/dx, next state)``:
    :func:`loss_and_grad` with the forward started from ``state`` (see
    :func:`logits_and_state`; a plain ``logits_fn`` passes ``state`` through)."""

    def total(x, y, state, *extra):
        logits, new = logits_and_state(logits_fn, x, state)
        per = loss_fn(logits, y, *extra)
        return jnp.sum(per), (per, logits, new)

    merge = getattr(logits_fn, "merge_gradient", None)

    # with merge_gradient the state is differentiated too (its gradient feeds the next state)
    grad_total = jax.value_and_grad(total, argnums=0 if merge is None else (0, 2), has_aux=True)

    def f(x, y, state, *extra):
        (_, (per, logits, new)), g = grad_total(x, y, state, *extra)
        if merge is None:
            return per, logits, g, new
        g, g_state = g
        return per, logits, g, merge(new, jax.tree.map(lax.stop_gradient, g_state))

    return f


def loss_and_grad(logits_fn, loss_fn):
    """Return ``f(x, y) -> (per-example loss (B,), logits, dloss/dx)``.

    The gradient of the summed loss equals the per-example gradients provided
    ``logits_fn`` treats batch rows independently (no train-mode batch norm).
    """

    def total(x, y, *extra):
        logits = logits_fn(x)
        per = loss_fn(logits, y, *extra)
        return jnp.sum(per), (per, logits)

    def f(x, y, *extra):
        (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(x, y, *extra)
        return per, logits, g

    return f


def keep_worst(logits_fn, x_a, x_b, y):
    """Per example, keep whichever of ``x_a``/``x_b`` has the lower margin (ties → a)."""
    ma = margin(logits_fn(x_a), y)
    mb = margin(logits_fn(x_b), y)
    return bwhere(mb < ma, x_b, x_a)
