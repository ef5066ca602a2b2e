"""Every ```python block of the README runs as written.

The blocks run top to bottom in one namespace, as a reader pasting them into one session
would, each preceded by the minimal setup a reader would add (``SETUP``, keyed by the
block's first line) and followed by checks that it did what the README says (``CHECKS``).
A new block that needs names the README does not define fails here until its setup is
written down next to the others."""

import os
import re

import pytest

from tests.helpers import ROOT

SETUP = {
    # the solver example: a contractive tanh layer on 8 examples of dimension 16
    "import jax, jax.numpy as jnp": """
import jax, jax.numpy as jnp
_k = jax.random.split(jax.random.PRNGKey(0), 3)
W = 0.5 * jax.random.normal(_k[0], (16, 16)) / 4.0
U = jax.random.normal(_k[1], (16, 4)) / 2.0
xs = jax.random.normal(_k[2], (8, 4))
""",
    # the Flax layer example: a batch of 4 injections and 2 MNIST-sized images
    "import flax.linen as nn": """
key = jax.random.PRNGKey(1)
u = jax.random.normal(key, (4, 16))
x = jax.random.uniform(key, (2, 28, 28, 1))
""",
    # the attack example: a linear classifier on 8 flattened 4x4 images
    "from deqjax import attacks": """
_w = jax.random.normal(jax.random.PRNGKey(2), (16, 10))
logits_fn = lambda a: a.reshape(a.shape[0], -1) @ _w
x = jax.random.uniform(jax.random.PRNGKey(3), (8, 4, 4, 1))
y = jnp.argmax(logits_fn(x), -1)
key = jax.random.PRNGKey(4)
""",
    # the intermediate-state example reuses the MDEQ of the Flax example (new images)
    "from deqjax.deq_gradients import AttackView": """
x = jax.random.uniform(jax.random.PRNGKey(5), (2, 28, 28, 1))
""",
    # the warm-start example attacks the same MDEQ (labels: its own predictions)
    "from deqjax.models import warm_start_logits": """
y = jnp.argmax(model.apply(variables, x)[0], -1)
key = jax.random.PRNGKey(6)
""",
}

CHECKS = {
    "import jax, jax.numpy as jnp": """
assert bool(stats.converged.all()), stats.rel_residual
assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
""",
    "import flax.linen as nn": """
_, _layer_stats = layer.apply(layer_vars, u)
assert bool(_layer_stats.converged.all()), _layer_stats.rel_residual
assert logits.shape == (2, 10) and z_star.shape == u.shape
""",
    "from deqjax import attacks": """
assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.3 + 1e-6
assert float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y)) < 1.0
""",
    "from deqjax.deq_gradients import AttackView": """
_g = jax.grad(lambda a: logits_fn(a).sum())(x)
assert _g.shape == x.shape and bool(jnp.all(jnp.isfinite(_g))) and float(jnp.abs(_g).sum()) > 0
assert bool(jnp.allclose(logits_fn(x), model.apply(variables, x)[0], atol=1e-5))
""",
    "from deqjax.models import warm_start_logits": """
assert bool(jnp.array_equal(warm(x), model.apply(variables, x, config=cfg)[0]))
assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6 and robust.shape == y.shape
""",
}


def readme_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def test_checks_name_existing_blocks():
    """Every setup/check is for a block that exists (renaming a block's first line
    without moving its setup fails here, not silently)."""
    firsts = {b.strip().splitlines()[0] for b in readme_blocks()}
    assert set(SETUP) <= firsts and set(CHECKS) <= firsts


@pytest.mark.slow
def test_readme_python_blocks_run():
    namespace = {"__name__": "readme"}
    blocks = readme_blocks()
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        first = block.strip().splitlines()[0]
        code = SETUP.get(first, "") + block + CHECKS.get(first, "")
        try:
            exec(compile(code, f"README.md python block {i} ({first})", "exec"), namespace)
        except Exception as e:  # name the block in the failure
            raise AssertionError(f"README python block {i} ({first!r}) failed: {e!r}") from e
