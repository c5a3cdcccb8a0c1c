"""The hypergradient methods by name, built from keywords or a config, and the entry point
:func:`alpha_hypergradient`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dyngap_jax import losses
from dyngap_jax.hypergrad.exact import CG, MINRES, Dense
from dyngap_jax.hypergrad.hvp import REMAT_POLICIES, check_params, jvp_blocked, resolve_mode
from dyngap_jax.hypergrad.problem import (
    HypergradResult,
    Loss,
    Method,
    OptionError,
    Problem,
    PyTree,
    check_loss,
    hessian_residual,
    implicit_hypergradient,
    is_tracer,
)
from dyngap_jax.hypergrad.series import GhadimiWang, Identity, LFMCode, Neumann
from dyngap_jax.hypergrad.solvers import tree_finite
from dyngap_jax.hypergrad.unrolled import FiniteDifference, Unrolled

METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (CG, MINRES, Dense, Identity, Neumann, GhadimiWang, LFMCode, Unrolled, FiniteDifference)
}
METHODS = tuple(METHOD_CLASSES)


def method_options(method: str) -> tuple[str, ...]:
    """The keywords ``method`` accepts: its options, then its call-time inputs."""
    cls = _class(method)
    return cls.option_names() + cls.inputs


def option_types() -> dict[str, type]:
    """Every option of every method with its Python type (``int``, ``float`` or ``str``), for config placeholders."""
    out: dict[str, type] = {}
    for cls in METHOD_CLASSES.values():
        for f in dataclasses.fields(cls):
            annotation = str(f.type)
            out[f.name] = str if "str" in annotation else int if annotation.startswith("int") else float
    return out


def _class(name: str) -> type[Method]:
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown hypergradient method {name!r}; known methods: {', '.join(METHODS)}")
    return METHOD_CLASSES[name]


def make_method(name: str, **options) -> Method:
    """``make_method("minres", maxiter=50)``: the method's object, its options checked."""
    cls = _class(name)
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        raise TypeError(f"method {name!r} takes options {cls.option_names()}; unknown: {unknown}")
    return cls(**options)


def method_from_config(hcfg: Mapping[str, Any], field: str = "config.alpha.hypergrad") -> Method:
    """The method a config's ``alpha.hypergrad`` names: ``method`` plus the ``options`` that are set.

    Options left ``None`` take the method's defaults, so ``method=minres`` alone is MINRES with its
    own defaults. An unknown method, an unknown option, another method's option or a bad value
    raises a ValueError naming the config field and the valid choices.
    """
    name = hcfg.get("method")
    if name not in METHOD_CLASSES:
        raise ValueError(f"{field}.method: unknown hypergradient method {name!r}; known: {', '.join(METHODS)}")
    cls = METHOD_CLASSES[name]
    options = {k: v for k, v in dict(hcfg.get("options") or {}).items() if v is not None}
    for key in sorted(options):
        if key not in cls.option_names():
            owners = [m for m, c in METHOD_CLASSES.items() if key in c.option_names()]
            whose = f"an option of {', '.join(owners)}" if owners else "no method's option"
            raise ValueError(f"{field}.options.{key}: method {name!r} has no option {key!r} ({whose}); "
                             f"{name!r} takes {', '.join(cls.option_names())}")
    try:
        return cls(**options)
    except OptionError as e:
        raise ValueError(f"{field}.options.{e.option}: {e}") from None


def _resolve_cross_mode(problem: Problem) -> str:
    # the forward-mode cross term is a jvp of the losses themselves
    if problem.hvp_mode == "reverse_over_reverse" or jvp_blocked(problem.total_at(problem.a), problem.params):
        return "reverse_over_reverse"
    return "forward_over_reverse"


def alpha_hypergradient(
    cls_loss: Loss,
    mm_loss: Loss,
    outer_loss: Loss,
    params: PyTree,
    a,
    method: str | Method = "cg",
    *,
    hvp_mode: str = "auto",
    hvp_remat: str = "none",
    report_residual: bool = True,
    **options,
) -> HypergradResult:
    """``d L_outer(theta*(alpha)) / d alpha`` at ``params`` (taken as ``theta*``), by ``method``.

    Args:
      cls_loss, mm_loss: ``params -> loss`` on the inner batch; L_total is
        ``losses.total(cls_loss(p), mm_loss(p), a)``. ``mm_loss`` returns a scalar for a scalar
        ``a`` and the per-pair losses ``[P]`` for a vector ``a`` of shape ``[P]``.
      outer_loss: ``params -> scalar``, the upper-level objective (L_CLS on the outer batch).
      params: any pytree of float arrays (Flax ``variables["params"]``; keep ``batch_stats``
        fixed inside the closures, so the Hessian is that of one function).
      a: alpha, a scalar or a vector, in ``[0, 1]``.
      method: a name from :data:`METHODS` with its options as keywords (:func:`method_options`),
        or a :class:`Method` object (then only its call-time inputs are keywords).
      hvp_mode: ``"auto"`` (forward-over-reverse, reverse-over-reverse where a ``custom_vjp``
        stops jvp), or either explicitly.
      hvp_remat: what the forward pass under each HVP keeps (``"none"``: everything; ``"dots"``:
        matrix products and convolutions; ``"full"``: nothing, all recomputed): memory against time
        (:data:`~dyngap_jax.hypergrad.hvp.REMAT_POLICIES`; the values are the same).
      report_residual: for the methods that build ``v ~ H^{-1} grad L_outer``, also report
        ``info["hessian_residual"] = |H v - grad L_outer| / |grad L_outer|`` (one more HVP).

    Works under ``jax.jit`` (closures built inside the traced function); array options and
    inputs (a warm start, a key, an iteration budget) are traced, so one compilation serves
    every value. The range of ``a`` is checked when it is concrete.
    """
    if isinstance(method, Method):
        spec, fields = type(method), method.options()
        unknown = sorted(set(options) - set(spec.inputs))
        if unknown:
            raise TypeError(f"method {spec.name!r} given as an object takes only its inputs {spec.inputs} as "
                            f"keywords; unknown: {unknown}")
        inputs = dict(options)
    else:
        spec = _class(method)
        allowed = spec.option_names() + spec.inputs
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"method {spec.name!r} takes options {allowed}; unknown: {unknown}")
        fields = {k: v for k, v in options.items() if k in spec.option_names()}
        inputs = {k: v for k, v in options.items() if k in spec.inputs}
        spec(**fields)  # check the concrete options now, with their names
    check_params(params)
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if a.ndim > 1:
        raise ValueError(f"`a` must be a scalar or a vector with one weight per modality pair, got shape {a.shape}")
    if not is_tracer(a):
        a_np = np.asarray(a)
        if not np.all(np.isfinite(a_np)) or np.any(a_np < 0) or np.any(a_np > 1):
            raise ValueError(f"`a` must lie in [0, 1], got {a_np}")
    check_loss("cls_loss", cls_loss, params, ())
    check_loss("outer_loss", outer_loss, params, ())
    check_loss("mm_loss", mm_loss, params, a.shape)

    total_fn = lambda p: losses.total(cls_loss(p), mm_loss(p), a)
    hvp_mode = resolve_mode(total_fn, params, hvp_mode)
    if hvp_remat not in REMAT_POLICIES:
        raise ValueError(f"`hvp_remat` must be one of {REMAT_POLICIES}, got {hvp_remat!r}")
    cross_mode = _resolve_cross_mode(Problem(cls_loss, mm_loss, outer_loss, params, a, hvp_mode))

    # Array options and inputs (x0, keys, traced budgets) are traced arguments; callables and numbers are closed over.
    leaves, treedef = jax.tree_util.tree_flatten((fields, inputs))
    dynamic = {i: leaf for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))}

    def run(params, a, dynamic):
        f, inp = jax.tree_util.tree_unflatten(treedef, [dynamic.get(i, leaf) for i, leaf in enumerate(leaves)])
        m = spec(**f)
        missing = [k for k in m.required_inputs() if inp.get(k) is None]
        if missing:
            raise ValueError(f"{spec.name} needs the call-time input(s) {missing} (see `{spec.__name__}`'s docstring)")
        problem = Problem(cls_loss, mm_loss, outer_loss, params, a, hvp_mode, cross_mode, hvp_remat)
        return _estimate(problem, m, inp, report_residual)

    already_traced = any(is_tracer(x) for x in jax.tree_util.tree_leaves((params, a, dynamic)))
    # Called eagerly, compile the whole estimate once rather than dispatch it op by op.
    value, info, solution, carry = (run if already_traced else jax.jit(run))(params, a, dynamic)
    return HypergradResult(value=value, info=info, method=spec.name, solution=solution, carry=carry)


CARRIED = ("power_vector", "ritz_lambda_max")  # what a method's info may hold for its next call (HypergradResult.carry)


def _estimate(problem: Problem, method: Method, inputs: dict, report_residual: bool):
    info: dict[str, jax.Array] = {
        "iterations": jnp.asarray(0),
        "residual": jnp.asarray(jnp.nan),
        "converged": jnp.asarray(True),
        "breakdown": jnp.asarray(False),
    }
    v, carry = None, None
    if method.solves:
        v, method_info = method.estimate(problem, **inputs)
        method_info = dict(method_info)
        carry = {k: method_info.pop(k) for k in CARRIED if k in method_info} or None
        if "value" in method_info:  # the method's own (corrected) estimate of Eq. 3
            value = method_info.pop("value")
        else:
            value = implicit_hypergradient(problem.cls_loss, problem.mm_loss, problem.params, problem.a, v,
                                           problem.cross_mode)
        info.update(method_info)
        g = problem.outer_grad()  # the method's (Problem keeps it): no second gradient
        # a solve that stopped on a non-finite right-hand side must not pass for a clean zero
        finite = tree_finite(v) & tree_finite(g)
        if report_residual:
            info["hessian_residual"] = hessian_residual(problem.hvp(), v, g)
            info["hvp_count"] = info["hvp_count"] + 1
    else:
        value, method_info = method.estimate(problem, **inputs)
        info.update(method_info)
        finite = jnp.asarray(True)
    value = jnp.reshape(value, problem.a.shape).astype(problem.a.dtype)
    info["finite"] = finite & jnp.all(jnp.isfinite(value))
    info["hvp_forward_over_reverse"] = jnp.asarray(problem.hvp_mode == "forward_over_reverse")
    info["cross_forward_over_reverse"] = jnp.asarray(problem.cross_mode == "forward_over_reverse")
    return value, {k: jnp.asarray(x) for k, x in info.items()}, v, carry
