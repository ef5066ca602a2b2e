"""``config.model.dtype``: the MDEQ family computes its activations in bfloat16/float16
while parameters, optimiser state and logits stay float32 (docs/concepts/mixed_precision.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, models
from experiments import train as train_lib
from experiments.workdir import load_run
from tests.helpers import read_metrics, tiny_config


def _float_dtypes(tree) -> set:
    return {
        np.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    }


def _activation_dtypes(module, variables, x) -> tuple:
    """The dtypes of the injection u, the state the head classifies (the DEQ's z*, the
    explicit net's last cell output) and the logits."""
    (logits, _), state = module.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    u = inter["injection"]["__call__"][0]
    if "equilibrium" in inter:
        z = inter["equilibrium"]["__call__"][0][0]  # (z*, stats)
    else:
        z = inter["cell"]["__call__"][-1]
    return u.dtype, z.dtype, logits.dtype


def test_bf16_deq_mnist_trains_with_float32_params(tmp_path):
    """A tiny deq_mnist run with bf16 activations learns (16 steps), and its state is
    float32 while the injection, the equilibrium state and the cell compute in bf16."""
    c = tiny_config(epochs=2)
    c.model.dtype = "bfloat16"
    c.train.learning_rate = 0.01  # 16 steps: 2e-3 stays near chance (float32 too)
    final = train_lib.train(c, str(tmp_path))
    m = read_metrics(tmp_path)
    assert all(np.isfinite(e["train_loss"]) for e in m)
    # measured: loss 2.46 -> 1.61, test accuracy 0.32 (float32: 2.41 -> 1.58, 0.35)
    assert m[1]["train_loss"] < m[0]["train_loss"] - 0.3, m
    assert final["test_accuracy"] > 0.2, final  # 10 classes: chance is 0.1
    run = load_run(str(tmp_path))
    assert (
        _float_dtypes(run.state.params)
        == _float_dtypes(run.state.opt_state)
        == {np.dtype("float32")}
    )
    variables = {"params": run.state.params, **run.state.model_state}
    x = jnp.asarray(run.dataset.test_images[:8])
    assert x.dtype == jnp.float32
    assert _activation_dtypes(run.spec.module, variables, x) == (
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.float32,
    )


@pytest.mark.parametrize(("name", "dtype"), [("deq", "float16"), ("explicit", "bfloat16")])
def test_model_dtype_sets_the_activations_dtype(name, dtype):
    """float16 and the explicit twin too; "float32" (the default) leaves float32 images
    computed in float32."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
    for value, want in ((dtype, jnp.dtype(dtype)), ("float32", jnp.dtype("float32"))):
        c = tiny_config(name=name)
        c.model.dtype = value
        spec = models.build(c, 10)
        state = common.init_state(spec.module, common.build_optimizer(c.train, 10), (28, 28, 1), 0)
        assert _float_dtypes(state.params) == {np.dtype("float32")}
        variables = {"params": state.params, **state.model_state}
        assert _activation_dtypes(spec.module, variables, x) == (want, want, jnp.float32)


def test_invalid_model_dtype_is_refused(tmp_path):
    from experiments.common import ConfigError

    c = tiny_config()
    c.model.dtype = "float8"
    with pytest.raises(ConfigError, match=r"config\.model\.dtype = 'float8': must be one of"):
        train_lib.train(c, str(tmp_path / "run"))
    c = tiny_config()
    c.model.name, c.model.dtype = "lyadeq", "bfloat16"
    with pytest.raises(ConfigError, match="the 'lyadeq' family computes in float32 only"):
        train_lib.train(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
