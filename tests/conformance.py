"""The composition matrix: every public pure function × the JAX transformations our
users apply to it. Each cell is a check run by tests/test_conformance.py (it passes, or
asserts the documented clear error) or a reference to the test module that runs it in
a subprocess with forced devices, or "n/a" with the reason. The table of
docs/concepts/composition.md is rendered from this module: ``python -m tests.conformance``
prints it, and a test keeps the page in step.

Compile time dominates: an eager call compiles each primitive on its own, and a
solver's loop anew at every call (fresh closures). So each row's ``jit`` cell compares
``jax.jit`` against the eager call; the references (differences, loops over examples,
the unrolled float64 solve) are jitted once and shared by a row's cells; the checked
transformation is applied to the unjitted function and, for most cells (vmap, jvp, the
attacks, the Flax layer's and the array functions' derivatives), run under ``jax.jit``
(the transformation traces the function the same way: under an eager ``grad`` or
``vmap`` its values are tracers too). The ``deq_fixed_point`` rows' grad, hessian,
closure, pytree and float64 checks stay eager.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deqjax import DEQConfig, SolverConfig, deq_fixed_point
from deqjax import attacks as A

N = 4
TRANSFORMS = (
    "jit",
    "vmap",
    "vmap∘vmap",
    "grad",
    "jvp",
    "hessian",
    "closure",
    "pytree state",
    "float64",
    "bfloat16",
    "Explicit mesh",
    "shard_map",
)


@dataclasses.dataclass(frozen=True)
class Cell:
    status: str  # "yes", "error" (a clear error, asserted) or "n/a"
    check: Callable[[], None] | None = None  # runs the cell (yes/error cells)
    where: str = ""  # a test module running it elsewhere (forced devices)
    note: str = ""


# --- the DEQ core -------------------------------------------------------------------

A_MAT = 0.6 * np.asarray(jax.random.normal(jax.random.PRNGKey(0), (N, N))) / np.sqrt(N)
B_VEC = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (N,)), np.float64)


def _config(backward):
    method = "broyden" if backward.startswith("shine") else "anderson"
    return DEQConfig(
        forward=SolverConfig(method=method, max_iter=300, tol=1e-12, stop_mode="abs"),
        backward=backward.removesuffix("+probe"),
        adjoint_tol=1e-12,
        adjoint_max_iter=300,
        phantom_steps=60,
        phantom_damping=1.0,
    )


def _deq_loss(backward, dtype=jnp.float64, closure=False, pytree=False):
    cfg = _config(backward)
    probe = jnp.zeros(2, dtype) if backward.endswith("+probe") else None

    def loss(b):
        a = A_MAT.astype(dtype)
        if pytree:
            cell = lambda z, p: {
                "h": jnp.tanh(p[0] @ jnp.concatenate([z["h"], z["t"]]) + p[1])[:2],
                "t": jnp.tanh(p[0] @ jnp.concatenate([z["h"], z["t"]]) + p[1])[2:],
            }
            z0 = {"h": jnp.zeros(2, dtype), "t": jnp.zeros(N - 2, dtype)}
            z = deq_fixed_point(cell, z0, (a, b), cfg, backward_probe=probe)[0]
            z = jnp.concatenate([z["h"], z["t"]])
        elif closure:
            z = deq_fixed_point(
                lambda z, _: jnp.tanh(a @ z + b), jnp.zeros(N, dtype), (), cfg, backward_probe=probe
            )[0]
        else:
            z = deq_fixed_point(
                lambda z, p: jnp.tanh(p[0] @ z + p[1]),
                jnp.zeros(N, dtype),
                (a, b),
                cfg,
                backward_probe=probe,
            )[0]
        return jnp.sum(jnp.sin(z.astype(jnp.float64)) * jnp.arange(1.0, N + 1))

    return loss


def _fd_grad(fn, b, h=1e-6):
    """Central differences of ``fn`` at ``b``, one coordinate at a time. Pass a jitted
    ``fn``: an eager call of a function with a solver loop traces and compiles the loop
    anew each time (fresh closures), and this calls ``fn`` 2N times."""
    return jnp.stack([(fn(b + h * e) - fn(b - h * e)) / (2 * h) for e in jnp.eye(N)])


def _close(x, y, tol=1e-7):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _near_in_bf16(backward, grad_ref):
    """bf16 state and parameters: the gradient (bf16) within 25% (in norm) of float64's
    (``grad_ref``, the float64 loss's gradient, jitted)."""
    g16 = jax.jit(jax.grad(_deq_loss(backward, jnp.bfloat16)))(jnp.asarray(B_VEC, jnp.bfloat16))
    g = grad_ref(B_VEC)
    assert g16.dtype == jnp.bfloat16
    assert float(jnp.linalg.norm(g16.astype(jnp.float64) - g)) <= 0.25 * float(jnp.linalg.norm(g))


def _jvp_refused(fn, x, tangent):
    """``jax.jvp`` through a backward probe's ``custom_vjp`` raises JAX's forward-mode
    error (never a silent answer)."""
    try:
        jax.jvp(fn, (x,), (tangent,))
    except TypeError as e:
        assert "forward-mode" in str(e), e
    else:
        raise AssertionError("jvp through a custom_vjp backward did not raise")


def _batching_cells(loss, x, xs, tol, loss_jit=None):
    """The ``jit``, ``vmap`` and ``vmap∘vmap`` cells of a scalar ``loss`` of one example:
    ``xs`` (3, 2, *x.shape) examples. ``jit`` against the eager call; the batched
    transforms against a loop over the examples of the jitted loss, ``loss_jit`` (the
    reference compiles once: an eager call of a solver loop recompiles it each time)."""
    loss_jit = loss_jit or jax.jit(loss)
    return {
        "jit": Cell("yes", lambda: _close(loss_jit(x), loss(x), 1e-12)),
        "vmap": Cell(
            "yes",
            lambda: _close(
                jax.jit(jax.vmap(loss))(xs[0]), jnp.stack([loss_jit(v) for v in xs[0]]), tol
            ),
        ),
        "vmap∘vmap": Cell(
            "yes",
            lambda: _close(
                jax.jit(jax.vmap(jax.vmap(loss)))(xs),
                jnp.stack([loss_jit(v) for v in xs.reshape(-1, *np.shape(x))]).reshape(3, 2),
                tol,
            ),
        ),
    }


def _shard_map_1dev(per_example, x, tol):
    """``per_example`` over a 1-device mesh by ``jax.shard_map`` (check_vma typing)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
    spec = jax.sharding.PartitionSpec("x")
    sharded = jax.shard_map(per_example, mesh=mesh, in_specs=spec, out_specs=spec)
    _close(jax.jit(sharded)(x), jax.jit(per_example)(x), tol)


@functools.cache
def _unroll_loss_jit():
    """The float64 cells' reference (the unrolled solve), compiled once for all rows."""
    return jax.jit(_deq_loss("unroll"))


def _deq_cells(backward):
    loss = _deq_loss(backward)
    # The references, compiled once and shared by the row's cells; each transform under
    # test is applied to the eager `loss` itself.
    loss_jit = jax.jit(loss)
    grad_jit = jax.jit(jax.grad(loss))
    bs = B_VEC + 0.1 * jnp.arange(6.0).reshape(3, 2, 1)  # (3, 2, N)
    forward_ok = not backward.endswith("+probe")

    cells = {
        **_batching_cells(loss, B_VEC, bs, 1e-12, loss_jit),
        "grad": Cell("yes", lambda: _close(jax.grad(loss)(B_VEC), _fd_grad(loss_jit, B_VEC), 1e-6)),
        "hessian": Cell(
            "yes", lambda: _close(jax.hessian(loss)(B_VEC), _fd_grad(grad_jit, B_VEC), 1e-6)
        ),
        "closure": Cell(
            "yes",
            lambda: _close(
                jax.grad(_deq_loss(backward, closure=True))(B_VEC), grad_jit(B_VEC), 1e-9
            ),
        ),
        "pytree state": Cell(
            "yes",
            lambda: _close(
                jax.grad(_deq_loss(backward, pytree=True))(B_VEC), grad_jit(B_VEC), 1e-9
            ),
        ),
        "float64": Cell("yes", lambda: _close(loss(B_VEC), _unroll_loss_jit()(B_VEC), 1e-10)),
        "bfloat16": Cell("yes", lambda: _near_in_bf16(backward, grad_jit)),
        "Explicit mesh": Cell("yes", where="tests/test_meshes.py"),
        "shard_map": Cell("yes", where="tests/test_transforms.py"),
    }
    v = np.ones(N)
    if forward_ok:
        cells["jvp"] = Cell(
            "yes",
            lambda: _close(
                jax.jit(lambda b: jax.jvp(loss, (b,), (v,))[1])(B_VEC),
                _fd_grad(loss_jit, B_VEC) @ v,
                1e-6,
            ),
        )
    else:
        cells["jvp"] = Cell(
            "error",
            lambda: _jvp_refused(loss, B_VEC, v),
            note="JAX refuses jvp of the probe's custom_vjp: drop the probe (jacfwd∘grad works)",
        )
    return cells


# --- attacks ------------------------------------------------------------------------

_W = jax.random.normal(jax.random.PRNGKey(2), (2 * 2 * 1, 5))  # 5 classes (APGD-T's DLR)


def _logits(x):
    return x.reshape(x.shape[0], -1).astype(jnp.float32) @ _W * 4.0


def _images(dtype=jnp.float32):
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 2, 2, 1)).astype(dtype)
    return x, jnp.argmax(_logits(x), -1)


ATTACKS = {
    "fgsm": lambda f, x, y, k: A.fgsm(f, x, y, k, eps=0.1),
    "pgd": lambda f, x, y, k: A.pgd(f, x, y, k, eps=0.1, steps=3),
    "apgd": lambda f, x, y, k: A.apgd(f, x, y, k, eps=0.1, steps=3),
    "apgd_targeted": lambda f, x, y, k: A.apgd_targeted(
        f, x, y, k, eps=0.1, steps=3, n_target_classes=3
    ),
    "fab": lambda f, x, y, k: A.fab(f, x, y, k, eps=0.1, steps=3),
    "fab_targeted": lambda f, x, y, k: A.fab_targeted(
        f, x, y, k, eps=0.1, steps=3, n_target_classes=3
    ),
    "square": lambda f, x, y, k: A.square(f, x, y, k, eps=0.1, n_queries=5),
    # an ensemble of a gradient and a gradient-free attack (compile time: the standard
    # suite's four are covered by tests/test_attacks.py), its worst-case point
    "evaluate_ensemble": lambda f, x, y, k: (
        A.evaluate_ensemble(
            f, x, y, k, eps=0.1, attacks=["apgd-ce", "square"], n_iter=3, n_queries=5
        ).x_adv
    ),
}


def _in_ball(x_adv, x, eps=0.1):
    """x_adv keeps x's dtype and lies in the ε-ball and [0, 1]: exactly as stored for
    half precision, to one rounding of ε in float32/float64."""
    assert x_adv.dtype == x.dtype, (x_adv.dtype, x.dtype)
    d = float(jnp.abs(x_adv.astype(jnp.float64) - x.astype(jnp.float64)).max())
    slack = 0.0 if jnp.finfo(x.dtype).bits == 16 else 1e-6 * eps
    assert d <= eps + slack, d
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def _attack_cells(name):
    attack = ATTACKS[name]
    x, y = _images()
    key = jax.random.PRNGKey(4)
    keys = jax.random.split(key, 3)
    run = lambda k: attack(_logits, x, y, k)
    run_jit = jax.jit(run)  # the reference of the loops below: compiled once
    vmap_jit = jax.jit(jax.vmap(run))
    na_diff = "n/a: an attack returns a searched point, not a differentiable function of x"

    def closure():
        params = {"w": _W}
        f = lambda x: x.reshape(x.shape[0], -1) @ params["w"] * 4.0
        out = jax.jit(lambda k: attack(f, x, y, k))(key)
        _close(out, run_jit(key), 1e-6)

    def f64():  # (the matrix runs with jax_enable_x64)
        x64 = x.astype(jnp.float64)
        _in_ball(jax.jit(lambda x, k: attack(_logits, x, y, k))(x64, key), x64)

    def bf16():
        xb, yb = _images(jnp.bfloat16)
        _in_ball(jax.jit(lambda x, k: attack(_logits, x, yb, k))(xb, key), xb)

    return {
        "jit": Cell("yes", lambda: _close(run_jit(key), run(key), 1e-6)),
        "vmap": Cell(
            "yes",
            lambda: _close(vmap_jit(keys), jnp.stack([run_jit(k) for k in keys]), 1e-6),
        ),
        "vmap∘vmap": Cell(
            "yes",
            lambda: _close(
                jax.jit(jax.vmap(jax.vmap(run)))(keys[None]), vmap_jit(keys)[None], 1e-6
            ),
        ),
        "grad": Cell("n/a", note=na_diff),
        "jvp": Cell("n/a", note=na_diff),
        "hessian": Cell("n/a", note=na_diff),
        "closure": Cell("yes", closure),
        "pytree state": Cell("n/a", note="n/a: images are one array"),
        "float64": Cell("yes", f64),
        "bfloat16": Cell("yes", bf16),
        "Explicit mesh": Cell("yes", where="tests/test_attack_transforms.py"),
        "shard_map": Cell("yes", where="tests/test_attack_transforms.py"),
    }


def _flax_deq_cells():
    import flax.linen as nn

    from deqjax.models import DEQ

    class TanhCell(nn.Module):  # a contractive tanh cell in float64: smooth, converges
        @nn.compact
        def __call__(self, z, u):
            w = nn.Dense(N, use_bias=False, param_dtype=jnp.float64)
            return jnp.tanh(0.5 * w(z) + u)

    cfg = DEQConfig(
        forward=SolverConfig(max_iter=200, tol=1e-12, stop_mode="abs"),
        adjoint_tol=1e-12,
        adjoint_max_iter=200,
    )
    layer = DEQ(TanhCell(), cfg)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, N)), np.float64)
    params = layer.init(jax.random.PRNGKey(6), jnp.zeros((2, N), jnp.float32))
    loss = lambda x: jnp.sum(jnp.sin(layer.apply(params, x)[0]) * jnp.arange(1.0, N + 1))
    # the references (differences, loops), compiled once: an eager call recompiles the
    # solver's loop each time
    loss_jit = jax.jit(loss)
    grad_jit = jax.jit(jax.grad(loss))
    one_jit = jax.jit(lambda xi: loss(xi[None]))

    def grad_fd():
        g = grad_jit(x)
        d = jax.random.normal(jax.random.PRNGKey(7), x.shape)
        h = 1e-6
        fd = (loss_jit(x + h * d) - loss_jit(x - h * d)) / (2 * h)
        _close(jnp.sum(g * d), fd, 1e-6)

    def hvp():
        d = jax.random.normal(jax.random.PRNGKey(7), x.shape)
        rev = jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) * d)))(x)
        h = 1e-6
        fd = (grad_jit(x + h * d) - grad_jit(x - h * d)) / (2 * h)
        _close(rev, fd, 1e-6)

    def in_shard_map():  # a 1-device mesh: shard_map's check_vma typing all the same
        _shard_map_1dev(jax.vmap(jax.grad(lambda xi: loss(xi[None]))), x, 1e-5)

    return {
        "jit": Cell("yes", lambda: _close(loss_jit(x), loss(x), 1e-10)),
        "vmap": Cell(
            "yes",
            lambda: _close(
                jax.jit(jax.vmap(lambda xi: loss(xi[None])))(x),
                jnp.stack([one_jit(xi) for xi in x]),
                1e-5,
            ),
        ),
        "vmap∘vmap": Cell(
            "yes",
            lambda: _close(
                jax.jit(jax.vmap(jax.vmap(lambda xi: loss(xi[None]))))(x[None]),
                jnp.stack([one_jit(xi) for xi in x])[None],
                1e-5,
            ),
        ),
        "grad": Cell("yes", grad_fd),
        "jvp": Cell(
            "error",
            lambda: _jvp_refused(loss, x, x),
            note="the layer passes a backward probe (custom_vjp): reverse mode; jacfwd∘grad works",
        ),
        "hessian": Cell("yes", hvp, note="Hessian-vector products by reverse over reverse"),
        "closure": Cell("yes", where="tests/test_composition.py"),
        "pytree state": Cell("n/a", note="n/a: the layer's state is the injection's array"),
        "float64": Cell("yes", where="tests/test_composition.py"),
        "bfloat16": Cell("yes", where="tests/test_mixed_precision.py", note="model.dtype"),
        "Explicit mesh": Cell("yes", where="tests/test_meshes.py"),
        "shard_map": Cell("yes", in_shard_map, note="input gradients in shard_map"),
    }


# --- array functions: CPL layers, certificates, OTAD's convex integration -------------


def _stays_float64(loss_jit, grad_jit, x):
    """A float64 input gives a float64 value and gradient (nothing computed in float32)."""
    assert loss_jit(x).dtype == jnp.float64 and grad_jit(x).dtype == jnp.float64


def _array_fn_cells(loss, x, closure_loss, bf16_check, *, tol=1e-6, mesh_where="", notes=None):
    """Cells of a scalar ``loss(x)`` of one example (float64 ``x``): transforms against
    the eager value, derivatives against central differences. ``closure_loss`` closes
    over the parameters that ``loss`` takes as arguments; ``bf16_check`` runs the
    function in bfloat16."""
    notes = notes or {}
    # numpy float64: float64 once the matrix runs (with jax_enable_x64)
    xs = x + 0.01 * np.arange(6.0).reshape(3, 2, *([1] * x.ndim))  # (3, 2, *x.shape)
    d = np.asarray(jax.random.normal(jax.random.PRNGKey(8), x.shape), np.float64)
    h = 1e-6
    fd = lambda f, x: (f(x + h * d) - f(x - h * d)) / (2 * h)
    # the references (differences, loops), compiled once and shared by the cells
    loss_jit = jax.jit(loss)
    grad_jit = jax.jit(jax.grad(loss))
    cells = {
        **_batching_cells(loss, x, xs, 1e-10, loss_jit),
        "grad": Cell("yes", lambda: _close(jnp.sum(grad_jit(x) * d), fd(loss_jit, x), tol)),
        "jvp": Cell(
            "yes",
            lambda: _close(
                jax.jit(lambda x: jax.jvp(loss, (x,), (d,))[1])(x), fd(loss_jit, x), tol
            ),
        ),
        "hessian": Cell(
            "yes",
            lambda: _close(
                jax.jit(lambda x: jax.jvp(jax.grad(loss), (x,), (d,))[1])(x), fd(grad_jit, x), tol
            ),
            note="Hessian-vector products (forward over reverse) against differences",
        ),
        "closure": Cell(
            "yes", lambda: _close(jax.jit(jax.grad(closure_loss))(x), grad_jit(x), 1e-10)
        ),
        "pytree state": Cell("n/a", note="n/a: one array in, one array out"),
        "float64": Cell("yes", lambda: _stays_float64(loss_jit, grad_jit, x)),
        "bfloat16": Cell("yes", bf16_check),
        "Explicit mesh": Cell("yes", where=mesh_where)
        if mesh_where
        else Cell("n/a", note="n/a: per-example maths, nothing sharded inside"),
        "shard_map": Cell("yes", lambda: _shard_map_1dev(jax.vmap(jax.grad(loss)), xs[0], 1e-9)),
    }
    for k, (status, note, check) in notes.items():
        cells[k] = Cell(status, check, note=note)
    return cells


_D = 6
_CPL_W = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (5, _D)), np.float64) / 3
_CPL_B = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (5,)), np.float64) / 3
_X6 = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (_D,)), np.float64)


def _cpl_cells():
    from deqjax import cpl

    sigma = np.linalg.norm(_CPL_W, 2)
    out = lambda x, w, b: cpl.dense_cpl(x, w, b, sigma)
    loss = lambda x: jnp.sum(jnp.sin(out(x, _CPL_W, _CPL_B)) * jnp.arange(1.0, _D + 1))
    params = {"w": _CPL_W, "b": _CPL_B}
    closure = lambda x: jnp.sum(
        jnp.sin(cpl.dense_cpl(x, params["w"], params["b"], sigma)) * jnp.arange(1.0, _D + 1)
    )

    def bf16():
        args = (jnp.asarray(a, jnp.bfloat16) for a in (_X6, _CPL_W, _CPL_B, sigma))
        z = jax.jit(cpl.dense_cpl)(*args)
        assert z.dtype == jnp.bfloat16
        _close(z.astype(jnp.float64), out(_X6, _CPL_W, _CPL_B), 0.05)

    return _array_fn_cells(loss, _X6, closure, bf16)


def _certified_radius_cells():
    from deqjax import cpl

    labels = np.asarray([2])
    # plain logits: the caller vouches that the network is 1-Lipschitz
    radius = lambda z: cpl.certified_radius(z, labels, assume_lipschitz=True)
    loss = lambda z: radius(z[None])[0]
    w = {"scale": np.float64(1.0)}
    closure = lambda z: radius(w["scale"] * z[None])[0]
    z = np.asarray([0.1, -0.4, 1.3, 0.2, 0.05])

    def bf16():
        r = jax.jit(radius)(jnp.asarray(z[None], jnp.bfloat16))
        assert jnp.isfinite(r).all() and r.dtype in (jnp.bfloat16, jnp.float32), r.dtype
        _close(r.astype(jnp.float64), loss(z)[None], 0.02)

    return _array_fn_cells(
        loss,
        z,
        closure,
        bf16,
        notes={
            "hessian": (
                "yes",
                "piecewise linear in the logits: Hessian-vector products are 0 (checked)",
                lambda: _close(
                    jax.jit(lambda z: jax.jvp(jax.grad(loss), (z,), (np.ones(5),))[1])(z),
                    np.zeros(5),
                ),
            )
        },
    )


def _cip_cells():
    from deqjax.otad import convex_integration

    key = jax.random.PRNGKey(12)
    xs = np.asarray(jax.random.normal(key, (5, 3)), np.float64)
    zs = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (5, 3)), np.float64)
    x = xs.mean(0) + 0.1
    g = lambda x, xs, zs: convex_integration(x, xs, zs, 0.0, 2.0, "envelope").g
    loss = lambda x: jnp.sum(jnp.sin(g(x, xs, zs)) * jnp.arange(1.0, 4.0))
    data = {"xs": xs, "zs": zs}
    closure = lambda x: jnp.sum(jnp.sin(g(x, data["xs"], data["zs"])) * jnp.arange(1.0, 4.0))

    def bf16():
        try:
            args = (jnp.asarray(a, jnp.bfloat16) for a in (x, xs, zs))
            r = jax.jit(lambda *a: convex_integration(*a, 0.0, 2.0))(*args)
        except (TypeError, ValueError) as e:
            assert "bfloat16" in str(e) or "float32" in str(e), e
        else:
            assert r.g.dtype in (jnp.bfloat16, jnp.float32), r.g.dtype

    return _array_fn_cells(
        loss,
        x,
        closure,
        bf16,
        tol=1e-5,
        notes={
            "jvp": (
                "error",
                "its QP solution is differentiated by a custom_vjp: JAX refuses jvp (jacrev works)",
                lambda: _jvp_refused(loss, x, np.ones_like(x)),
            )
        },
    )


def rows() -> dict[str, dict[str, Cell]]:
    out = {
        f"deq_fixed_point ({b})": _deq_cells(b)
        for b in ("implicit", "implicit+probe", "phantom", "unroll", "shine_refine")
    }
    out["Flax DEQ layer"] = _flax_deq_cells()
    out.update({name: _attack_cells(name) for name in ATTACKS})
    out["dense_cpl"] = _cpl_cells()
    out["certified_radius"] = _certified_radius_cells()
    out["convex_integration (OTAD CIP)"] = _cip_cells()
    return out


SYMBOL = {"yes": "✓", "error": "error", "n/a": "–"}


def markdown() -> str:
    table = rows()
    lines = [
        "| function | " + " | ".join(TRANSFORMS) + " |",
        "| --- |" + " --- |" * len(TRANSFORMS),
    ]
    for name, cells in table.items():
        lines.append(
            f"| `{name}` | " + " | ".join(SYMBOL[cells[t].status] for t in TRANSFORMS) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
