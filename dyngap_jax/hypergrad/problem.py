"""The bilevel problem of alpha, Eq. 3, and what every hypergradient method shares.

Bilevel problem (Eq. 2)::

    min_alpha  L_outer(theta*(alpha)),   theta*(alpha) = argmin_theta L_total(theta, alpha),
    L_total = (1 - alpha) L_CLS + alpha L_MM                                    (Eq. 1)

By the implicit function theorem (Eq. 3, :func:`implicit_hypergradient`)::

    d L_outer / d alpha = - grad^2_{alpha,theta} L_total  H^{-1}  grad_theta L_outer,
    H = grad^2_{theta,theta} L_total,   grad^2_{alpha,theta} L_total = g_MM - g_CLS.

The methods differ only in how they get ``v ~ H^{-1} grad L_outer`` (or skip it). Each is a frozen
dataclass (:class:`Method`) holding its options, validated when it is made; what changes from call
to call (a warm start, a random key, a mini-batch sampler) is passed at call time as an *input*.
Everything here sees parameter pytrees and loss closures ``params -> scalar``; nothing looks
inside a model.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from flax import struct

from dyngap_jax import losses
from dyngap_jax.hypergrad.hvp import make_hvp

PyTree = Any
Loss = Callable[[PyTree], jax.Array]


@struct.dataclass
class HypergradResult:
    """``value``: the estimate of ``d L_outer / d alpha`` (alpha's shape). ``info``: diagnostics.

    ``info`` always holds ``iterations``, ``residual`` (relative residual of the linear system
    the method solved; NaN where it solves none), ``hvp_count``, ``converged``, ``breakdown``
    and ``finite``, plus method-specific entries. ``solution``: the ``v ~ H^{-1} grad L_outer``
    the value was formed from (the methods that build one; None otherwise), what a warm start
    passes to the next solve. ``carry``: what else a method hands to its next call (CG's
    ``power_vector``, its power iteration's last iterate, for the input ``v0``; ``ritz_lambda_max``,
    ``|lambda|_max`` from its Ritz value, for the input ``lambda_max``), a dict, or None. It
    is a pytree of arrays, so a result passes through ``jax.jit``.
    """

    value: jax.Array
    info: dict[str, jax.Array]
    method: str = struct.field(pytree_node=False)
    solution: Any = None
    carry: Any = None

    @property
    def ok(self) -> jax.Array:
        """True when the value is finite, the solve converged and nothing broke down."""
        return self.info["finite"] & self.info["converged"] & ~self.info["breakdown"]


class OptionError(ValueError):
    """A method option with a bad value; ``option`` names it (the config layer prefixes its field)."""

    def __init__(self, method: str, option: str, message: str):
        super().__init__(f"{method}: {message}")
        self.method, self.option = method, option


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class Method:
    """A hypergradient method and its options: subclasses are frozen dataclasses, one per method.

    Class attributes: ``name`` (what configs and :func:`~dyngap_jax.hypergrad.alpha_hypergradient`
    call it); ``solves`` (True: :meth:`estimate` returns ``v ~ H^{-1} grad L_outer`` and the value
    comes from Eq. 3; False: it returns the value itself); ``exact`` (it solves a stated linear
    system to a tolerance, and says whether it got there); ``inputs`` (call-time arguments such as
    ``x0``, ``key`` or ``sampler``: arrays and callables, never config options). A solving method
    whose estimate is better than Eq. 3 applied to its ``v`` (an adjoint-corrected one) returns it
    as ``info["value"]``.

    Options are checked when the object is made (an :class:`OptionError` names the option); a
    traced option (an iteration budget swept under one compilation) is checked only for its type.
    """

    name: ClassVar[str] = ""
    solves: ClassVar[bool] = True
    exact: ClassVar[bool] = False  # solves a stated system to a tolerance (training applies only converged solves)
    inputs: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`OptionError` for a bad option value (subclasses extend it)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def required_inputs(self) -> tuple[str, ...]:
        """The call-time inputs this method cannot run without (with these options)."""
        return ()

    def estimate(self, problem: "Problem", **inputs) -> tuple[Any, dict[str, jax.Array]]:
        raise NotImplementedError

    # ---- option checks shared by the methods

    def _fail(self, option: str, message: str):
        raise OptionError(self.name, option, message)

    def _number(self, option: str, *, integer: bool = False, minimum=None, strict: bool = False,
                allow_none: bool = False) -> None:
        value = getattr(self, option)
        if value is None and allow_none:
            return
        if is_tracer(value):
            return
        kind = "an integer" if integer else "a number"
        arr = np.asarray(value) if isinstance(value, (numbers.Number, np.ndarray, np.generic, jax.Array)) else None
        if arr is None or arr.ndim or isinstance(value, bool) or arr.dtype == bool or not (
                np.issubdtype(arr.dtype, np.integer) or (not integer and np.issubdtype(arr.dtype, np.floating))):
            self._fail(option, f"`{option}` must be {kind}, got {value!r}")
        v = float(arr)
        if not np.isfinite(v):
            self._fail(option, f"`{option}` must be finite, got {value}")
        if minimum is not None and (v <= minimum if strict else v < minimum):
            self._fail(option, f"`{option}` must be {'>' if strict else '>='} {minimum}, got {value}")

    def _choice(self, option: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, option)
        if value not in choices:
            self._fail(option, f"`{option}` must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """The inner losses (on the inner batch), the outer loss, the point ``params`` and alpha ``a``."""

    cls_loss: Loss
    mm_loss: Loss
    outer_loss: Loss
    params: PyTree
    a: jax.Array
    hvp_mode: str
    cross_mode: str = "forward_over_reverse"
    hvp_remat: str = "none"

    def total(self, params: PyTree, a: jax.Array) -> jax.Array:
        return losses.total(self.cls_loss(params), self.mm_loss(params), a)

    def total_at(self, a: jax.Array) -> Loss:
        return lambda p: self.total(p, a)

    def hvp(self) -> Callable[[PyTree], PyTree]:
        return make_hvp(self.total_at(self.a), self.params, self.hvp_mode, self.hvp_remat)[0]

    def outer_grad(self) -> PyTree:
        """``grad_theta L_outer``, traced once per problem: every later call returns the same values, so a
        step split into programs passes them on rather than computing the gradient again. A problem belongs to
        the trace that made it (``alpha_hypergradient`` builds one inside its traced function): the first call
        must be at that trace's level, not inside a loop body or a ``vmap`` of it."""
        if "_outer_grad" not in self.__dict__:
            object.__setattr__(self, "_outer_grad", jax.grad(self.outer_loss)(self.params))
        return self.__dict__["_outer_grad"]

    def cross_vectors(self) -> PyTree:
        """The cross term as vectors, ``d grad_theta L_total / d alpha_j`` stacked on a leading axis
        (``[1, ...]`` leaves for a scalar alpha, ``g_MM - g_CLS``; ``[P, ...]`` for a vector one):
        what :meth:`cross` contracts, for the methods that need it whole (a dual solve)."""
        a = self.a
        dtotal_da = lambda p: jnp.reshape(jax.jacrev(lambda b: self.total(p, b))(a), (-1,))  # linear in alpha
        return jax.jacrev(dtotal_da)(self.params)

    def cross(self, v: PyTree) -> jax.Array:
        return cross_term(self.total, self.params, self.a, v, self.cross_mode)


def cross_term(total: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, a: jax.Array, v: PyTree,
               mode: str = "forward_over_reverse") -> jax.Array:
    """``grad^2_{alpha,theta} L_total . v``: for a scalar alpha, ``(g_MM - g_CLS)^T v``.

    ``total(params, a)`` is L_total. Forward mode differentiates ``d total / d a`` (linear in
    ``a``, so cheap) along ``v`` with one jvp; a ``custom_vjp`` inside the losses forces
    ``mode="reverse_over_reverse"``.
    """
    if mode == "forward_over_reverse":
        dtotal_da = lambda p: jax.grad(total, argnums=1)(p, a)
        return jax.jvp(dtotal_da, (params,), (v,))[1]
    return jax.grad(lambda b: otu.tree_vdot(jax.grad(total)(params, b), v))(a)


def implicit_hypergradient(cls_loss: Loss, mm_loss: Loss, params: PyTree, a, v: PyTree,
                           mode: str = "forward_over_reverse") -> jax.Array:
    """Eq. 3: ``d L_outer / d alpha = -grad^2_{alpha,theta} L_total [grad^2_{theta,theta} L_total]^{-1} grad_theta L_outer``,

    given ``v = H^{-1} grad_theta L_outer`` (however it was obtained); L_total is Eq. 1 of
    ``cls_loss`` and ``mm_loss``. Every method that builds a ``v`` ends here.
    """
    total = lambda p, b: losses.total(cls_loss(p), mm_loss(p), b)
    return -cross_term(total, params, jnp.asarray(a), v, mode)


def relative(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else ``num`` (a relative residual of a zero right-hand side)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num)


def hessian_residual(hvp: Callable, v: PyTree, g: PyTree) -> jax.Array:
    """``|H v - g| / |g|`` for the undamped Hessian: how far ``v`` is from ``H^{-1} g``."""
    return relative(otu.tree_norm(otu.tree_sub(hvp(v), g)), otu.tree_norm(g))


def damped(matvec: Callable, damping) -> Callable:
    """``v -> matvec(v) + damping v`` (``matvec`` itself when ``damping`` is 0)."""
    if not is_tracer(damping) and not damping:
        return matvec
    return lambda v: otu.tree_add_scale(matvec(v), damping, v)


def check_loss(name: str, fn, params, expected_shape) -> None:
    """Raise naming ``name`` unless ``fn(params)`` is a floating array of ``expected_shape``."""
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable params -> loss, got {type(fn).__name__}")
    out = jax.eval_shape(fn, params)
    shape = getattr(out, "shape", None)
    if shape is None or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"`{name}` must return a floating-point array, got {out}")
    if shape != expected_shape:
        what = "a scalar" if expected_shape == () else f"shape {expected_shape} (one loss per modality pair, like `a`)"
        raise ValueError(f"`{name}` must return {what}, got shape {shape}")
