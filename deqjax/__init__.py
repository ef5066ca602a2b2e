"""deqjax: adversarially robust implicit (DEQ) and Lipschitz networks in JAX.

The core is pure functions on arrays and pytrees (usable inside your own
``jit``/``vmap``/``grad``); Flax modules in :mod:`deqjax.models` wrap them.
"""

from deqjax.conv import conv2d
from deqjax.deq import (ADJOINT_SOLVERS, BACKWARD_MODES, DEQConfig, adjoint_solve, damped_steps,
                        deq_fixed_point, jacobian_frobenius_sq)
from deqjax.solvers import SOLVERS, SolverConfig, SolverStats, solve

__version__ = "0.1.0"
