"""The alpha hypergradient: Eq. 3 solved exactly, and the approximations people compare it with.

Bilevel problem (Eq. 2)::

    min_alpha  L_outer(theta*(alpha)),   theta*(alpha) = argmin_theta L_total(theta, alpha),
    L_total = (1 - alpha) L_CLS + alpha L_MM                                    (Eq. 1)

By the implicit function theorem (Eq. 3)::

    d L_outer / d alpha = - grad^2_{alpha,theta} L_total  H^{-1}  grad_theta L_outer,
    H = grad^2_{theta,theta} L_total,   grad^2_{alpha,theta} L_total = g_MM - g_CLS.

The estimators differ only in how they get ``v ~ H^{-1} grad L_outer`` (or skip it). Everything
here sees parameter pytrees and loss closures ``params -> scalar``; nothing looks inside a model.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from flax import struct
from jax.flatten_util import ravel_pytree

from dyngap_jax import losses
from dyngap_jax.hypergrad.hvp import check_like, check_params, jvp_blocked, make_hvp, resolve_mode
from dyngap_jax.hypergrad.solvers import _finite, conjugate_gradient, minres, neumann_series, power_iteration

PyTree = Any
Loss = Callable[[PyTree], jax.Array]

CG_OPERATORS = ("plain", "damped", "normal", "gauss_newton")
LFM_REDUCTIONS = ("cross", "first_tensor_mean", "mean")


@struct.dataclass
class HypergradResult:
    """``value``: the estimate of ``d L_outer / d alpha`` (alpha's shape). ``info``: diagnostics.

    ``info`` always holds ``iterations``, ``residual`` (relative residual of the linear system
    the method solved; NaN where it solves none), ``hvp_count``, ``converged``, ``breakdown``
    and ``finite``, plus method-specific entries. It is a pytree of arrays, so a result
    passes through ``jax.jit``.
    """

    value: jax.Array
    info: dict[str, jax.Array]
    method: str = struct.field(pytree_node=False)

    @property
    def ok(self) -> jax.Array:
        """True when the value is finite, the solve converged and nothing broke down."""
        return self.info["finite"] & self.info["converged"] & ~self.info["breakdown"]


@dataclasses.dataclass(frozen=True)
class _Problem:
    cls_loss: Loss
    mm_loss: Loss
    outer_loss: Loss
    params: PyTree
    a: jax.Array
    hvp_mode: str
    cross_mode: str = "forward_over_reverse"

    def total(self, params: PyTree, a: jax.Array) -> jax.Array:
        return losses.total(self.cls_loss(params), self.mm_loss(params), a)

    def total_at(self, a: jax.Array) -> Loss:
        return lambda p: self.total(p, a)

    def hvp(self) -> Callable[[PyTree], PyTree]:
        return make_hvp(self.total_at(self.a), self.params, self.hvp_mode)[0]

    def outer_grad(self) -> PyTree:
        return jax.grad(self.outer_loss)(self.params)

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
    ``cls_loss`` and ``mm_loss``. Every estimator that builds a ``v`` ends here.
    """
    total = lambda p, b: losses.total(cls_loss(p), mm_loss(p), b)
    return -cross_term(total, params, jnp.asarray(a), v, mode)


def _relative(num: jax.Array, den: jax.Array) -> jax.Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num)


def _hessian_residual(problem: _Problem, hvp: Callable, v: PyTree, g: PyTree) -> jax.Array:
    """``|H v - g| / |g|`` for the undamped Hessian: how far ``v`` is from ``H^{-1} g``."""
    return _relative(otu.tree_norm(otu.tree_sub(hvp(v), g)), otu.tree_norm(g))


def _damped(matvec: Callable, damping: float) -> Callable:
    if not damping:
        return matvec
    return lambda v: otu.tree_add_scale(matvec(v), damping, v)


# --------------------------------------------------------------------------- exact


def _cg(
    problem: _Problem,
    *,
    damping: float | None = None,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int = 100,
    operator: str = "plain",
    x0: PyTree | None = None,
    restarts: int = 0,
    gn_model: tuple[Callable, Callable, Callable] | None = None,
):
    """IFT with ``H^{-1} g`` by conjugate gradient on Hessian-vector products.

    ``operator``: ``"plain"`` solves ``H v = g`` (H must be positive definite: a breakdown is
    flagged if it is not); ``"damped"`` solves ``(H + damping I) v = g``; ``"normal"`` solves
    ``(H^2 + damping I) v = H g`` (positive semi-definite for any symmetric H, two HVPs an
    iteration, the condition number squared); ``"gauss_newton"`` solves ``(G + damping I) v = g``
    with ``G = J^T (d^2 l / d o^2) J`` the generalised Gauss-Newton matrix of
    ``L_total = l(o(theta))``, given as ``gn_model = (outputs_fn, cls_from_outputs,
    mm_from_outputs)`` (``cls_from_outputs(outputs_fn(p))`` must equal ``cls_loss(p)``, likewise
    for mm; G is PSD when those heads are convex in the outputs). ``x0`` warm-starts CG;
    ``restarts`` restarts it from the true residual when rounding made it stop early (see
    :func:`~dyngap_jax.hypergrad.solvers.conjugate_gradient`).
    """
    if operator not in CG_OPERATORS:
        raise ValueError(f"cg: `operator` must be one of {CG_OPERATORS}, got {operator!r}")
    if operator == "plain" and damping:
        raise ValueError(f"cg: `damping`={damping} with operator='plain'; use operator='damped'")
    if operator == "damped" and not (damping and damping > 0):
        raise ValueError(f"cg: operator='damped' needs `damping` > 0, got {damping}")
    if damping is not None and damping < 0:
        raise ValueError(f"cg: `damping` must be >= 0, got {damping}")
    damping = float(damping or 0.0)
    if x0 is not None:
        check_like(x0, problem.params, "x0")

    hvp = problem.hvp()
    g = problem.outer_grad()
    b = g
    per_matvec, extra = 1, 0
    if operator in ("plain", "damped"):
        matvec = _damped(hvp, damping)
    elif operator == "normal":
        matvec = _damped(lambda v: hvp(hvp(v)), damping)
        b, per_matvec, extra = hvp(g), 2, 1
    else:
        if gn_model is None or len(gn_model) != 3 or not all(callable(f) for f in gn_model):
            raise ValueError(
                "cg: operator='gauss_newton' needs `gn_model=(outputs_fn, cls_from_outputs, mm_from_outputs)`"
            )
        outputs_fn, cls_head, mm_head = gn_model
        head = lambda o: losses.total(cls_head(o), mm_head(o), problem.a)
        outputs, jvp_fn = jax.linearize(outputs_fn, problem.params)
        vjp_fn = jax.linear_transpose(jvp_fn, problem.params)
        head_hvp = make_hvp(head, outputs, problem.hvp_mode)[0]
        matvec = _damped(lambda v: vjp_fn(head_hvp(jvp_fn(v)))[0], damping)

    x, info = conjugate_gradient(matvec, b, x0, tol=tol, atol=atol, maxiter=maxiter, restarts=restarts)
    info = dict(info)
    info["hvp_count"] = info.pop("matvecs") * per_matvec + extra
    info["damping"] = jnp.asarray(damping)
    return x, info


def _minres(problem: _Problem, *, damping: float = 0.0, tol: float = 1e-6, maxiter: int = 100):
    """IFT with ``(H + damping I)^{-1} g`` by MINRES on Hessian-vector products.

    For the symmetric indefinite Hessians of networks: one HVP an iteration (CG on the normal
    equations takes two) and no breakdown on negative curvature. With ``damping=0`` on a singular
    H it converges to the solution on H's range, like ``dense``.
    """
    if damping < 0:
        raise ValueError(f"minres: `damping` must be >= 0, got {damping}")
    x, info = minres(_damped(problem.hvp(), float(damping)), problem.outer_grad(), tol=tol, maxiter=maxiter)
    info = dict(info)
    info["hvp_count"] = info.pop("matvecs")
    info["damping"] = jnp.asarray(damping)
    return x, info


def _dense(problem: _Problem, *, damping: float = 0.0, max_params: int = 20_000, operator: str = "plain"):
    """Materialise the Hessian and solve directly (tiny models and tests only).

    ``operator`` names the same systems as CG's, so ``dense`` can check a CG solve exactly:
    ``"plain"`` / ``"damped"`` solve ``(H + damping I) v = g``; ``"normal"`` solves
    ``(H^2 + damping I) v = H g`` (with damping > 0 a Tikhonov-filtered ``H^{-1} g`` that damps the
    directions with ``|eigenvalue| << sqrt(damping)``; at 0 the exact solve). A singular system is
    solved on its range (pseudo-inverse; ``null_dimensions`` counts what was dropped).
    ``min_eigenvalue`` / ``max_eigenvalue`` / ``min_abs_eigenvalue`` describe the undamped H.
    """
    if operator not in ("plain", "damped", "normal"):
        raise ValueError(f"dense: `operator` must be 'plain', 'damped' or 'normal', got {operator!r}")
    if damping < 0:
        raise ValueError(f"dense: `damping` must be >= 0, got {damping}")
    flat, unravel = ravel_pytree(problem.params)
    if flat.size > max_params:
        raise ValueError(
            f"dense: the Hessian would be {flat.size} x {flat.size}; `max_params` is {max_params}. "
            "Use method='cg' for models this size"
        )
    hess = jax.hessian(lambda f: problem.total(unravel(f), problem.a))(flat)
    hess = 0.5 * (hess + hess.T)  # exact in exact arithmetic; removes rounding asymmetry
    g = ravel_pytree(problem.outer_grad())[0]
    # through the eigendecomposition H = U diag(lam) U^T: v = U f(lam) U^T g with f = 1 / (lam + d)
    # (plain, damped) or lam / (lam^2 + d) (normal); where the system's eigenvalue vanishes to
    # rounding (dead units, symmetries make H exactly singular) f is 0: the pseudo-inverse, the
    # solution CG started at 0 converges to
    lam, u = jnp.linalg.eigh(hess)
    sys_eig = lam**2 + damping if operator == "normal" else lam + damping
    cutoff = flat.size * jnp.finfo(hess.dtype).eps * jnp.max(jnp.abs(sys_eig))
    null = jnp.abs(sys_eig) <= cutoff
    num = lam if operator == "normal" else jnp.ones_like(lam)
    f = jnp.where(null, 0.0, num / jnp.where(null, 1.0, sys_eig))
    v = u @ (f * (u.T @ g))
    eig = lam
    system, rhs = (hess @ hess + damping * jnp.eye(flat.size, dtype=hess.dtype), hess @ g) if operator == "normal" \
        else (hess + damping * jnp.eye(flat.size, dtype=hess.dtype), g)
    # residual on the range of the system (the part of rhs in its null space cannot be solved for)
    rhs_range = rhs - u @ (jnp.where(null, 1.0, 0.0) * (u.T @ rhs))
    rel = _relative(jnp.linalg.norm(system @ v - rhs_range), jnp.linalg.norm(rhs))
    info = {
        "residual": rel,
        "converged": jnp.isfinite(rel) & (rel < 1e-4),
        "hvp_count": jnp.asarray(flat.size),
        "min_eigenvalue": eig[0],
        "max_eigenvalue": eig[-1],
        "min_abs_eigenvalue": jnp.min(jnp.abs(eig)),
        "null_dimensions": jnp.sum(null),
        "damping": jnp.asarray(damping),
    }
    return unravel(v), info


# --------------------------------------------------------------------------- approximations


def _identity(problem: _Problem, *, scale: float = 1.0):
    """``H^{-1} ~ scale * I`` (T1-T2, first-order DARTS): no Hessian at all."""
    return otu.tree_scale(scale, problem.outer_grad()), {"hvp_count": jnp.asarray(0)}


def _eta_from_power_iteration(matvec, like, key, power_iters):
    lam, _ = power_iteration(matvec, like, key, power_iters)
    return 1.0 / jnp.abs(lam), lam


def _neumann(
    problem: _Problem,
    *,
    num_terms: int = 20,
    eta: float | None = None,
    damping: float = 0.0,
    power_iters: int = 20,
    key: jax.Array | None = None,
):
    """``H^{-1} g ~ eta sum_{k<K} (I - eta H)^k g`` (Lorraine et al. 2020).

    ``eta=None`` takes ``1 / |lambda_max|`` from ``power_iters`` steps of power iteration
    (``key`` seeds its start). Divergence (``eta`` too large, or H not positive definite) is
    flagged in ``info["diverged"]`` and makes ``converged`` false.
    """
    matvec = _damped(problem.hvp(), damping)
    g = problem.outer_grad()
    extra = 0
    lam = jnp.asarray(jnp.nan)
    if eta is None:
        key = jax.random.PRNGKey(0) if key is None else key
        eta, lam = _eta_from_power_iteration(matvec, g, key, power_iters)
        extra = power_iters
    elif eta <= 0:
        raise ValueError(f"neumann: `eta` must be > 0, got {eta}")
    v, ninfo = neumann_series(matvec, g, eta=eta, num_terms=num_terms)
    info = {
        "iterations": jnp.asarray(num_terms),
        "hvp_count": ninfo["matvecs"] + extra,
        "converged": ~ninfo["diverged"],
        "breakdown": ninfo["diverged"],  # a diverging series is a failed estimate, not a slow one
        "diverged": ninfo["diverged"],
        "tail_ratio": ninfo["tail_ratio"],
        "eta": jnp.asarray(eta),
        "lambda_max": lam,
    }
    return v, info


def _ghadimi_wang(
    problem: _Problem,
    *,
    sampler: Callable[[jax.Array], tuple[Loss, Loss]] | None = None,
    key: jax.Array | None = None,
    num_terms: int = 20,
    eta: float | None = None,
    damping: float = 0.0,
    power_iters: int = 20,
):
    """Ghadimi & Wang (2018): ``b eta prod_{k=1..p} (I - eta H_k) g`` with ``p ~ U{0..b-1}``.

    ``sampler(key) -> (cls_loss_k, mm_loss_k)`` gives the losses of a fresh mini-batch (it is
    traced, so draw indices with ``jax.random`` and index arrays); ``H_k`` is the Hessian of
    their L_total. Unbiased for the ``b``-term truncated Neumann series. ``eta=None`` uses
    power iteration on the caller's inner losses.
    """
    if sampler is None or not callable(sampler):
        raise ValueError("ghadimi_wang needs `sampler`: key -> (cls_loss, mm_loss) of a fresh mini-batch")
    if key is None:
        raise ValueError("ghadimi_wang needs `key` (a jax.random key) for the series length and the batches")
    if num_terms < 1:
        raise ValueError(f"ghadimi_wang: `num_terms` must be >= 1, got {num_terms}")
    g = problem.outer_grad()
    key_p, key_b, key_eta = jax.random.split(key, 3)
    extra = 0
    if eta is None:
        eta, _ = _eta_from_power_iteration(_damped(problem.hvp(), damping), g, key_eta, power_iters)
        extra = power_iters
    elif eta <= 0:
        raise ValueError(f"ghadimi_wang: `eta` must be > 0, got {eta}")
    p = jax.random.randint(key_p, (), 0, num_terms)

    def body(carry):
        k, term = carry
        sampled = sampler(jax.random.fold_in(key_b, k))
        if not (isinstance(sampled, tuple) and len(sampled) == 2):
            raise ValueError("ghadimi_wang: `sampler(key)` must return a pair (cls_loss, mm_loss)")
        cls_k, mm_k = sampled
        total_k = lambda q: losses.total(cls_k(q), mm_k(q), problem.a)
        h_k = _damped(make_hvp(total_k, problem.params, problem.hvp_mode)[0], damping)
        return k + 1, otu.tree_add_scale(term, -eta, h_k(term))

    _, term = jax.lax.while_loop(lambda c: c[0] < p, body, (jnp.zeros((), p.dtype), g))
    v = otu.tree_scale(num_terms * eta, term)
    info = {"iterations": p, "hvp_count": p + extra, "p": p, "eta": jnp.asarray(eta)}
    return v, info


def _lfm_code(problem: _Problem, *, reduction: str = "cross", tensor_index: int = 0):
    """The authors' shortcut: ``H . g`` in place of ``H^{-1} g`` (no inverse).

    ``reduction`` turns ``H g`` into alpha's update: ``"cross"`` puts it in Eq. 3 in place of
    ``H^{-1} g`` (``-(g_MM - g_CLS)^T H g``; works for a vector alpha); ``"first_tensor_mean"``
    is what their code does: the mean of the first parameter tensor's entries of ``H g``
    (``tensor_index`` picks the tensor in ``jax.tree_util.tree_leaves`` order, which sorts dict
    keys, unlike PyTorch's registration order); ``"mean"`` averages all entries.
    """
    if reduction not in LFM_REDUCTIONS:
        raise ValueError(f"lfm_code: `reduction` must be one of {LFM_REDUCTIONS}, got {reduction!r}")
    hg = problem.hvp()(problem.outer_grad())
    info = {"hvp_count": jnp.asarray(1)}
    if reduction == "cross":
        return implicit_hypergradient(problem.cls_loss, problem.mm_loss, problem.params, problem.a, hg, problem.cross_mode), info
    if problem.a.ndim:
        raise ValueError(
            f"lfm_code: reduction={reduction!r} gives one number, not one per modality pair; "
            "use reduction='cross' with a vector alpha"
        )
    leaves = jax.tree_util.tree_leaves(hg)
    if reduction == "first_tensor_mean":
        if not -len(leaves) <= tensor_index < len(leaves):
            raise ValueError(f"lfm_code: `tensor_index` {tensor_index} out of range for {len(leaves)} tensors")
        value = jnp.mean(leaves[tensor_index])
    else:
        value = jnp.mean(ravel_pytree(hg)[0])
    return value.astype(problem.a.dtype), info


def _unrolled(
    problem: _Problem,
    *,
    num_steps: int = 10,
    inner_lr: float = 0.1,
    sampler: Callable[[jax.Array], tuple[Loss, Loss]] | None = None,
    key: jax.Array | None = None,
):
    """Differentiate ``L_outer(theta_K(alpha))`` through ``K`` SGD steps on L_total from ``params``.

    With ``sampler`` (and ``key``) each step uses a fresh mini-batch's losses; otherwise the
    caller's ``cls_loss`` and ``mm_loss``. Memory grows with ``K`` (reverse mode through the loop).
    """
    if num_steps < 1:
        raise ValueError(f"unrolled: `num_steps` must be >= 1, got {num_steps}")
    if sampler is not None and key is None:
        raise ValueError("unrolled: a `sampler` needs a `key`")

    def outer_after(a):
        def step(theta, k):
            if sampler is None:
                total_k = lambda q: problem.total(q, a)
            else:
                cls_k, mm_k = sampler(jax.random.fold_in(key, k))
                total_k = lambda q: losses.total(cls_k(q), mm_k(q), a)
            return otu.tree_add_scale(theta, -inner_lr, jax.grad(total_k)(theta)), None

        theta, _ = jax.lax.scan(step, problem.params, jnp.arange(num_steps))
        return problem.outer_loss(theta)

    value = jax.grad(outer_after)(problem.a)
    return value, {"iterations": jnp.asarray(num_steps), "hvp_count": jnp.asarray(num_steps)}


def lbfgs_minimize(fun: Loss, params: PyTree, *, max_steps: int = 500, tol: float = 1e-9):
    """Minimise ``fun`` from ``params`` with optax's L-BFGS (zoom line search) until ``|grad| < tol``."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        p, state, k = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(p, updates), state, k + 1

    def cond(carry):
        _, state, k = carry
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (k == 0) | ((k < max_steps) & (grad_norm >= tol))

    p, _, k = jax.lax.while_loop(cond, step, (params, opt.init(params), jnp.zeros((), jnp.int32)))
    return p, k, otu.tree_norm(jax.grad(fun)(p))


def _finite_difference(
    problem: _Problem,
    *,
    eps: float = 1e-4,
    inner_steps: int = 500,
    inner_tol: float = 1e-9,
    inner_solver: Callable[[Loss, PyTree], PyTree] | None = None,
):
    """Central differences ``(L_outer(theta*(a + eps)) - L_outer(theta*(a - eps))) / (2 eps)``.

    Each ``theta*`` is re-solved from ``params`` by L-BFGS (or ``inner_solver(loss, params) ->
    params``). ``converged`` means every re-solve reached ``|grad| < inner_tol``; the estimate
    is only as good as those solves and needs a unique inner minimum (small models only).
    """
    if eps <= 0:
        raise ValueError(f"finite_difference: `eps` must be > 0, got {eps}")
    a = problem.a
    directions = jnp.eye(a.size, dtype=a.dtype).reshape((a.size,) + a.shape)

    def solve(a_shifted):
        f = problem.total_at(a_shifted)
        if inner_solver is not None:
            p = inner_solver(f, problem.params)
            return p, jnp.asarray(0), otu.tree_norm(jax.grad(f)(p))
        return lbfgs_minimize(f, problem.params, max_steps=inner_steps, tol=inner_tol)

    def one(e):
        p_plus, k_plus, gn_plus = solve(a + eps * e)
        p_minus, k_minus, gn_minus = solve(a - eps * e)
        diff = (problem.outer_loss(p_plus) - problem.outer_loss(p_minus)) / (2 * eps)
        return diff, k_plus + k_minus, jnp.maximum(gn_plus, gn_minus)

    diffs, steps, grad_norms = jax.lax.map(one, directions)
    value = diffs.reshape(a.shape)
    grad_norm = jnp.max(grad_norms)
    info = {
        "iterations": jnp.sum(steps),
        "hvp_count": jnp.asarray(0),
        "converged": grad_norm < inner_tol if inner_solver is None else jnp.isfinite(grad_norm),
        "inner_grad_norm": grad_norm,
    }
    return value, info


# --------------------------------------------------------------------------- entry point

_V_METHODS = {"cg": _cg, "minres": _minres, "dense": _dense, "identity": _identity, "neumann": _neumann,
              "ghadimi_wang": _ghadimi_wang}
_DIRECT_METHODS = {"lfm_code": _lfm_code, "unrolled": _unrolled, "finite_difference": _finite_difference}
METHODS = tuple(_V_METHODS) + tuple(_DIRECT_METHODS)


def method_options(method: str) -> tuple[str, ...]:
    """The keyword options ``method`` accepts."""
    fn = {**_V_METHODS, **_DIRECT_METHODS}[method]
    return tuple(p for p in inspect.signature(fn).parameters if p != "problem")


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _resolve_cross_mode(problem: _Problem) -> str:
    # the forward-mode cross term is a jvp of the losses themselves
    if problem.hvp_mode == "reverse_over_reverse" or jvp_blocked(problem.total_at(problem.a), problem.params):
        return "reverse_over_reverse"
    return "forward_over_reverse"


def _check_loss(name: str, fn, params, expected_shape) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable params -> loss, got {type(fn).__name__}")
    out = jax.eval_shape(fn, params)
    shape = getattr(out, "shape", None)
    if shape is None or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"`{name}` must return a floating-point array, got {out}")
    if shape != expected_shape:
        what = "a scalar" if expected_shape == () else f"shape {expected_shape} (one loss per modality pair, like `a`)"
        raise ValueError(f"`{name}` must return {what}, got shape {shape}")


def alpha_hypergradient(
    cls_loss: Loss,
    mm_loss: Loss,
    outer_loss: Loss,
    params: PyTree,
    a,
    method: str = "cg",
    *,
    hvp_mode: str = "auto",
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
      method: one of :data:`METHODS`; ``options`` are that method's keywords
        (:func:`method_options`).
      hvp_mode: ``"auto"`` (forward-over-reverse, reverse-over-reverse where a ``custom_vjp``
        stops jvp), or either explicitly.
      report_residual: for the methods that build ``v ~ H^{-1} grad L_outer``, also report
        ``info["hessian_residual"] = |H v - grad L_outer| / |grad L_outer|`` (one more HVP).

    Works under ``jax.jit`` (closures built inside the traced function); the range of ``a`` is
    checked when it is concrete.
    """
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; known methods: {', '.join(METHODS)}")
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes options {allowed}; unknown: {unknown}")
    check_params(params)
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if a.ndim > 1:
        raise ValueError(f"`a` must be a scalar or a vector with one weight per modality pair, got shape {a.shape}")
    if not _is_tracer(a):
        a_np = np.asarray(a)
        if not np.all(np.isfinite(a_np)) or np.any(a_np < 0) or np.any(a_np > 1):
            raise ValueError(f"`a` must lie in [0, 1], got {a_np}")
    _check_loss("cls_loss", cls_loss, params, ())
    _check_loss("outer_loss", outer_loss, params, ())
    _check_loss("mm_loss", mm_loss, params, a.shape)

    total_fn = lambda p: losses.total(cls_loss(p), mm_loss(p), a)
    hvp_mode = resolve_mode(total_fn, params, hvp_mode)
    probe = _Problem(cls_loss, mm_loss, outer_loss, params, a, hvp_mode)
    cross_mode = _resolve_cross_mode(probe)

    def run(params, a, dynamic):
        problem = _Problem(cls_loss, mm_loss, outer_loss, params, a, hvp_mode, cross_mode)
        opts = jax.tree_util.tree_unflatten(opt_def, [dynamic.get(i, leaf) for i, leaf in enumerate(opt_leaves)])
        return _estimate(problem, method, opts, report_residual)

    # Array options (x0, keys) are traced arguments; callables and numbers are closed over.
    opt_leaves, opt_def = jax.tree_util.tree_flatten(options)
    dynamic = {i: leaf for i, leaf in enumerate(opt_leaves) if isinstance(leaf, (jax.Array, np.ndarray))}
    already_traced = any(_is_tracer(x) for x in jax.tree_util.tree_leaves((params, a, dynamic)))
    # Called eagerly, compile the whole estimate once rather than dispatch it op by op.
    value, info = (run if already_traced else jax.jit(run))(params, a, dynamic)
    return HypergradResult(value=value, info=info, method=method)


def _estimate(problem: _Problem, method: str, options: dict, report_residual: bool):
    info: dict[str, jax.Array] = {
        "iterations": jnp.asarray(0),
        "residual": jnp.asarray(jnp.nan),
        "converged": jnp.asarray(True),
        "breakdown": jnp.asarray(False),
    }
    if method in _V_METHODS:
        v, method_info = _V_METHODS[method](problem, **options)
        value = implicit_hypergradient(problem.cls_loss, problem.mm_loss, problem.params, problem.a, v, problem.cross_mode)
        info.update(method_info)
        g = problem.outer_grad()  # a second trace of the same gradient; jit merges the two
        # a solve that stopped on a non-finite right-hand side must not pass for a clean zero
        finite = _finite(v) & _finite(g)
        if report_residual:
            info["hessian_residual"] = _hessian_residual(problem, problem.hvp(), v, g)
            info["hvp_count"] = info["hvp_count"] + 1
    else:
        value, method_info = _DIRECT_METHODS[method](problem, **options)
        info.update(method_info)
        finite = jnp.asarray(True)
    value = jnp.reshape(value, problem.a.shape).astype(problem.a.dtype)
    info["finite"] = finite & jnp.all(jnp.isfinite(value))
    info["hvp_forward_over_reverse"] = jnp.asarray(problem.hvp_mode == "forward_over_reverse")
    info["cross_forward_over_reverse"] = jnp.asarray(problem.cross_mode == "forward_over_reverse")
    return value, {k: jnp.asarray(v) for k, v in info.items()}
