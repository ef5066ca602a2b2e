"""The ``otad`` family in the experiment framework (Gai, Wang & Zhang,
arXiv:2408.00329): training through experiments.train with the sown transport cost,
the post-training fit (index + neural CIP), the reports, the BPDA view (value of the
CIP model, gradient of the original network), and the CIP batched under jit/vmap."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deqjax.otad import knn, otad_loss
from experiments import models
from experiments import otad_evaluate as oe
from experiments import train as train_lib
from experiments.configs import otad_mnist_nn
from experiments.families import otad as fam
from experiments.otad_fit import fit
from experiments.workdir import load_run


def tiny_config():
    c = otad_mnist_nn.get_config()
    c.limit_train, c.limit_test = 256, 100
    c.model.width, c.model.num_blocks = 4, 2
    c.train.epochs, c.train.batch_size, c.train.progress = 1, 32, False
    c.train.warmup_steps, c.train.checkpoint_every_steps = 2, 100
    c.eval.batch_size = 100
    c.otad.k, c.otad.maxiter = 5, 100
    c.otad.cip_steps, c.otad.cip_batch_size, c.otad.cip_hidden = 40, 64, 16
    c.otad.also_norm = ""  # one norm keeps the compile count (and the test) short
    c.robustness.after_training = False
    # autodiff through the CIP compiles the QP's backward: it is checked in the bpda test
    c.robustness.protocols = "bpda"
    c.robustness.update(
        n_examples=16, n_iter=2, n_queries=10, batch_size=16, eps="0.1,0.3", attacks="fgsm"
    )
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("otad"))
    final = train_lib.train(tiny_config(), workdir)
    stats = fit(workdir)
    config, spec, state, ds, _ = load_run(workdir)
    return dict(
        workdir=workdir,
        final=final,
        stats=stats,
        config=config,
        spec=spec,
        state=state,
        ds=ds,
        fit=fam.load_fit(workdir, config),
    )


def test_trains_with_the_weighted_transport_cost(run):
    with open(os.path.join(run["workdir"], "metrics.jsonl")) as fh:
        m = [json.loads(line) for line in fh]
    assert m[0]["train_transport_cost"] > 0 and 0 <= run["final"]["test_accuracy"] <= 1
    c, spec, state, ds = run["config"], run["spec"], run["state"], run["ds"]
    assert spec.regularizers == {"transport_cost": c.otad.transport_weight}
    x, y = jnp.asarray(ds.train_images[:8]), jnp.asarray(ds.train_labels[:8])
    loss, (aux, _) = train_lib.make_loss_fn(spec, c)(
        state.params, {}, x, y, jax.random.PRNGKey(0), jnp.zeros((8, 2))
    )
    out = fam.OTResNet.__call__  # the loss is CE + lambda * transport of the wrapped ResNet
    ref = spec.module.apply({"params": state.params}, x, method=lambda mdl, a: out(mdl, a))
    expected = otad_loss(ref["logits"], y, ref["transport_cost"], c.otad.transport_weight)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["transport_cost"], ref["transport_cost"], rtol=1e-5)


def test_fit_stores_index_and_neural_cip(run):
    fit, spec, state, ds = run["fit"], run["spec"], run["state"], run["ds"]
    assert fit.x0.shape == fit.z.shape == (256, run["stats"]["embedding_dim"])
    x0, z = spec.module.apply({"params": state.params}, ds.train_images[:5], method="features")
    np.testing.assert_allclose(fit.x0[:5], x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.z[:5], z, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fit.labels, ds.train_labels[:256])
    assert fit.cip_params is not None
    # the neural CIP beats predicting zero and mostly keeps the solver's class
    assert run["stats"]["cip_val_rel_error"] < 0.9
    assert run["stats"]["cip_val_class_agreement"] > 0.5


def test_neighbours_never_include_self():
    keys = jax.random.normal(jax.random.PRNGKey(0), (30, 4))
    q = keys[:10] + 1e-3  # each query's nearest key is itself
    idx = fam.neighbours_excluding(q, keys, jnp.arange(10), 3)
    _, ref = knn(q, keys, 4)
    assert not np.any(np.asarray(idx) == np.arange(10)[:, None])
    np.testing.assert_array_equal(idx, ref[:, 1:])
    # -1 (no self) keeps the plain k nearest
    np.testing.assert_array_equal(
        fam.neighbours_excluding(q, keys, -jnp.ones(10, int), 3), ref[:, :3]
    )


def _logits(run, **otad):
    c = run["config"]
    c = c.copy_and_resolve_references()
    c.otad.update(otad)
    fit = run["fit"]
    if otad.get("neighbours") == "input":
        imgs = run["ds"].train_images[:256]
        fit = fit._replace(keys=imgs.reshape(len(imgs), -1))
    return fam.model_logits(run["spec"], run["state"], fit, c), c


def test_bpda_value_is_cip_gradient_is_network(run):
    logits, c = _logits(run)
    evaluated = fam.model_views(logits, ["autodiff", "bpda", "transfer"])
    views = {m: e.views for m, e in evaluated.items()}
    assert list(views["otad"]) == ["autodiff", "bpda_autodiff", "transfer_autodiff"]
    assert evaluated["otad"].score is logits["otad"]
    x = jnp.asarray(run["ds"].test_images[:5])
    v = jax.random.normal(jax.random.PRNGKey(0), (5, 10))

    @jax.jit
    def value_and_vjp(a):  # logits and the input gradient for the cotangent v
        out = {}
        for name, f in [
            ("net", logits["otad_resnet"]),
            ("bpda", views["otad"]["bpda_autodiff"]),
            ("nn_bpda", views["otad_nn"]["bpda_autodiff"]),
            ("nn", views["otad_nn"]["autodiff"]),
            ("implicit", views["otad"]["autodiff"]),
        ]:
            val, pull = jax.vjp(f, a)
            out[name] = (val, pull(v)[0])
        return out, logits["otad"](a), logits["otad_nn"](a)

    out, cip, nn = value_and_vjp(x)
    np.testing.assert_array_equal(out["bpda"][0], cip)
    np.testing.assert_array_equal(out["nn_bpda"][0], nn)
    np.testing.assert_array_equal(out["implicit"][0], cip)
    g_net = out["net"][1]
    np.testing.assert_allclose(out["bpda"][1], g_net, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["nn_bpda"][1], g_net, rtol=1e-5, atol=1e-7)
    # the white-box view differentiates through the neural CIP: another, non-zero gradient
    g_nn = out["nn"][1]
    assert np.all(np.isfinite(g_nn)) and float(jnp.abs(g_nn).max()) > 0
    assert float(jnp.abs(g_nn - g_net).max()) > 1e-3 * float(jnp.abs(g_net).max())
    assert np.all(np.isfinite(out["implicit"][1]))
    # OTAD changes the logits, not the network: the CIP model's logits differ from T's
    assert not np.allclose(cip, out["net"][0])


@pytest.mark.parametrize("space", ["embedding", pytest.param("input", marks=pytest.mark.slow)])
def test_cip_batched_under_jit_and_vmap_matches_one_by_one(run, space):
    logits, _ = _logits(run, neighbours=space, form="authors" if space == "input" else "envelope")
    f = logits["otad"]
    x = jnp.asarray(run["ds"].test_images[:5])
    batched = jax.jit(f)(x)
    single = jax.jit(f)
    one_by_one = jnp.concatenate([single(x[i : i + 1]) for i in range(5)])
    vmapped = jax.jit(jax.vmap(lambda a: f(a[None])[0]))(x)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vmapped, one_by_one, rtol=1e-5, atol=1e-5)


def test_reports_for_the_three_models(run):
    out = oe.evaluate(run["workdir"], quiet=True)
    wd = run["workdir"]
    assert set(out) >= {"otad_resnet", "otad", "otad_nn", "cip", "fit"}
    for name, views in [
        ("otad_resnet", ["autodiff"]),
        ("otad", ["bpda_autodiff"]),
        ("otad_nn", ["bpda_autodiff"]),
    ]:
        for ext in ("json", "md", "png"):
            assert os.path.getsize(os.path.join(wd, f"report_{name}_linf.{ext}")) > 0
        rep = out[name]["linf"]
        assert rep["views"] == views and rep["model"] == name
        for eps in ("0.1", "0.3"):
            per = rep["robust_accuracy"][eps]
            assert set(per) == {f"fgsm/{v}" for v in views}
            assert rep["worst_case"][eps] <= min(per.values()) + 1e-12
            assert rep["worst_case"][eps] <= rep["clean_accuracy"]
    # OTAD clean accuracy is the CIP logits' accuracy (the OTAD model scores every attack)
    x, y = run["ds"].test_images[:16], run["ds"].test_labels[:16]
    logits, _ = _logits(run)
    acc = float(np.mean(np.argmax(jax.jit(logits["otad"])(x), -1) == y))
    assert out["otad"]["linf"]["clean_accuracy"] == acc
    assert 0 <= out["cip"]["relaxed_fraction"] <= 1 and out["cip"]["mean_L_used"] >= 2.0
    text = open(os.path.join(wd, "otad_report.md")).read()
    assert "OTAD (CIP solver)" in text and "OTAD-NN" in text and "ResNet (no OTAD)" in text


def test_bad_configs_raise(tmp_path):
    c = tiny_config()
    c.otad.form = "nope"
    with pytest.raises(ValueError, match="otad.form"):
        models.build(c, 10)
    c = tiny_config()
    c.otad.neighbours = "pixels"
    with pytest.raises(ValueError, match="otad.neighbours"):
        models.build(c, 10)
    c = tiny_config()
    c.otad.L = 0.0
    with pytest.raises(ValueError, match="l < otad.L"):
        models.build(c, 10)
    with pytest.raises(FileNotFoundError, match="otad_fit"):
        fam.load_fit(str(tmp_path), tiny_config())
