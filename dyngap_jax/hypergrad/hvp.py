"""Hessian-vector products on parameter pytrees, and the pytree checks the solvers rely on."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from dyngap_jax.hypergrad import loops

PyTree = Any

HVP_MODES = ("auto", "forward_over_reverse", "reverse_over_reverse")
# what the forward pass under an HVP keeps for its backward pass: everything ("none": no rematerialisation),
# only matrix products and convolutions ("dots": the elementwise work between them is recomputed), or only the
# inputs ("full": the whole forward recomputed)
REMAT_POLICIES = ("none", "dots", "full")


def rematerialised(f: Callable, remat: str = "none") -> Callable:
    """``f`` under ``jax.checkpoint`` with the policy ``remat`` names (see :data:`REMAT_POLICIES`)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"`remat` must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat == "none":
        return f
    policy = jax.checkpoint_policies.dots_saveable if remat == "dots" else jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint(f, policy=policy)


def check_like(tree: PyTree, reference: PyTree, name: str, reference_name: str = "params") -> None:
    """Raise a ValueError naming ``name`` unless ``tree`` has the structure and leaf shapes of ``reference``."""
    s_tree, s_ref = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(reference)
    if s_tree != s_ref:
        raise ValueError(f"`{name}` does not have the pytree structure of `{reference_name}`:\n  {s_tree}\nvs\n  {s_ref}")
    paths = jax.tree_util.tree_flatten_with_path(reference)[0]
    for (path, ref_leaf), leaf in zip(paths, jax.tree_util.tree_leaves(tree)):
        if jnp.shape(leaf) != jnp.shape(ref_leaf):
            raise ValueError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, "
                f"`{reference_name}` has {jnp.shape(ref_leaf)}"
            )


def check_params(params: PyTree, name: str = "params") -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"`{name}` leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; "
                "differentiable parameters must be floating point (pass integer state through the closures)"
            )


def hvp_forward_over_reverse(f: Callable, params: PyTree, v: PyTree, remat: str = "none") -> PyTree:
    """``H v`` as the jvp of ``grad f`` (one forward pass over a gradient); ``remat``: :func:`rematerialised`."""
    return jax.jvp(jax.grad(rematerialised(f, remat)), (params,), (v,))[1]


def hvp_reverse_over_reverse(f: Callable, params: PyTree, v: PyTree, remat: str = "none") -> PyTree:
    """``H v`` as the gradient of ``grad f . v`` (the fallback where a ``custom_vjp`` blocks jvp)."""
    g = jax.grad(rematerialised(f, remat))
    return jax.grad(lambda p: otu.tree_vdot(g(p), v))(params)


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _sub_jaxprs(v)


def _has_custom_vjp(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if "custom_vjp" in eqn.primitive.name:
            return True
        if any(_has_custom_vjp(sub) for v in eqn.params.values() for sub in _sub_jaxprs(v)):
            return True
    return False


def jvp_blocked(f: Callable, *args) -> bool:
    """True when ``f(*args)`` contains a ``custom_vjp`` call, which has no forward-mode (jvp) rule.

    Read off the traced jaxpr (no FLOPs). ``jax.eval_shape`` is no test: it can accept a jvp
    that fails once lowered.
    """
    return _has_custom_vjp(jax.make_jaxpr(f)(*args).jaxpr)


def resolve_mode(f: Callable, params: PyTree, mode: str = "auto") -> str:
    """Pick the HVP mode: forward-over-reverse unless ``grad f`` contains a ``custom_vjp``.

    Forward-over-reverse applies jvp to ``grad f``; a ``custom_vjp`` left in the gradient (one
    whose backward rule calls another ``custom_vjp``, say) has no forward rule, and then
    reverse-over-reverse is used.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"`hvp_mode` must be one of {HVP_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "reverse_over_reverse" if jvp_blocked(jax.grad(f), params) else "forward_over_reverse"


def make_hvp(f: Callable[[PyTree], jax.Array], params: PyTree, mode: str = "auto",
             remat: str = "none") -> tuple[Callable, str]:
    """``v -> H v`` with ``H`` the Hessian of scalar ``f`` at ``params``, and the mode it uses.

    Forward-over-reverse (``jax.jvp`` of ``jax.grad``) costs about one extra forward pass over a
    gradient; reverse-over-reverse is the fallback for functions with ``custom_vjp``.
    The Hessian is never materialised. ``remat`` trades memory for recomputation
    (:func:`rematerialised`).
    """
    mode = resolve_mode(f, params, mode)
    impl = hvp_forward_over_reverse if mode == "forward_over_reverse" else hvp_reverse_over_reverse
    rematerialised(f, remat)  # checks the name
    # one outlined program: under HostLoops every use of this product shares its compilation
    return loops.outlined("hvp", lambda v: impl(f, params, v, remat)), mode


def hvp(f: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree, mode: str = "auto") -> PyTree:
    """One Hessian-vector product ``(d^2 f / d params^2) v``; ``v`` must have the structure of ``params``."""
    check_like(v, params, "v")
    return make_hvp(f, params, mode)[0](v)
