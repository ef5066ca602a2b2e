"""Convex Potential Layers (Meunier et al. 2022, "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML): 1-Lipschitz residual layers, power iteration for
the spectral norm of convolution operators, provable upper bounds by Gram iteration
(Delattre et al. 2023), CPL networks, hinge loss, certificates.
"""

from deqjax.cpl.bounds import conv_norm_bound, dense_norm_bound, gram_iteration_bound
from deqjax.cpl.certify import (
    CertifiedLogits,
    certified_accuracy,
    certified_logits,
    certified_radius,
    multiclass_hinge_loss,
)
from deqjax.cpl.layers import (
    conv,
    conv_cpl,
    conv_transpose,
    cpl_step_size,
    dense_cpl,
    sum_pool_lipschitz,
)
from deqjax.cpl.network import (
    COLLECTION,
    SIGMA_COLLECTION,
    SIGMA_MODES,
    ConvCPL,
    CPLNet,
    DenseCPL,
    RowNormalizedDense,
    last_layer_weight,
    prepare_sigmas,
    row_normalize,
)
from deqjax.cpl.power_iteration import (
    conv_spectral_norm,
    converged_power_iteration,
    dense_spectral_norm,
    power_iteration,
)

__all__ = [
    "COLLECTION",
    "CPLNet",
    "CertifiedLogits",
    "ConvCPL",
    "DenseCPL",
    "RowNormalizedDense",
    "SIGMA_COLLECTION",
    "SIGMA_MODES",
    "certified_accuracy",
    "certified_logits",
    "certified_radius",
    "conv",
    "conv_cpl",
    "conv_norm_bound",
    "conv_spectral_norm",
    "conv_transpose",
    "converged_power_iteration",
    "cpl_step_size",
    "dense_cpl",
    "dense_norm_bound",
    "dense_spectral_norm",
    "gram_iteration_bound",
    "last_layer_weight",
    "multiclass_hinge_loss",
    "power_iteration",
    "prepare_sigmas",
    "row_normalize",
    "sum_pool_lipschitz",
]
