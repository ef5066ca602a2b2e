"""The ``cpl`` model family: Convex Potential Layer networks (Meunier et al. 2022,
"A Dynamical System Perspective for Lipschitz Neural Networks", ICML) in the
experiment framework, with an ℓ2 certificate section in the robustness report.

Training steps run 1 power iteration per layer from the persistent vectors (the
``"power_iteration"`` collection is mutable, so they are carried across steps).
Evaluation — test accuracy, every attack view, and the certificate — runs
``model.eval_power_iters`` iterations from the stored vectors without storing them;
the computation is deterministic, so the network the attacks see and the network
that is certified use the same spectral-norm estimates σ.

``certified_accuracy`` is the certificate of Meunier et al. (it takes those σ as the
operator norms). Power iteration only gives lower bounds that converge slowly when
the top singular values are clustered (as for convolutions), so the report also
gives a provable upper bound on the Lipschitz constant of the evaluated network
(:func:`lipschitz_upper_bound`), ``certified_accuracy_provable`` with the radii
divided by it, and how much σ still moves when the iterations are doubled.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deqjax.cpl import (
    COLLECTION,
    CPLNet,
    certified_accuracy,
    certified_radius,
    conv_spectral_norm,
    cpl_step_size,
    dense_spectral_norm,
    row_normalize,
)
from experiments.spec import ModelSpec


class CPLClassifier(nn.Module):
    """:class:`deqjax.cpl.CPLNet` with the framework's convention ``(logits, None)``.

    ``n_power_iters=None`` runs ``power_iters`` (1) iterations — the training call;
    evaluation passes ``n_power_iters=eval_power_iters``.
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
        self.net = CPLNet(
            self.depth,
            self.depth_linear,
            self.conv_channels,
            self.conv_inner,
            self.linear_width,
            self.num_classes,
            self.last_layer,
            self.kernel_size,
            self.pool,
            self.padding,
            self.power_iters,
        )

    def __call__(self, x, n_power_iters: int | None = None):
        return self.net(x, n_power_iters), None


# --- spectral norms of the stored network ------------------------------------------


def _layers(module: CPLClassifier, variables):
    """``[(name, kind, kernel, u)]`` of every CPL, in network order."""
    params, state = variables["params"]["net"], variables[COLLECTION]["net"]
    out = [
        (f"convs_{i}", "conv", params[f"convs_{i}"]["kernel"], state[f"convs_{i}"]["u"])
        for i in range(module.depth)
    ]
    out += [
        (f"denses_{i}", "dense", params[f"denses_{i}"]["kernel"], state[f"denses_{i}"]["u"])
        for i in range(module.depth_linear)
    ]
    return out


def layer_sigmas(module: CPLClassifier, variables, n_iters: int) -> dict:
    """``{layer: σ}`` after ``n_iters`` power iterations from the stored vectors —
    exactly the σ a forward call with ``n_power_iters=n_iters`` uses."""
    out = {}
    for name, kind, w, u in _layers(module, variables):
        if kind == "conv":
            out[name] = conv_spectral_norm(w, u, n_iters, 1, module.padding)[0]
        else:
            out[name] = dense_spectral_norm(w, u, n_iters)[0]
    return out


def conv_norm_upper_bound(kernel: jax.Array, height: int, width: int, padding: str) -> jax.Array:
    """An upper bound on ‖W‖₂ of the stride-1 conv operator at input size H×W.

    A circular conv on an N×M torus is block-diagonalised by the 2-D DFT, so its
    norm is ``max_ω σ_max(K̂(ω))`` over the N·M frequencies (Sedghi et al. 2019,
    "The Singular Values of Convolutional Layers", ICLR). A zero-padded ('SAME')
    conv on H×W is a restriction of the circular conv on the (H+k−1)×(W+k−1)
    torus to zero-extended inputs and to H×W outputs, so its norm is at most that.
    """
    kh, kw, _, _ = kernel.shape
    n, m = (height, width) if padding.upper() == "CIRCULAR" else (height + kh - 1, width + kw - 1)
    k_hat = jnp.fft.fft2(kernel.astype(jnp.float32), s=(n, m), axes=(0, 1))  # (n, m, cin, cout)
    return jnp.max(jnp.linalg.svd(k_hat, compute_uv=False))


def lipschitz_upper_bound(module: CPLClassifier, variables, n_iters: int, image_shape) -> dict:
    """A provable ℓ2 Lipschitz bound of the network evaluated with ``n_iters`` iterations.

    A CPL with step ``h = 2/(σ²+1e-4)`` has Jacobian ``I − h Wᵀ D W`` with eigenvalues in
    ``[1 − h‖W‖², 1]``, hence Lipschitz constant ``max(1, h‖W‖² − 1)`` (Meunier et al.
    2022, Prop. 3); with ``‖W‖`` replaced by an upper bound (exact SVD for dense layers,
    :func:`conv_norm_upper_bound` for convs) the product over layers bounds the network
    (padding, pooling and truncation are 1-Lipschitz). Returns ``{"bound", "per_layer"}``.
    """
    sig = jax.jit(lambda v: layer_sigmas(module, v, n_iters))(variables)
    h, w = image_shape[0], image_shape[1]
    per = {}
    for name, kind, kernel, _ in _layers(module, variables):
        if kind == "conv":
            upper = conv_norm_upper_bound(kernel, h, w, module.padding)
        else:
            upper = jnp.linalg.norm(kernel, 2)
        per[name] = float(jnp.maximum(1.0, cpl_step_size(sig[name]) * upper**2 - 1.0))
    return {"bound": float(np.prod(list(per.values()) or [1.0])), "per_layer": per}


# --- the report section ----------------------------------------------------------


def certify_hook(spec: ModelSpec, state, x, y, eps_list, r) -> dict:
    """Certified accuracy of the evaluated network (Meunier et al. 2022, Sec. 6).

    Logits come from the same call as the attack views (``spec.eval_kwargs``), so the
    certificate is about the network that was attacked. Radius: ``(f_y − max_{j≠y}
    f_j)/√2`` (truncation) or ``min_j (f_y − f_j)/‖ŵ_y − ŵ_j‖`` (row-normalised last
    layer). ``certified_accuracy_provable`` divides the radii by
    :func:`lipschitz_upper_bound` when it exceeds 1, which makes it sound whether or
    not the power iteration has converged.
    """
    module = spec.module
    n_iters = int(spec.eval_kwargs.get("n_power_iters") or module.power_iters)
    variables = {"params": state.params, **state.model_state}
    apply = jax.jit(lambda a: module.apply(variables, a, **spec.eval_kwargs)[0])
    bs = int(r.batch_size)
    logits = jnp.concatenate([apply(x[i : i + bs]) for i in range(0, len(x), bs)])
    y = jnp.asarray(y)
    weight = None
    if module.last_layer == "row_normalized":
        weight = row_normalize(variables["params"]["net"]["last"]["kernel"])
    lip = lipschitz_upper_bound(module, variables, n_iters, x.shape[1:])
    radii = certified_radius(logits, y, module.last_layer, weight)
    correct = jnp.argmax(logits, -1) == y
    acc = certified_accuracy(radii, correct, eps_list)
    acc_provable = certified_accuracy(radii / max(1.0, lip["bound"]), correct, eps_list)
    s1, s2 = (
        jax.jit(lambda v, n=n: layer_sigmas(module, v, n))(variables)
        for n in (n_iters, 2 * n_iters)
    )
    gap = max([float((s2[k] - s1[k]) / s1[k]) for k in s1] or [0.0])
    return {
        "certified_accuracy": {str(float(e)): v for e, v in acc.items()},
        "certified_radius_mean": float(jnp.mean(radii)),
        "certified_radius_median": float(jnp.median(radii)),
        "certified_accuracy_provable": {str(float(e)): v for e, v in acc_provable.items()},
        "lipschitz_upper_bound": lip["bound"],
        "power_iteration": {"eval_iters": n_iters, "max_rel_sigma_change_at_2x_iters": gap},
    }


def build(config, num_classes: int) -> ModelSpec:
    """The ``cpl`` family: :class:`CPLClassifier` with the certificate report section."""
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
    eval_iters = int(m.eval_power_iters)
    if eval_iters < 1:
        raise ValueError(f"model.eval_power_iters must be >= 1, got {eval_iters}")
    return ModelSpec(
        module=module,
        is_deq=False,
        mutable=(COLLECTION,),
        eval_kwargs={"n_power_iters": eval_iters},
        report_hooks=(certify_hook,),
    )
