"""Monotone operator equilibrium networks (monDEQ) with a provable ℓ2 Lipschitz bound.

Winston & Kolter (2020), "Monotone operator equilibrium networks", NeurIPS:
``z* = ReLU(W z* + U x + b)`` with ``W = (1 − m) I − AᵀA + B − Bᵀ`` (``I − W ⪰ m I``),
fully connected or convolutional, solved by forward–backward or Peaceman–Rachford
splitting (:mod:`deqjax.mondeq.splitting`) and differentiated implicitly through
:func:`deqjax.deq.deq_fixed_point`. Pabbaraju, Winston & Kolter (2021), ICLR: the
logits are ``‖W_out‖₂‖U‖₂/m``-Lipschitz; :func:`lipschitz_bound` bounds the norms from
above by Gram iteration and :func:`certify` gives CPL's margin certificate
(:mod:`deqjax.mondeq.certify`). :class:`MonDEQClassifier` is the Flax model.
See docs/methods/mondeq.md.
"""

from deqjax.mondeq.certify import (
    Certificate,
    certify,
    head,
    lipschitz_bound,
    logit_scale,
    logits,
    norm_bounds,
)
from deqjax.mondeq.module import MonDEQClassifier, MonHead, MonInjection, MonotoneCell
from deqjax.mondeq.operators import (
    KINDS,
    MonDEQParams,
    apply_resolvent,
    apply_w,
    check_params,
    conv_symbol,
    features,
    init_params,
    inject,
    resolvent,
    w_matrix,
    w_symbol,
)
from deqjax.mondeq.splitting import (
    DEFAULT_CONFIG,
    SPLITTINGS,
    check_step,
    equilibrium,
    fb_max_step,
    fb_step,
    make_cell,
    monotone_part_norm_bound,
    pr_step,
    residual,
)

__all__ = [
    "Certificate",
    "DEFAULT_CONFIG",
    "KINDS",
    "MonDEQClassifier",
    "MonDEQParams",
    "MonHead",
    "MonInjection",
    "MonotoneCell",
    "SPLITTINGS",
    "apply_resolvent",
    "apply_w",
    "certify",
    "check_params",
    "check_step",
    "conv_symbol",
    "equilibrium",
    "fb_max_step",
    "fb_step",
    "features",
    "head",
    "init_params",
    "inject",
    "lipschitz_bound",
    "logit_scale",
    "logits",
    "make_cell",
    "monotone_part_norm_bound",
    "norm_bounds",
    "pr_step",
    "residual",
    "resolvent",
    "w_matrix",
    "w_symbol",
]
