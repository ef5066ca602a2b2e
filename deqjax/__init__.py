"""deqjax: adversarially robust implicit (DEQ) and Lipschitz networks in JAX.

The core is pure functions on arrays and pytrees (usable inside your own
``jit``/``vmap``/``grad``); Flax modules in :mod:`deqjax.models` wrap them.
"""

from deqjax.bpda import adaptive_views, bpda, bpda_purified, straight_through
from deqjax.conv import conv2d, conv2d_transpose
from deqjax.deq import (
    ADJOINT_SOLVERS,
    BACKWARD_MODES,
    DEQConfig,
    adjoint_solve,
    damped_steps,
    deq_fixed_point,
    jacobian_frobenius_sq,
)
from deqjax.lyapunov import (
    StabilityReport,
    check_positive_definite,
    icnn_apply,
    icnn_init,
    lyapunov_value,
    project_dynamics,
    projected_dynamics,
    rehu,
    stability_check,
)
from deqjax.orthogonal import ORTHOGONAL_KINDS, OrthogonalDense, orthogonal_init, orthogonal_matrix
from deqjax.regulation import RandomSteps, entropy_reduction, prediction_entropy
from deqjax.solvers import SOLVERS, SolverConfig, SolverStats, solve

__version__ = "0.1.0"
