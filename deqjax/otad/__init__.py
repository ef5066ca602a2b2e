"""OTAD: optimal-transport-induced adversarial defence (Gai, Wang & Zhang,
arXiv:2408.00329) -- OT-regularised residual network, convex integration
(interpolation LP + test-time dual QP), neighbours, neural CIP, inference."""

from deqjax.otad.cip import (
    FORMS,
    CIPResult,
    cip_dual,
    cip_feature,
    cip_objective,
    cip_pieces,
    convex_integration,
)
from deqjax.otad.interpolation import (
    Potentials,
    interpolate_potentials,
    interpolation_margins,
    least_potentials,
    solve_potentials,
)
from deqjax.otad.neighbours import batch_hard_triplet_loss, knn, pairwise_sq_dists, triplet_loss
from deqjax.otad.neural_cip import NeuralCIP, neural_cip_loss
from deqjax.otad.predict import (
    build_index,
    cip_targets,
    gather_neighbours,
    neural_otad_logits,
    otad_logits,
)
from deqjax.otad.qp import projection_simplex, simplex_qp
from deqjax.otad.resnet import OTResNet, ResidualBranch, otad_loss, transport_cost

__all__ = [
    "FORMS",
    "CIPResult",
    "cip_dual",
    "cip_feature",
    "cip_objective",
    "cip_pieces",
    "convex_integration",
    "Potentials",
    "interpolate_potentials",
    "interpolation_margins",
    "least_potentials",
    "solve_potentials",
    "batch_hard_triplet_loss",
    "knn",
    "pairwise_sq_dists",
    "triplet_loss",
    "NeuralCIP",
    "neural_cip_loss",
    "build_index",
    "cip_targets",
    "gather_neighbours",
    "neural_otad_logits",
    "otad_logits",
    "projection_simplex",
    "simplex_qp",
    "OTResNet",
    "ResidualBranch",
    "otad_loss",
    "transport_cost",
]
