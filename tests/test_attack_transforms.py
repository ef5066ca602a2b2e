"""The attacks under what JAX users do (issue #23): bfloat16 / float16 images and
models, sharded batches (Explicit and Auto meshes, ``jax.shard_map`` with its default
``check_vma=True``), value checks that survive ``jax.jit``, bad keys and empty batches.
Tiny models and budgets: the point is the plumbing, not attack strength."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax import attacks as A
from deqjax.attacks import _common as C
from tests.helpers import run_forced_device_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.PRNGKey(0)
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
EPS = 0.05  # at this radius bf16 rounding used to give perturbations of 0.0508
rng = np.random.default_rng(0)
W1 = jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32)
W2 = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)


def model(x):
    """A tiny MLP computing in its input's dtype (a bf16 / f16 model on such images)."""
    h = jnp.tanh(x.reshape(x.shape[0], 16) @ W1.astype(x.dtype))
    return h @ W2.astype(x.dtype)


X = jnp.asarray(rng.uniform(0, 1, size=(16, 4, 4, 1)), jnp.float32)
X = X.at[:, 0, 0, 0].set(0.0).at[:, 3, 3, 0].set(1.0)  # the box binds
Y = jnp.argmax(model(X), -1)  # clean accuracy 1

ATTACKS = {  # (attack, norm, eps, options)
    "fgsm": (A.fgsm, "linf", EPS, {}),
    "pgd": (A.pgd, "linf", EPS, dict(steps=4, restarts=2)),
    "pgd_l2": (A.pgd, "l2", 0.3, dict(steps=4)),
    "apgd": (A.apgd, "linf", EPS, dict(steps=4, loss="dlr")),
    "apgd_t": (A.apgd_targeted, "linf", EPS, dict(steps=3, n_target_classes=2)),
    "fab": (A.fab, "linf", EPS, dict(steps=5, restarts=2)),
    "fab_t": (A.fab_targeted, "l2", 0.3, dict(steps=5, n_target_classes=2)),
    "square": (A.square, "linf", EPS, dict(n_queries=20)),
}


def run_attacks(names, x):
    """The attacks ``names`` on images ``x`` in one jitted program (eps traced)."""

    def run(x, eps_scale):
        return {
            n: ATTACKS[n][0](
                model, x, Y, KEY, eps=ATTACKS[n][2] * eps_scale, norm=ATTACKS[n][1], **ATTACKS[n][3]
            )
            for n in names
        }

    return jax.jit(run, **FAST)(x, jnp.float32(1.0))


def assert_feasible_as_stored(xa, x, eps, norm):
    """In [0, 1] and in the eps-ball as stored (float64 arithmetic on the stored values;
    eps as the float32 the attack computes with): exactly for L∞ on low-precision
    images, within float32 round-off for float32 images and for L2."""
    assert xa.dtype == x.dtype and xa.shape == x.shape
    a, b = np.asarray(xa, np.float64), np.asarray(x, np.float64)
    assert a.min() >= 0.0 and a.max() <= 1.0
    d = (a - b).reshape(len(a), -1)
    bound = float(np.float32(eps))
    if norm == "linf":
        tol = 0.0 if x.dtype != jnp.float32 else 2.0**-22
        assert np.abs(d).max() <= bound * (1 + tol), np.abs(d).max()
    else:
        assert np.linalg.norm(d, axis=1).max() <= bound * (1 + 1e-6)


def n_robust(xa):
    return int(jnp.sum(jnp.argmax(model(xa.astype(jnp.float32)), -1) == Y))


@pytest.fixture(scope="module")
def float32_results():
    return run_attacks(list(ATTACKS), X)


@pytest.mark.parametrize(
    "dtype,names",
    [
        (jnp.bfloat16, list(ATTACKS)),
        (jnp.float16, ["fgsm", "pgd", "fab_t", "square"]),  # each rounding path once
    ],
)
def test_low_precision_images_and_model(dtype, names, float32_results):
    """bf16 / f16 images into a model computing in that dtype: every attack returns the
    images' dtype, feasible as stored (the bf16 FGSM / Square used to step 0.0508 at
    eps = 0.05, PGD / APGD / FAB crashed), and breaks about as much as in float32. FAB
    gets more slack: its linearised boundary steps need logit differences a bf16
    model's 8-bit logits blur (here 14 vs 10 of 16 left robust; 11 vs 10 with a float32
    model on the bf16 images)."""
    x = X.astype(dtype)
    out = run_attacks(names, x)
    for n in names:
        _, norm, eps, _ = ATTACKS[n]
        assert_feasible_as_stored(out[n], x, eps, norm)
        ref = n_robust(float32_results[n])
        slack = 4 if n.startswith("fab") else 1
        assert n_robust(out[n]) <= ref + slack, (n, n_robust(out[n]), ref)
        if ref < len(Y):
            assert n_robust(out[n]) < len(Y), n  # it found adversarial examples


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.3)])
def test_project_and_random_start_on_bfloat16_images(norm, eps):
    """Called directly with bf16 images, the projection and the random start compute in
    float32 and return bf16 points feasible as stored."""
    x = X.astype(jnp.bfloat16)
    far = jnp.clip(x.astype(jnp.float32) + 0.3 * jnp.sign(X - 0.5), 0, 1).astype(x.dtype)
    assert_feasible_as_stored(A.project(far, x, eps, norm), x, eps, norm)
    with C.storage_dtype(jnp.bfloat16):  # as inside an attack: float32 in, rounded
        xs = A.random_start(KEY, x.astype(jnp.float32), eps, norm)
    assert_feasible_as_stored(xs.astype(jnp.bfloat16), x, eps, norm)
    assert np.array_equal(np.asarray(xs), np.asarray(xs.astype(jnp.bfloat16), np.float32))


def test_float32_images_into_a_bfloat16_model():
    """A bf16 model on float32 images (bf16 logits) runs: losses in float32."""
    bf16_model = lambda x: model(x.astype(jnp.bfloat16))
    xa = jax.jit(lambda x: A.apgd(bf16_model, x, Y, KEY, eps=EPS, steps=3), **FAST)(X)
    assert_feasible_as_stored(xa, X, EPS, "linf")
    assert n_robust(xa) < len(Y)


def test_low_precision_ensemble():
    """The ensemble on bf16 images, plain and compacting: x_adv in bf16, feasible as
    stored, and the model misclassifies the stored point of every broken example."""
    x = X.astype(jnp.bfloat16)

    def run(x):
        kw = dict(eps=EPS, n_iter=2, n_queries=10, n_target_classes=2)
        plain = A.evaluate_ensemble(model, x, Y, KEY, attacks=["apgd-ce", "square"], **kw)
        compact = A.evaluate_ensemble(
            model, x, Y, KEY, attacks=["fab-t"], compact=True, bucket_size=8, **kw
        )
        return plain, compact

    for res in jax.jit(run, **FAST)(x):
        assert_feasible_as_stored(res.x_adv, x, EPS, "linf")
        assert float(res.robust_accuracy) < 1.0
        broken = ~np.asarray(res.robust)
        pred = np.asarray(jnp.argmax(model(res.x_adv), -1))  # the model at the stored point
        assert np.all(pred[broken] != np.asarray(Y)[broken])


# --------------------------------------------------------------------- value checks
def test_value_checks_survive_jit():
    """Traced bad values raise when the program runs, with the eager check's message;
    set_runtime_checks(False) (or DEQJAX_RUNTIME_CHECKS=0) turns them off."""
    attack = lambda x, y, eps, step: A.pgd(model, x, y, KEY, eps=eps, steps=2, step_size=step)
    run = jax.jit(attack, **FAST)
    good = (X, Y, jnp.float32(0.1), jnp.float32(0.01))
    jax.block_until_ready(run(*good))
    bad = [
        ((X, Y, jnp.float32(-0.1), jnp.float32(0.01)), "eps must be >= 0"),
        ((X, Y, jnp.float32(jnp.nan), jnp.float32(0.01)), "eps must be finite"),
        ((X, Y.at[0].set(5), jnp.float32(0.1), jnp.float32(0.01)), r"labels must lie in \[0, 4\]"),
        ((X, Y.at[0].set(-1), jnp.float32(0.1), jnp.float32(0.01)), "labels must lie"),
        ((X * 255, Y, jnp.float32(0.1), jnp.float32(0.01)), r"x must lie in \[0, 1\]"),
        ((X.at[0, 0, 0, 0].set(jnp.nan), Y, jnp.float32(0.1), jnp.float32(0.01)), "NaN"),
        ((X, Y, jnp.float32(0.1), jnp.float32(-0.01)), "step_size must be >= 0"),
    ]
    for args, msg in bad:
        with pytest.raises(Exception, match=msg):
            jax.block_until_ready(run(*args))
        with pytest.raises(ValueError, match=msg):  # concrete values: a plain ValueError
            attack(*(np.asarray(a) if i < 2 else float(a) for i, a in enumerate(args)))
    with pytest.raises(Exception, match="FAB needs eps > 0"):
        jax.block_until_ready(
            jax.jit(lambda e: A.fab(model, X, Y, KEY, eps=e, steps=1), **FAST)(0.0)
        )
    ens = lambda y: A.evaluate_ensemble(model, X, y, KEY, eps=0.1, attacks=["fgsm"]).robust
    with pytest.raises(Exception, match="labels must lie"):
        jax.block_until_ready(jax.jit(ens, **FAST)(Y.at[3].set(7)))
    # under vmap (the cond becomes a select) only a bad element raises
    fg = jax.jit(jax.vmap(lambda e: A.fgsm(model, X, Y, eps=e)), **FAST)
    jax.block_until_ready(fg(jnp.array([0.05, 0.1])))
    with pytest.raises(Exception, match="eps must be >= 0"):
        jax.block_until_ready(fg(jnp.array([0.05, -0.1])))

    A.set_runtime_checks(False)  # for functions traced from now on (JAX caches traces
    try:  # per Python function: a new jax.jit of `attack` would reuse the checked one)
        assert not A.runtime_checks_enabled()
        unchecked = lambda *a: attack(*a)
        off = jax.jit(unchecked, **FAST)(X, Y, jnp.float32(-0.1), jnp.float32(0.01))
        jax.block_until_ready(off)  # runs: no checks in this program
    finally:
        A.set_runtime_checks(True)
    assert A.runtime_checks_enabled()


def test_runtime_checks_environment_variable(monkeypatch):
    for v, on in (("0", False), ("off", False), ("false", False), ("1", True), ("", True)):
        monkeypatch.setenv("DEQJAX_RUNTIME_CHECKS", v)
        assert C._env_checks() is on


@pytest.mark.parametrize("key", [None, 0, 1.0, jnp.zeros(2, jnp.int32)])
def test_a_key_that_is_not_a_prng_key_is_a_clear_error(key):
    calls = [
        lambda: A.pgd(model, X, Y, key, eps=EPS),
        lambda: A.apgd(model, X, Y, key, eps=EPS, restarts=2),
        lambda: A.apgd_targeted(model, X, Y, key, eps=EPS),
        lambda: A.fab(model, X, Y, key, eps=EPS),
        lambda: A.fab_targeted(model, X, Y, key, eps=EPS, n_target_classes=2),
        lambda: A.square(model, X, Y, key, eps=EPS),
        lambda: A.with_restarts(A.pgd, 2)(model, X, Y, key, eps=EPS),
        lambda: A.evaluate_ensemble(model, X, Y, key, eps=EPS),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="key must be a PRNG key"):
            call()
    A.fgsm(model, X[:2], Y[:2], None, eps=EPS)  # FGSM takes no key


def test_empty_batch_returns_empty_results_without_calling_the_model():
    def picky(x):
        assert x.shape[0] > 0, "the model was called on an empty batch"
        return model(x)

    x0, y0 = X[:0], Y[:0]
    assert A.fab(picky, x0, y0, KEY, eps=EPS).shape == x0.shape
    xa, d = A.fab_targeted(
        picky, x0, y0, KEY, eps=EPS, n_target_classes=2, return_distance=True, restarts=2
    )
    assert xa.shape == x0.shape and d.shape == (0,)
    xa, trace = A.pgd(picky, x0, y0, KEY, eps=EPS, steps=3, return_trace=True)
    assert xa.shape == x0.shape and trace.shape == (4, 0)
    assert A.square(picky, x0.astype(jnp.bfloat16), y0, KEY, eps=EPS).dtype == jnp.bfloat16
    res = A.evaluate_ensemble(picky, x0, y0, KEY, eps=EPS, attacks=["apgd-ce", "square"])
    assert res.robust.shape == (0,) and res.x_adv.shape == x0.shape
    assert np.isnan(float(res.robust_accuracy))


# ------------------------------------------------------------------------- sharding
@pytest.mark.slow
def test_sharded_attacks_equal_unsharded():
    """Every attack and the ensemble (plain and compacting) on a batch sharded over 2
    forced CPU devices: an Explicit-axis mesh under jit (x_adv stays batch-sharded), an
    Auto-axis mesh under jit, and jax.shard_map with check_vma=True and per-example keys
    sharded with the batch: all equal the unsharded run (tests/_attack_shard_worker.py)."""
    res = run_forced_device_worker("_attack_shard_worker.py", 2)
    assert res["explicit_batch_sharded"]
    assert res["broken"] > 0  # the attacks did something
    for mode in ("explicit", "auto", "shard_map"):
        assert res[mode] and max(res[mode].values()) <= 1e-6, (mode, res[mode])
    assert len(res["explicit"]) == 10 and len(res["shard_map"]) == 9
