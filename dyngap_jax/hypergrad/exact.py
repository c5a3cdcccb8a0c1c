"""The solves of ``H v = grad L_outer``: conjugate gradient and MINRES on Hessian-vector products, and
a dense solve for tiny models and tests.

"Exact" here means a stated system solved to its tolerance: the Krylov methods report their
iterations and the true final residual, and a solve that stops at ``maxiter`` is reported as
unconverged (``info["converged"]`` false), never passed off as exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dyngap_jax import losses
from dyngap_jax.hypergrad import loops
from dyngap_jax.hypergrad.certified import bilinear_cg
from dyngap_jax.hypergrad.hvp import check_like, make_hvp
from dyngap_jax.hypergrad.problem import Method, Problem, damped, is_tracer, relative
from dyngap_jax.hypergrad.solvers import conjugate_gradient, minres, power_iteration

CG_OPERATORS = ("plain", "damped", "normal", "gauss_newton")
DENSE_OPERATORS = ("plain", "damped", "normal")


DAMPING_MODES = ("relative", "absolute")
RITZ_MIN_ITERATIONS = 5  # fewer CG iterations give no reusable |lambda|_max (carry["ritz_lambda_max"] NaN)
DEFAULT_DAMPING = {"relative": 1e-1, "absolute": 1e-4}  # relative: issue 25's frontier (docs/benchmarks.md)


def _lambda_max(matvec, like, iters, v0=None, tol=None):
    """``(|lambda|_max, info)`` of ``matvec`` by power iteration from ``v0`` or a fixed random start (the same on
    every call); see :func:`~dyngap_jax.hypergrad.solvers.power_iteration`."""
    lam, info = power_iteration(matvec, like, jax.random.PRNGKey(0), iters, v0=v0, tol=tol)
    return jnp.abs(lam), info


# the reduced precisions a CG's iterations may run at (``krylov_precision``); on a CPU all compute in float32
KRYLOV_PRECISIONS = ("default", "high", "bfloat16", "tensorfloat32", "BF16_BF16_F32", "BF16_BF16_F32_X3",
                     "TF32_TF32_F32", "TF32_TF32_F32_X3")


def at_precision(fn, precision: str):
    """``fn`` with every matmul and convolution it traces at ``precision`` (the caller's elsewhere)."""
    def wrapped(*args):
        with jax.default_matmul_precision(precision):
            return fn(*args)

    return wrapped


@dataclasses.dataclass(frozen=True)
class CG(Method):
    """IFT with ``H^{-1} g`` by conjugate gradient on Hessian-vector products, solved to ``tol``.

    ``operator``: ``"normal"`` (the default) solves the Tikhonov-damped least-squares system
    ``(H^2 + d I) v = H g``: positive definite for any symmetric H (networks' Hessians are
    indefinite, and plain CG breaks down on them), two HVPs an iteration; the damping filters the
    directions whose curvature ``|lambda|`` is below ``sqrt(d)``, where the undamped ``H^{-1} g`` is
    ill-posed. ``"plain"`` solves ``H v = g`` (H must be positive definite: a breakdown is flagged
    if it is not); ``"damped"`` solves ``(H + mu I) v = g``; ``"gauss_newton"`` solves
    ``(G + mu I) v = g`` with ``G = J^T (d^2 l / d o^2) J`` the generalised Gauss-Newton matrix of
    ``L_total = l(o(theta))``, given at call time as the input
    ``gn_model = (outputs_fn, cls_from_outputs, mm_from_outputs)``.

    ``damping`` with ``damping_mode="relative"`` (the default) is a fraction ``rho`` of the
    curvature scale: ``d = (rho |lambda|_max)^2`` for ``normal``, ``mu = rho |lambda|_max`` for
    ``damped`` / ``gauss_newton``, with ``|lambda|_max`` of the undamped operator from
    ``power_iters`` steps of power iteration (reported as ``info["lambda_max"]``); with
    ``"absolute"`` it is ``d`` or ``mu`` itself. ``None``: 0.1 relative or 1e-4 absolute for
    ``normal`` and ``damped``, 0 for ``plain`` and ``gauss_newton`` (0.1: issue 25's error budget,
    ``docs/benchmarks.md``: with 1e-2, the default before, a solve took ~6x the HVPs, and the two
    values differ about as much as one alpha batch's from another's). ``info["damping"]`` is the
    absolute value the stated system used.

    ``power_iters``: the power iteration's most iterations; ``power_tol`` (0: all of them) stops it
    earlier, once ``|lambda|_max``'s relative change between two iterations is at most ``power_tol``;
    input ``v0`` warm-starts it (the previous solve's ``carry["power_vector"]``: the curvature's top
    direction moves little between alpha steps). ``info["power_iterations"]`` counts them. Input
    ``lambda_max`` (positive and finite) is ``|lambda|_max`` given, and no power iteration runs: the
    previous solve's ``carry["ritz_lambda_max"]``, which ``normal`` and ``gauss_newton`` return from the
    largest Ritz value of their CG (:func:`~dyngap_jax.hypergrad.solvers.top_ritz`, minus the damping: no
    HVP; NaN after fewer than :data:`RITZ_MIN_ITERATIONS` iterations). The damping is then scaled by the
    curvature of the previous system, not this one's.

    ``tol`` / ``atol``: stop when ``|r| <= max(tol |b|, atol)`` (``info["residual"]`` is the true
    relative residual of the stated system, recomputed); ``maxiter``: iteration budget (a solve
    that runs out is reported unconverged); ``restarts``: restart from the true residual when
    rounding made CG stop early. Inputs: ``x0`` (warm start, the structure of ``params``), ``v0``,
    ``lambda_max``, ``gn_model``.

    ``krylov_precision`` (None: every operator application at the caller's matmul precision): the
    power iteration and the CG iterations run their HVPs at this faster, less accurate precision
    (``"default"``: TF32 on NVIDIA GPUs; a dot algorithm such as ``"BF16_BF16_F32_X3"``) while the
    right-hand side ``H g``, every residual that decides convergence and the value stay at the
    caller's: iterative refinement, ``refinements`` rounds at most (each a CG run on the true
    residual, :func:`~dyngap_jax.hypergrad.solvers.conjugate_gradient`'s ``true_matvec``). The solve
    is then as exact as the caller's precision makes it; only its iterations are cheaper.

    ``scalar_tol`` (None: the residual rule above) stops on the hypergradient itself instead: the
    solve ends when every entry is known to ``max(scalar_tol |value|, scalar_atol)``, certified by
    a Gauss-Radau bound on an adjoint-corrected estimate (:func:`~dyngap_jax.hypergrad.certified.bilinear_cg`:
    the duals ``A y = g_MM - g_CLS`` run beside the primal through one batched HVP, so an iteration
    costs ``2 (1 + P)`` HVPs for P modality pairs). ``tol``, ``atol`` and ``restarts`` are then
    unused. It needs a known lower bound of the system's spectrum: ``normal`` (``d``) or
    ``gauss_newton`` (``mu``) with damping > 0. ``info["bound"]`` / ``info["bound_relative"]``: the
    certified error of the value (the largest over entries); ``converged``: the bound met.
    """

    name: ClassVar[str] = "cg"
    exact: ClassVar[bool] = True
    inputs: ClassVar[tuple[str, ...]] = ("x0", "v0", "lambda_max", "gn_model")

    operator: str = "normal"
    damping: float | None = None
    damping_mode: str = "relative"
    tol: float = 1e-3
    atol: float = 0.0
    maxiter: int = 1000
    restarts: int = 0
    power_iters: int = 20
    power_tol: float = 0.05
    scalar_tol: float | None = None
    scalar_atol: float = 0.0
    krylov_precision: str | None = None
    refinements: int = 3

    def validate(self):
        self._choice("operator", CG_OPERATORS)
        self._choice("damping_mode", DAMPING_MODES)
        self._number("damping", minimum=0.0, allow_none=True)
        self._number("tol", minimum=0.0)
        self._number("atol", minimum=0.0)
        self._number("maxiter", integer=True, minimum=0)
        self._number("restarts", integer=True, minimum=0)
        self._number("power_iters", integer=True, minimum=1)
        self._number("power_tol", minimum=0.0)
        self._number("scalar_tol", minimum=0.0, allow_none=True)
        self._number("scalar_atol", minimum=0.0)
        self._number("refinements", integer=True, minimum=1)
        if self.krylov_precision is not None:
            self._choice("krylov_precision", KRYLOV_PRECISIONS)
            if self.operator == "gauss_newton":
                self._fail("krylov_precision", "`krylov_precision` with operator='gauss_newton': its Jacobian "
                                               "products are linearised once, at the caller's precision, so only "
                                               "the loss head's HVP would run faster; use operator='normal'")
            if self.scalar_tol is not None:
                self._fail("krylov_precision", "`krylov_precision` refines the residual rule's solve; the certified "
                                               "stop (`scalar_tol`) bounds its error from the iterations' own scalars, "
                                               "which a reduced precision would not keep: set one of them")
        if self.scalar_tol is not None:
            if self.operator not in ("normal", "gauss_newton"):
                self._fail("scalar_tol", f"`scalar_tol` certifies the hypergradient on a system whose smallest "
                                         f"eigenvalue is known: operator 'normal' or 'gauss_newton', not {self.operator!r}")
            if not is_tracer(self.damping_value) and not self.damping_value > 0:
                self._fail("scalar_tol", f"`scalar_tol` needs `damping` > 0 (the spectrum's lower bound), got "
                                         f"{self.damping_value}")
        d = self.damping
        if self.operator == "plain" and d is not None and not is_tracer(d) and d:
            self._fail("damping", f"`damping`={d} with operator='plain'; use operator='damped'")
        if self.operator == "damped" and d is not None and not is_tracer(d) and not d > 0:
            self._fail("damping", f"operator='damped' needs `damping` > 0, got {d}")

    @property
    def damping_value(self):
        """The ``damping`` option in effect (``None`` resolved for the operator and mode)."""
        if self.damping is not None:
            return self.damping
        return DEFAULT_DAMPING[self.damping_mode] if self.operator in ("normal", "damped") else 0.0

    @property
    def relative(self) -> bool:
        """Whether the damping is scaled by the curvature (and a power iteration runs)."""
        return self.damping_mode == "relative" and self.operator != "plain" and (
            is_tracer(self.damping_value) or self.damping_value > 0)

    def required_inputs(self):
        return ("gn_model",) if self.operator == "gauss_newton" else ()

    def estimate(self, problem: Problem, x0=None, v0=None, lambda_max=None, gn_model=None):
        for name, tree in (("x0", x0), ("v0", v0)):
            if tree is not None:
                check_like(tree, problem.params, name)
        hvp = problem.hvp()
        g = problem.outer_grad()
        if self.operator == "gauss_newton":
            if gn_model is None or len(gn_model) != 3 or not all(callable(f) for f in gn_model):
                raise ValueError(
                    "cg: operator='gauss_newton' needs `gn_model=(outputs_fn, cls_from_outputs, mm_from_outputs)`")
            outputs_fn, cls_head, mm_head = gn_model
            head = lambda o: losses.total(cls_head(o), mm_head(o), problem.a)
            outputs, jvp_fn = jax.linearize(outputs_fn, problem.params)
            vjp_fn = jax.linear_transpose(jvp_fn, problem.params)
            head_hvp = make_hvp(head, outputs, problem.hvp_mode)[0]
            base = lambda v: vjp_fn(head_hvp(jvp_fn(v)))[0]
        else:
            base = hvp
        fast = lambda f: f if self.krylov_precision is None else at_precision(f, self.krylov_precision)
        extra, lam, power = 0, jnp.asarray(jnp.nan), {}
        damping = self.damping_value
        if self.relative:
            tol = None if not is_tracer(self.power_tol) and self.power_tol == 0 else self.power_tol
            iters, given = self.power_iters, None
            if lambda_max is not None:  # given: the power iteration runs no iteration
                given = jnp.asarray(lambda_max, jnp.result_type(*jax.tree_util.tree_leaves(g)))
                known = (given > 0) & jnp.isfinite(given)
                iters = jnp.where(known, 0, self.power_iters)
            lam, pinfo = _lambda_max(fast(base), g, iters, v0, tol)
            if given is not None:
                lam = jnp.where(known, given, lam)
            extra = pinfo["matvecs"]
            power = {"power_iterations": jnp.asarray(extra), "power_vector": pinfo["vector"]}
            damping = (damping * lam) ** 2 if self.operator == "normal" else damping * lam
        b, per_matvec = g, 1
        if self.operator == "normal":
            # H (H v) one outlined program: its two products share their forward and backward pass at the
            # parameters (XLA merges them), which two separate calls would each compute
            op = loops.outlined("normal", lambda v: hvp(hvp(v)))
            b, per_matvec, extra = hvp(g), 2, extra + 1
        else:
            op = base
        matvec = damped(op, damping)
        if self.scalar_tol is not None:
            x, info = self._certified(problem, matvec, b, x0, damping, per_matvec, extra, lam)
            return x, {**info, **power}
        restarts, true = (self.restarts, None) if self.krylov_precision is None else (self.refinements, matvec)
        x, info = conjugate_gradient(damped(fast(op), damping), b, x0, tol=self.tol, atol=self.atol,
                                     maxiter=self.maxiter, restarts=restarts, scale_x0=True, true_matvec=true)
        ritz = info.pop("ritz_max")
        if self.operator in ("normal", "gauss_newton"):  # the undamped operator's top: lambda^2 + d, or lambda + mu
            top = ritz - damping
            top = jnp.sqrt(jnp.maximum(top, 0.0)) if self.operator == "normal" else top
            # a solve of a few iterations has not found the top yet (a warm start's residual lies mostly in the
            # small eigenvalues): NaN, so that the next solve runs the power iteration
            power["ritz_lambda_max"] = jnp.where(info["iterations"] >= RITZ_MIN_ITERATIONS, top, jnp.nan)
        info = {**info, **power}
        info["hvp_count"] = info.pop("matvecs") * per_matvec + extra
        info["damping"] = jnp.asarray(damping)
        info["lambda_max"] = lam
        return x, info

    def _certified(self, problem: Problem, matvec, b, x0, damping, per_matvec, extra, lam):
        """The solve stopped on the hypergradient's certified bound; the value comes back in ``info["value"]``."""
        x, est, bound, info = bilinear_cg(matvec, b, problem.cross_vectors(), damping, tol=self.scalar_tol,
                                          atol=self.scalar_atol, maxiter=self.maxiter, x0=x0)
        info = dict(info)
        info["hvp_count"] = info.pop("matvecs") * per_matvec + extra
        info["damping"] = jnp.asarray(damping)
        info["lambda_max"] = lam
        info["negative_curvature"] = jnp.asarray(False)
        info["value"] = -est
        info["bound"] = jnp.max(bound)
        info["bound_relative"] = jnp.max(relative(bound, jnp.abs(est)))
        return x, info


@dataclasses.dataclass(frozen=True)
class MINRES(Method):
    """IFT with ``(H + damping I)^{-1} g`` by MINRES on Hessian-vector products.

    For the symmetric indefinite Hessians of networks: one HVP an iteration (CG on the normal
    equations takes two) and no breakdown on negative curvature. With ``damping=0`` on a singular
    H it converges to the solution on H's range, like ``dense``. Input: ``x0`` (warm start).
    """

    name: ClassVar[str] = "minres"
    exact: ClassVar[bool] = True
    inputs: ClassVar[tuple[str, ...]] = ("x0",)

    damping: float = 0.0
    tol: float = 1e-6
    maxiter: int = 100

    def validate(self):
        self._number("damping", minimum=0.0)
        self._number("tol", minimum=0.0)
        self._number("maxiter", integer=True, minimum=0)

    def estimate(self, problem: Problem, x0=None):
        if x0 is not None:
            check_like(x0, problem.params, "x0")
        x, info = minres(damped(problem.hvp(), self.damping), problem.outer_grad(), x0, tol=self.tol,
                         maxiter=self.maxiter)
        info = dict(info)
        info["hvp_count"] = info.pop("matvecs")
        info["damping"] = jnp.asarray(self.damping)
        return x, info


@dataclasses.dataclass(frozen=True)
class Dense(Method):
    """Materialise the Hessian and solve directly (tiny models and tests only).

    ``operator`` names the same systems as CG's, so ``dense`` can check a CG solve exactly:
    ``"plain"`` / ``"damped"`` solve ``(H + damping I) v = g``; ``"normal"`` solves
    ``(H^2 + damping I) v = H g`` (with damping > 0 a Tikhonov-filtered ``H^{-1} g`` that damps the
    directions with ``|eigenvalue| << sqrt(damping)``; at 0 the exact solve). A singular system is
    solved on its range (pseudo-inverse; ``null_dimensions`` counts what was dropped).
    ``min_eigenvalue`` / ``max_eigenvalue`` / ``min_abs_eigenvalue`` describe the undamped H.
    ``max_params`` refuses models whose Hessian would be larger.
    """

    name: ClassVar[str] = "dense"
    exact: ClassVar[bool] = True

    operator: str = "plain"
    damping: float = 0.0
    max_params: int = 20_000

    def validate(self):
        if self.operator not in DENSE_OPERATORS:
            self._fail("operator", f"`operator` must be 'plain', 'damped' or 'normal', got {self.operator!r}")
        self._number("damping", minimum=0.0)
        self._number("max_params", integer=True, minimum=1)

    def check_size(self, n_params: int) -> None:
        if n_params > self.max_params:
            self._fail("max_params", f"the Hessian would be {n_params} x {n_params}; `max_params` is {self.max_params}. "
                                     "Use method='cg' for models this size")

    def estimate(self, problem: Problem):
        flat, unravel = ravel_pytree(problem.params)
        self.check_size(flat.size)
        hess = jax.hessian(lambda f: problem.total(unravel(f), problem.a))(flat)
        hess = 0.5 * (hess + hess.T)  # exact in exact arithmetic; removes rounding asymmetry
        g = ravel_pytree(problem.outer_grad())[0]
        damping = self.damping
        # through the eigendecomposition H = U diag(lam) U^T: v = U f(lam) U^T g with f = 1 / (lam + d)
        # (plain, damped) or lam / (lam^2 + d) (normal); where the system's eigenvalue vanishes to
        # rounding (dead units, symmetries make H exactly singular) f is 0: the pseudo-inverse, the
        # solution CG started at 0 converges to
        lam, u = jnp.linalg.eigh(hess)
        sys_eig = lam**2 + damping if self.operator == "normal" else lam + damping
        cutoff = flat.size * jnp.finfo(hess.dtype).eps * jnp.max(jnp.abs(sys_eig))
        null = jnp.abs(sys_eig) <= cutoff
        num = lam if self.operator == "normal" else jnp.ones_like(lam)
        f = jnp.where(null, 0.0, num / jnp.where(null, 1.0, sys_eig))
        v = u @ (f * (u.T @ g))
        eye = jnp.eye(flat.size, dtype=hess.dtype)
        system, rhs = (hess @ hess + damping * eye, hess @ g) if self.operator == "normal" else (hess + damping * eye, g)
        # residual on the range of the system (the part of rhs in its null space cannot be solved for)
        rhs_range = rhs - u @ (jnp.where(null, 1.0, 0.0) * (u.T @ rhs))
        rel = relative(jnp.linalg.norm(system @ v - rhs_range), jnp.linalg.norm(rhs))
        info: dict[str, Any] = {
            "residual": rel,
            "converged": jnp.isfinite(rel) & (rel < 1e-4),
            "hvp_count": jnp.asarray(flat.size),
            "min_eigenvalue": lam[0],
            "max_eigenvalue": lam[-1],
            "min_abs_eigenvalue": jnp.min(jnp.abs(lam)),
            "null_dimensions": jnp.sum(null),
            "damping": jnp.asarray(damping),
        }
        return unravel(v), info
