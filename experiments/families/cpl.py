"""The ``cpl`` model family: Convex Potential Layer networks (Meunier et al. 2022,
"A Dynamical System Perspective for Lipschitz Neural Networks", ICML) in the
experiment framework, with an ℓ2 certificate section in the robustness report.

Training steps run 1 power iteration per layer from the persistent vectors (the
``"power_iteration"`` collection is mutable, so they are carried across steps); the
per-epoch test accuracy runs ``model.eval_power_iters`` iterations in the forward.

Evaluation (``experiments.workdir.load_run`` calls :func:`prepare_eval` on the
restored state) computes every layer's σ once and stores it (:func:`deqjax.cpl.
prepare_sigmas`): a Gram-iteration upper bound on its operator norm and the power
iteration run to convergence. Test accuracy and every attack then run the network
with the upper bounds (``sigma="upper"``) — 1-Lipschitz by construction, no
iterations inside the forward call. The report's ``certified_accuracy`` is the
provable certificate of that network (:func:`deqjax.cpl.certified_logits`, which
recomputes the bounds from the parameters); ``certified_accuracy_conventional`` is
the certificate of Meunier et al., of the network stepped with the converged
power-iteration σ (lower bounds, so not a proof).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl import (
    COLLECTION,
    SIGMA_COLLECTION,
    CPLNet,
    certified_accuracy,
    certified_logits,
    certified_radius,
    cpl_step_size,
    prepare_sigmas,
    row_normalize,
)
from deqjax.stats import pack_bits
from experiments.spec import ModelSpec


class CPLClassifier(nn.Module):
    """:class:`deqjax.cpl.CPLNet` with the framework's convention ``(logits, None)``.

    ``sigma="iterate"`` with ``n_power_iters=None`` runs ``power_iters`` (1) iterations
    — the training call; see :mod:`deqjax.cpl.network` for the other ``sigma`` modes.
    """

    depth: int
    depth_linear: int
    conv_channels: int
    conv_inner: int
    linear_width: int
    num_classes: int
    last_layer: str = "truncate"
    kernel_size: int = 3
    pool: int = 4
    padding: str = "SAME"
    power_iters: int = 1

    def setup(self):
        self.net = cpl_net(self)

    def __call__(self, x, n_power_iters: int | None = None, sigma="iterate"):
        return self.net(x, n_power_iters, sigma), None


def cpl_net(module: CPLClassifier) -> CPLNet:
    """The :class:`CPLNet` inside a :class:`CPLClassifier` (same fields)."""
    fields = [f.name for f in dataclasses.fields(CPLNet) if f.name not in ("parent", "name")]
    return CPLNet(**{k: getattr(module, k) for k in fields})


def net_variables(variables) -> dict:
    """The CPLNet's variables inside a CPLClassifier's."""
    return {k: v["net"] for k, v in variables.items()}


# --- evaluation: σ computed once and stored ---------------------------------------


def prepare_eval(spec: ModelSpec, state, image_shape, *, rtol, max_iters, gram_iters):
    """``(spec, state)`` for evaluation: the state gains the ``"sigma"`` collection and
    the evaluated network uses the stored upper bounds (``sigma="upper"``)."""
    variables = {"params": state.params, **state.model_state}
    t0 = time.time()
    prepared = prepare_sigmas(
        spec.module,
        variables,
        jnp.zeros((1,) + tuple(image_shape), jnp.float32),
        power_rtol=rtol,
        max_power_iters=max_iters,
        gram_iters=gram_iters,
    )
    seconds = time.time() - t0
    state = dataclasses.replace(
        state, model_state={**state.model_state, SIGMA_COLLECTION: prepared[SIGMA_COLLECTION]}
    )
    spec = dataclasses.replace(
        spec,
        eval_kwargs={"sigma": "upper"},
        report_hooks=(functools.partial(certify_hook, prepare_seconds=seconds),),
    )
    return spec, state


def layer_sigmas(variables) -> dict:
    """``{layer: {"power", "upper", "power_steps"}}`` from a prepared state."""
    return jax.tree.map(float, dict(net_variables(variables)[SIGMA_COLLECTION]))


def conventional_lipschitz_bound(sigmas: dict) -> float:
    """A provable ℓ2 Lipschitz bound of the network stepped with power-iteration σ.

    A CPL with step ``h = 2/(σ²+1e-4)`` has Jacobian ``I − h Wᵀ D W`` with eigenvalues
    in ``[1 − h‖W‖², 1]``, hence Lipschitz constant ``max(1, h‖W‖² − 1)`` (Meunier et
    al. 2022, Prop. 3); with ``‖W‖`` replaced by its Gram upper bound the product over
    layers bounds the network (padding, pooling and truncation are 1-Lipschitz).
    """
    per = [
        max(1.0, float(cpl_step_size(jnp.float32(s["power"]))) * s["upper"] ** 2 - 1.0)
        for s in sigmas.values()
    ]
    return float(np.prod(per or [1.0]))


def _batched(apply, x, bs):
    return jnp.concatenate([apply(x[i : i + bs]) for i in range(0, len(x), bs)])


def certify_hook(spec: ModelSpec, state, x, y, eps_list, r, prepare_seconds=None) -> dict:
    """Certified accuracy, provable and conventional (Meunier et al. 2022, Sec. 6).

    Radius ``(f_y − max_{j≠y} f_j)/√2`` (truncation) or ``min_j (f_y − f_j)/‖ŵ_y − ŵ_j‖``
    (row-normalised last layer). Provable: logits from :func:`deqjax.cpl.certified_logits`
    (Gram upper bounds recomputed from the parameters); they are the logits of the
    attacked network (``attacked_vs_certified_max_logit_diff`` checks it). Conventional:
    the network stepped with the converged power-iteration σ, certified as if it were
    1-Lipschitz.
    """
    module = spec.module
    variables = {"params": state.params, **state.model_state}
    if SIGMA_COLLECTION not in variables:
        raise ValueError("the CPL certificate needs a prepared state (cpl.prepare_eval).")
    bs = int(r.batch_size)
    y = jnp.asarray(y)
    t0 = time.time()
    cert = certified_logits(cpl_net(module), net_variables(variables), x, batch_size=bs)
    certify_seconds = time.time() - t0
    radii = certified_radius(cert, y)
    correct = jnp.argmax(cert.logits, -1) == y
    attacked = _batched(jax.jit(lambda a: module.apply(variables, a, sigma="upper")[0]), x, bs)
    power = _batched(jax.jit(lambda a: module.apply(variables, a, sigma="power")[0]), x, bs)
    weight = None
    if module.last_layer == "row_normalized":
        weight = row_normalize(variables["params"]["net"]["last"]["kernel"])
    radii_conv = certified_radius(power, y, module.last_layer, weight, assume_lipschitz=True)
    correct_conv = jnp.argmax(power, -1) == y
    sig = layer_sigmas(variables)
    gap = max([s["upper"] / s["power"] - 1.0 for s in sig.values()] or [0.0])

    def table(acc):
        return {str(float(e)): v for e, v in acc.items()}

    def bits(r, ok):  # per-example certified flags, as certified_accuracy counts them
        r, ok = np.asarray(r), np.asarray(ok, bool)
        return {str(float(e)): pack_bits(ok if e <= 0 else ok & (r > e)) for e in eps_list}

    return {
        "outcomes": {
            "certified_accuracy": bits(radii, correct),
            "certified_accuracy_conventional": bits(radii_conv, correct_conv),
        },
        "certified_accuracy": table(certified_accuracy(radii, correct, eps_list)),
        "certified_accuracy_conventional": table(
            certified_accuracy(radii_conv, correct_conv, eps_list)
        ),
        "certified_radius_mean": float(jnp.mean(radii)),
        "certified_radius_median": float(jnp.median(radii)),
        "certificate": {
            "provable": "sigma = Gram-iteration upper bounds: the network is 1-Lipschitz",
            "conventional": "sigma = converged power iteration (lower bounds): not a proof",
            "clean_accuracy_conventional": float(jnp.mean(correct_conv)),
            "certified_radius_mean_conventional": float(jnp.mean(radii_conv)),
            "conventional_lipschitz_upper_bound": conventional_lipschitz_bound(sig),
            "max_rel_gap_upper_vs_power_sigma": gap,
            "attacked_vs_certified_max_logit_diff": float(jnp.max(jnp.abs(attacked - cert.logits))),
            "sigma": sig,
            "prepare_seconds": prepare_seconds,
            "certify_seconds": certify_seconds,
        },
    }


def build(config, num_classes: int) -> ModelSpec:
    """The ``cpl`` family: :class:`CPLClassifier`, σ prepared once at evaluation, the
    certificate report section."""
    m = config.model
    module = CPLClassifier(
        depth=int(m.depth),
        depth_linear=int(m.depth_linear),
        conv_channels=int(m.conv_channels),
        conv_inner=int(m.conv_inner),
        linear_width=int(m.linear_width),
        num_classes=num_classes,
        last_layer=str(m.last_layer),
        kernel_size=int(m.get("kernel_size", 3)),
        pool=int(m.pool),
        padding=str(m.get("padding", "SAME")),
    )
    cpl_net(module)  # validates the sizes now (e.g. num_classes > linear_width)
    eval_iters = int(m.eval_power_iters)
    if eval_iters < 1:
        raise ValueError(f"model.eval_power_iters must be >= 1, got {eval_iters}")
    rtol = float(m.get("converge_rtol", 1e-7))
    max_iters = int(m.get("converge_max_iters", 5000))
    gram_iters = int(m.get("gram_iters", 12))
    if not (rtol >= 0 and max_iters >= 1 and gram_iters >= 0):
        raise ValueError(
            "need model.converge_rtol >= 0, converge_max_iters >= 1, gram_iters >= 0; got "
            f"{rtol}, {max_iters}, {gram_iters}"
        )
    return ModelSpec(
        module=module,
        is_deq=False,
        mutable=(COLLECTION,),
        eval_kwargs={"n_power_iters": eval_iters},
        report_hooks=(certify_hook,),
        prepare_eval=functools.partial(
            prepare_eval, rtol=rtol, max_iters=max_iters, gram_iters=gram_iters
        ),
    )
