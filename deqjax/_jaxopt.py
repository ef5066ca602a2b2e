"""The one module of deqjax that imports jaxopt.

jaxopt is unmaintained upstream and emits a ``DeprecationWarning`` on import; it
is filtered here, once. Every other module reaches jaxopt only through the small
functions below, so replacing jaxopt means rewriting this file alone.

What deqjax takes from jaxopt:

* Krylov linear solvers for the adjoint system of the implicit backward
  (``(I - J_f(z*))^T u = v``): GMRES, BiCGSTAB and CG on the normal equations.
* ``custom_root``, jaxopt's implicit-differentiation decorator, used as an
  independent reference implementation of the IFT gradient in the tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*JAXopt is no longer maintained.*")
    from jaxopt import implicit_diff as _implicit_diff  # noqa: E402
    from jaxopt import linear_solve as _linear_solve  # noqa: E402

Matvec = Callable[[Any], Any]

# --- linear solvers for the implicit (IFT) backward ---------------------------

KRYLOV_SOLVERS = ("gmres", "bicgstab", "normal_cg")


def krylov_solve(name: str, matvec: Matvec, b, *, tol: float, maxiter: int, init=None):
    """Solve ``matvec(u) = b`` with one of jaxopt's Krylov solvers, started from
    ``init`` (default: jaxopt's, zero).

    ``name`` is one of :data:`KRYLOV_SOLVERS`. ``matvec`` may be non-symmetric
    (the adjoint of a DEQ is), which is why plain CG is not offered.
    """
    kw = dict(tol=tol, maxiter=maxiter, init=init)
    if name == "gmres":
        return _linear_solve.solve_gmres(matvec, b, **kw)
    if name == "bicgstab":
        return _linear_solve.solve_bicgstab(matvec, b, **kw)
    if name == "normal_cg":
        return _linear_solve.solve_normal_cg(matvec, b, **kw)
    raise ValueError(f"unknown Krylov solver {name!r}; choose one of {KRYLOV_SOLVERS}")


def custom_root_reference(
    optimality_fun: Callable, solver: Callable, *, solve: Callable | None = None
) -> Callable:
    """Wrap ``solver`` with jaxopt's ``custom_root`` (implicit differentiation).

    Used as an independent check of deqjax's own IFT backward in the tests.
    """
    solve = solve or (
        lambda matvec, b: _linear_solve.solve_gmres(matvec, b, tol=1e-12, maxiter=500)
    )
    return _implicit_diff.custom_root(optimality_fun, solve=solve)(solver)


# --- OTAD solvers ---


def projection_simplex_reference(v):
    """jaxopt's Euclidean projection onto the probability simplex; an independent
    reference for deqjax.otad.qp.projection_simplex in the tests."""
    from jaxopt.projection import projection_simplex

    return projection_simplex(v)
