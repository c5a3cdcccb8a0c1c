"""Hypergradients of the alpha in Eq. 1: exact (IFT + CG on HVPs) and approximate estimators.

Entry point: :func:`alpha_hypergradient`. Building blocks: :func:`hvp` / :func:`make_hvp`,
:func:`conjugate_gradient`, :func:`minres`, :func:`neumann_series`, :func:`power_iteration`.
"""
from dyngap_jax.hypergrad.estimators import (
    CG_OPERATORS,
    LFM_REDUCTIONS,
    METHODS,
    HypergradResult,
    alpha_hypergradient,
    cross_term,
    implicit_hypergradient,
    lbfgs_minimize,
    method_options,
)
from dyngap_jax.hypergrad.hvp import HVP_MODES, hvp, make_hvp
from dyngap_jax.hypergrad.solvers import conjugate_gradient, minres, neumann_series, power_iteration

__all__ = [
    "CG_OPERATORS",
    "HVP_MODES",
    "LFM_REDUCTIONS",
    "METHODS",
    "HypergradResult",
    "alpha_hypergradient",
    "conjugate_gradient",
    "cross_term",
    "hvp",
    "implicit_hypergradient",
    "lbfgs_minimize",
    "make_hvp",
    "method_options",
    "minres",
    "neumann_series",
    "power_iteration",
]
