"""Convex Potential Layers (Meunier et al. 2022, "A Dynamical System Perspective for
Lipschitz Neural Networks", ICML): 1-Lipschitz residual layers, power iteration for
the spectral norm of convolution operators, CPL networks, hinge loss, certificates.
"""

from deqjax.cpl.certify import certified_accuracy, certified_radius, multiclass_hinge_loss
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
    ConvCPL,
    CPLNet,
    DenseCPL,
    RowNormalizedDense,
    last_layer_weight,
    row_normalize,
)
from deqjax.cpl.power_iteration import conv_spectral_norm, dense_spectral_norm, power_iteration

__all__ = [
    "COLLECTION",
    "CPLNet",
    "ConvCPL",
    "DenseCPL",
    "RowNormalizedDense",
    "certified_accuracy",
    "certified_radius",
    "conv",
    "conv_cpl",
    "conv_spectral_norm",
    "conv_transpose",
    "cpl_step_size",
    "dense_cpl",
    "dense_spectral_norm",
    "last_layer_weight",
    "multiclass_hinge_loss",
    "power_iteration",
    "row_normalize",
    "sum_pool_lipschitz",
]
