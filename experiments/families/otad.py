"""The ``otad`` model family: OTAD (Gai, Wang & Zhang, "OTAD: An Optimal
Transport-Induced Robust Model for Agnostic Adversarial Attack",
arXiv:2408.00329) in the experiment framework.

Three registered names share one trained network, so that the comparison is
"the same network with and without OTAD":

* ``otad_resnet`` -- the OT-regularised ResNet (:class:`OTADNet`, a thin
  adapter over :class:`deqjax.otad.OTResNet` with the framework's convention
  ``module(x) -> (logits, None)``). It sows the transport cost
  ``mean_batch sum_k |x^{k+1} - x^k|^2`` into the ``"losses"`` collection and
  ``ModelSpec.regularizers`` weights it by ``otad.transport_weight``, so
  ``experiments.train`` minimises ``CE + lambda * transport`` (docs/methods/otad.md).
* ``otad`` -- the same training; at test time the feature ``T(x^0)`` is
  replaced by the CIP solution on the K nearest training points.
* ``otad_nn`` -- as ``otad`` plus a :class:`deqjax.otad.NeuralCIP` trained
  (MSE) on CIP-solver targets, differentiable end to end.

After training, :func:`fit` (run by ``python -m experiments.otad_fit``, or
automatically by ``experiments.otad_evaluate``) stores in the workdir the
training-set index (embeddings ``x^0_j``, features ``z_j = T(x^0_j)``, search
keys) as ``otad_index.npz`` and, for ``otad_nn``, the neural-CIP parameters as
``otad_neural_cip.msgpack``; :func:`load_fit` reads them back.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deqjax.bpda import adaptive_views
from deqjax.otad import (
    FORMS,
    NeuralCIP,
    OTResNet,
    cip_targets,
    knn,
    neural_cip_loss,
    neural_otad_logits,
    otad_logits,
)
from experiments import common
from experiments.spec import Evaluated, ModelSpec, split_list

FAMILY = ("otad_resnet", "otad", "otad_nn")
NEIGHBOUR_SPACES = ("embedding", "input")
INDEX_FILE, CIP_FILE, FIT_FILE = "otad_index.npz", "otad_neural_cip.msgpack", "otad_fit.json"


class OTADNet(OTResNet):
    """:class:`~deqjax.otad.OTResNet` with the framework's calling convention.

    ``__call__(images) -> (logits, None)``; the transport cost is sown into the
    ``"losses"`` collection (a no-op when that collection is not mutable, e.g. at
    evaluation). ``embed``/``flow``/``head`` are inherited, so
    :func:`deqjax.otad.otad_logits` works on this module directly.
    """

    def __call__(self, images):
        out = OTResNet.__call__(self, images)
        self.sow("losses", "transport_cost", out["transport_cost"])
        return out["logits"], None

    def features(self, images):
        """``(x^0, T(x^0))``: flattened embeddings and features (B, d) each."""
        x0 = self.embed(images)
        return x0, self.flow(x0)[0]


def check_otad_config(config) -> None:
    """ValueError for a config that cannot describe an OTAD run."""
    if config.model.name not in FAMILY:
        raise ValueError(
            f"model.name {config.model.name!r} is not an OTAD model; choose one of {FAMILY}"
        )
    o = config.otad
    if o.form not in FORMS:
        raise ValueError(f"unknown otad.form {o.form!r}; choose one of {FORMS}")
    if o.neighbours not in NEIGHBOUR_SPACES:
        raise ValueError(
            f"unknown otad.neighbours {o.neighbours!r}; choose one of {NEIGHBOUR_SPACES}"
        )
    if not (0 <= float(o.l) < float(o.L)):
        raise ValueError(f"need 0 <= otad.l < otad.L; got l={o.l}, L={o.L}")
    if int(o.k) < 1:
        raise ValueError(f"otad.k (neighbours) must be >= 1; got {o.k}")


def build(config, num_classes: int) -> ModelSpec:
    """The OTAD family (``otad_resnet``, ``otad``, ``otad_nn``: one trained network)."""
    check_otad_config(config)
    m = config.model
    module = OTADNet(
        num_classes=num_classes,
        width=int(m.width),
        num_blocks=int(m.num_blocks),
        block=str(m.block),
        hidden=int(m.hidden),
        zero_init_residual=bool(m.zero_init_residual),
        image_shape=tuple(int(s) for s in m.image_shape),
    )
    return ModelSpec(
        module=module,
        is_deq=False,
        regularizers={"transport_cost": float(config.otad.transport_weight)},
        views=views,
    )


# --- the post-training step: index and neural CIP ----------------------------------


class OTADFit(NamedTuple):
    """What the test-time models need besides the network parameters.

    x0 (N, d) embeddings and z (N, d) features ``T(x0)`` of the indexed training
    points; keys (N, e) the neighbour-search keys (= x0 for ``embedding``, the
    flattened images for ``input``); labels (N,); cip_params the NeuralCIP
    parameters or None."""

    x0: np.ndarray
    z: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    cip_params: object = None


def search_keys(module: OTADNet, params, images, space: str):
    """Neighbour-search keys of a batch: embeddings ``x^0`` or flattened pixels."""
    if space == "input":
        return images.reshape(images.shape[0], -1)
    if space == "embedding":
        return module.apply({"params": params}, images, method="embed")
    raise ValueError(f"unknown neighbour space {space!r}; choose one of {NEIGHBOUR_SPACES}")


def compute_index(module: OTADNet, params, images, space: str = "embedding", batch_size: int = 500):
    """``(x0, z, keys)`` of training images, computed in jitted chunks."""
    feats = jax.jit(lambda p, x: module.apply({"params": p}, x, method="features"))
    outs = [feats(params, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    x0 = np.concatenate([np.asarray(a) for a, _ in outs])
    z = np.concatenate([np.asarray(b) for _, b in outs])
    keys = x0 if space == "embedding" else np.asarray(images).reshape(len(images), -1)
    return x0, z, keys


def neighbours_excluding(query_keys, keys, self_idx, k: int):
    """Indices (B, k) of the k nearest keys, never the query's own index ``self_idx``
    (B,) (use -1 for none): the queries of neural-CIP training are (perturbed)
    training points, which must not see themselves among their neighbours."""
    _, idx = knn(query_keys, keys, k + 1)
    order = jnp.argsort(idx == self_idx[:, None], axis=1, stable=True)[:, :k]
    return jnp.take_along_axis(idx, order, axis=1)


def cip_kwargs(o) -> dict:
    """Keyword arguments of :func:`deqjax.otad.otad_logits` from ``config.otad``."""
    return dict(
        k=int(o.k),
        l=float(o.l),
        L=float(o.L),
        form=str(o.form),
        n_relax=int(o.n_relax),
        factor=float(o.factor),
        maxiter=int(o.maxiter),
    )


def fit_neural_cip(module: OTADNet, params, fit: OTADFit, images, o, seed: int = 0):
    """Train :class:`NeuralCIP` (MSE) to reproduce the CIP solver (Gai et al., OTAD-NN).

    Queries are the indexed training images and ``o.cip_noisy_copies`` copies
    perturbed by uniform noise of per-example L_inf radius ``U(0, o.cip_noise)`` (the
    net must be accurate off the data too, where attacks go), each with its K
    nearest training points other than itself; targets are the CIP-solver features
    (:func:`deqjax.otad.cip_targets`). Returns ``(cip_params, stats)``, stats with
    the final training MSE and the relative error on 10% held-out queries.
    """
    k, bs = int(o.k), int(o.fit_batch_size)
    key = jax.random.PRNGKey(seed)
    n = len(images)
    reps = [np.asarray(images)]
    for c in range(int(o.cip_noisy_copies)):
        kr, ku = jax.random.split(jax.random.fold_in(key, c))
        r = jax.random.uniform(kr, (n, 1, 1, 1), maxval=float(o.cip_noise))
        noise = r * jax.random.uniform(ku, images.shape, minval=-1.0, maxval=1.0)
        reps.append(np.asarray(jnp.clip(images + noise, 0.0, 1.0)))
    q_images = np.concatenate(reps)
    self_idx = np.tile(np.arange(n), len(reps))
    fx0, fz = jnp.asarray(fit.x0), jnp.asarray(fit.z)
    embed = jax.jit(lambda p, x: module.apply({"params": p}, x, method="embed"))
    targets_fn = jax.jit(
        lambda x0, idx: cip_targets(
            x0,
            fx0[idx],
            fz[idx],
            l=float(o.l),
            L=float(o.L),
            form=str(o.form),
            n_relax=int(o.n_relax),
            factor=float(o.factor),
            maxiter=int(o.maxiter),
        )
    )
    nb = jax.jit(lambda q, s: neighbours_excluding(q, jnp.asarray(fit.keys), s, k))
    X0, IDX, TGT = [], [], []
    for i in range(0, len(q_images), bs):
        xb = jnp.asarray(q_images[i : i + bs])
        x0 = embed(params, xb)
        q = x0 if o.neighbours == "embedding" else xb.reshape(len(xb), -1)
        idx = nb(q, jnp.asarray(self_idx[i : i + bs]))
        X0.append(np.asarray(x0))
        IDX.append(np.asarray(idx))
        TGT.append(np.asarray(targets_fn(x0, idx)))
    X0, IDX, TGT = map(np.concatenate, (X0, IDX, TGT))
    perm = np.random.default_rng(seed).permutation(len(X0))
    n_val = max(1, len(X0) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    net = NeuralCIP(hidden=int(o.cip_hidden))
    cip_params = net.init(jax.random.fold_in(key, 99), X0[:2], fit.x0[IDX[:2]], fit.z[IDX[:2]])
    sched = optax.cosine_decay_schedule(float(o.cip_learning_rate), int(o.cip_steps))
    opt = optax.adam(sched)
    opt_state = opt.init(cip_params)

    @jax.jit
    def step(cp, st, x0, idx, tgt):
        loss, g = jax.value_and_grad(
            lambda p: neural_cip_loss(net.apply(p, x0, fx0[idx], fz[idx]), tgt)
        )(cp)
        upd, st = opt.update(g, st, cp)
        return optax.apply_updates(cp, upd), st, loss

    rng = np.random.default_rng(seed + 1)
    cb = int(o.cip_batch_size)
    for _ in range(int(o.cip_steps)):
        b = rng.choice(tr, cb, replace=False)
        cip_params, opt_state, loss = step(cip_params, opt_state, X0[b], IDX[b], TGT[b])
    pred = jax.jit(net.apply)(cip_params, X0[val], fit.x0[IDX[val]], fit.z[IDX[val]])
    rel = float(jnp.linalg.norm(pred - TGT[val]) / jnp.linalg.norm(TGT[val]))
    head = jax.jit(lambda g: module.apply({"params": params}, g, method="head"))
    agree = float(jnp.mean(jnp.argmax(head(pred), -1) == jnp.argmax(head(TGT[val]), -1)))
    return cip_params, {
        "cip_train_mse": float(loss),
        "cip_val_rel_error": rel,
        "cip_val_class_agreement": agree,
        "cip_queries": int(len(X0)),
    }


def load_fit(workdir: str, config) -> OTADFit:
    """Read what :func:`experiments.otad_fit.fit` stored (FileNotFoundError naming the
    fix if missing); local or ``gs://``."""
    path = os.path.join(workdir, INDEX_FILE)
    data = common.read_bytes(path)
    if data is None:
        raise FileNotFoundError(
            f"{path} not found: run `python -m experiments.otad_fit "
            f"--workdir {workdir}` after training"
        )
    d = np.load(io.BytesIO(data))
    cip_params = None
    if config.model.name == "otad_nn":
        cpath = os.path.join(workdir, CIP_FILE)
        blob = common.read_bytes(cpath)
        if blob is None:
            raise FileNotFoundError(f"{cpath} not found: run experiments.otad_fit again")
        k = int(config.otad.k)
        net = NeuralCIP(hidden=int(config.otad.cip_hidden))
        template = net.init(jax.random.PRNGKey(0), d["x0"][:1], d["x0"][None, :k], d["z"][None, :k])
        cip_params = flax.serialization.from_bytes(template, blob)
    return OTADFit(d["x0"], d["z"], d["keys"], d["labels"], cip_params)


# --- the evaluated models and their attacked views ------------------------------


def model_logits(spec, state, fit: OTADFit, config) -> dict:
    """``{"otad_resnet", "otad"[, "otad_nn"]}``: batched logits functions of images —
    the trained network alone, with the CIP solver, and with the neural CIP."""
    module, variables = spec.module, {"params": state.params}
    o = config.otad
    index_x0, index_z = jnp.asarray(fit.x0), jnp.asarray(fit.z)
    keys = None if o.neighbours == "embedding" else jnp.asarray(fit.keys)

    def query(x):
        return None if keys is None else x.reshape(x.shape[0], -1)

    out = {"otad_resnet": lambda x: module.apply(variables, x)[0]}
    kw = cip_kwargs(o)
    out["otad"] = lambda x: otad_logits(
        module, variables, index_x0, index_z, x, **kw, index_keys=keys, query_keys=query(x)
    )[0]
    if fit.cip_params is not None:
        net = NeuralCIP(hidden=int(o.cip_hidden))
        out["otad_nn"] = lambda x: neural_otad_logits(
            module,
            variables,
            net,
            fit.cip_params,
            index_x0,
            index_z,
            x,
            k=int(o.k),
            index_keys=keys,
            query_keys=query(x),
        )
    return out


def model_views(logits: dict, protocols) -> dict:
    """``{model: Evaluated(score, views)}``: the plain network (``autodiff``) and each
    OTAD model with the adaptive views of :func:`deqjax.bpda.adaptive_views` around the
    network — ``autodiff`` (through the CIP solver's implicit QP gradient, or white-box
    through the neural CIP), ``bpda_autodiff`` (value of the OTAD model, gradient of the
    network) and ``transfer_autodiff`` (attacks on the network, scored on OTAD)."""
    net = logits["otad_resnet"]
    out = {"otad_resnet": Evaluated(net, {"autodiff": net})}
    protocols = tuple(p for p in protocols if p != "bpda_purified")  # no input transform
    for name in ("otad", "otad_nn"):
        if name in logits:
            views = adaptive_views(logits[name], {"autodiff": net}, protocols=protocols)
            out[name] = Evaluated(logits[name], views)
    return out


def views(run, r) -> dict:
    """The ``ModelSpec.views`` hook: every model a report of this workdir scores (the
    OTAD models need the fit of :mod:`experiments.otad_fit`)."""
    if run.config.model.name == "otad_resnet":
        fit = OTADFit(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1))
        logits = {"otad_resnet": model_logits(run.spec, run.state, fit, run.config)["otad_resnet"]}
    else:
        fit = load_fit(run.workdir, run.config)
        logits = model_logits(run.spec, run.state, fit, run.config)
    return model_views(logits, split_list(r.protocols))
