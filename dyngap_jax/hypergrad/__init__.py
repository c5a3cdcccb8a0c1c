"""Hypergradients of the alpha in Eq. 1: exact (IFT + a Krylov solve on HVPs) and approximate methods.

Entry point: :func:`alpha_hypergradient` (a method by name with its options, or a method object).
The house, one module per family:

* :mod:`~dyngap_jax.hypergrad.problem`: the bilevel problem, Eq. 3 (:func:`implicit_hypergradient`),
  the result type and the :class:`Method` base class;
* :mod:`~dyngap_jax.hypergrad.exact`: the solves of ``H v = g`` (:class:`CG`, :class:`MINRES`, :class:`Dense`);
* :mod:`~dyngap_jax.hypergrad.series`: series and shortcuts (:class:`Identity`, :class:`Neumann`,
  :class:`GhadimiWang`, the authors' :class:`LFMCode`);
* :mod:`~dyngap_jax.hypergrad.unrolled`: :class:`Unrolled` and :class:`FiniteDifference`;
* :mod:`~dyngap_jax.hypergrad.methods`: the registry (:func:`make_method`, :func:`method_from_config`)
  and :func:`alpha_hypergradient`;
* building blocks: :func:`hvp` / :func:`make_hvp`, :func:`conjugate_gradient`, :func:`minres`,
  :func:`neumann_series`, :func:`power_iteration`; :mod:`~dyngap_jax.hypergrad.loops`: their loops in
  XLA or driven from the host (:class:`HostLoops`).
"""
from dyngap_jax.hypergrad.exact import CG, CG_OPERATORS, MINRES, Dense
from dyngap_jax.hypergrad.hvp import HVP_MODES, hvp, hvp_forward_over_reverse, hvp_reverse_over_reverse, make_hvp
from dyngap_jax.hypergrad.loops import HostLoops
from dyngap_jax.hypergrad.methods import (
    METHOD_CLASSES,
    METHODS,
    alpha_hypergradient,
    make_method,
    method_from_config,
    method_options,
    option_types,
)
from dyngap_jax.hypergrad.problem import (
    HypergradResult,
    Method,
    OptionError,
    Problem,
    cross_term,
    implicit_hypergradient,
)
from dyngap_jax.hypergrad.series import LFM_REDUCTIONS, GhadimiWang, Identity, LFMCode, Neumann
from dyngap_jax.hypergrad.solvers import conjugate_gradient, minres, neumann_series, power_iteration, tree_finite
from dyngap_jax.hypergrad.unrolled import FiniteDifference, Unrolled, lbfgs_minimize

__all__ = [
    "CG", "CG_OPERATORS", "Dense", "FiniteDifference", "GhadimiWang", "HVP_MODES", "HostLoops", "HypergradResult", "Identity",
    "LFMCode", "LFM_REDUCTIONS", "METHODS", "METHOD_CLASSES", "MINRES", "Method", "Neumann", "OptionError",
    "Problem", "Unrolled", "alpha_hypergradient", "conjugate_gradient", "cross_term", "hvp",
    "hvp_forward_over_reverse", "hvp_reverse_over_reverse", "implicit_hypergradient", "lbfgs_minimize",
    "make_hvp", "make_method", "method_from_config", "method_options", "minres", "neumann_series",
    "option_types", "power_iteration", "tree_finite",
]
