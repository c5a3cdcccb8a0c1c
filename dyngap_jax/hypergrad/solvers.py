"""Matrix-free linear solvers on pytrees, with the diagnostics the hypergradient reports.

``jax.scipy.sparse.linalg.cg`` returns no convergence flag and on breakdown silently keeps its
last iterate; :func:`conjugate_gradient` here reports iterations, the true final residual and
whether the operator showed non-positive curvature, so a bad solve is never mistaken for a
good one.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from dyngap_jax.hypergrad import loops

PyTree = Any


# The recursive residual a Krylov method stops on drifts from the true one by rounding (~0.1 % seen in
# float32); iterating to MARGIN x the threshold lets the recomputed residual, which decides `converged`,
# land inside the tolerance instead of just outside it.
MARGIN = 0.95

# CG's first iterations whose coefficients make the Lanczos matrix of ``info["ritz_max"]`` (its largest eigenvalue
# is the first thing Lanczos finds: it has converged long before the solve)
RITZ_WINDOW = 32


def tree_finite(tree: PyTree) -> jax.Array:
    """True when every leaf of ``tree`` is finite (a traced boolean)."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None = None,
    *,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int = 100,
    restarts: int = 0,
    scale_x0: bool = False,
    true_matvec: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Solve ``A x = b`` by conjugate gradient; ``A`` (given as ``matvec``) should be symmetric positive definite.

    ``scale_x0``: start from ``c x0`` with ``c`` minimising ``|b - c A x0|`` (for a warm start from a
    neighbouring system's solution: never a worse initial residual than a cold start).

    ``restarts``: when the solve stopped unconverged without breaking down (the recursive residual
    drifted from the true one ``b - A x`` by rounding, common on ill-conditioned systems, or
    ``maxiter`` ran out), start again from ``x`` with the true residual, up to this many times (each
    restart may take ``maxiter`` more iterations).

    ``true_matvec``: the operator the system is stated with, where ``matvec`` is a cheaper, less
    accurate application of it (a reduced matmul precision): the iterations use ``matvec``; every
    starting residual and the final true residual, which decides ``converged``, use ``true_matvec``,
    so each restart is a round of iterative refinement (the correction solved at the fast precision,
    the residual it corrects at the stated one).

    Stops when the recursive ``|r| <= MARGIN max(tol |b|, atol)`` (see :data:`MARGIN`), after
    ``maxiter`` iterations, or on breakdown: a search direction with ``p^T A p <= 0`` (the operator
    is not positive definite there) or a non-finite value. On breakdown the last good iterate is
    kept and ``breakdown`` is set.

    Returns ``x`` and a dict: ``iterations``; ``residual``, the relative residual
    ``|b - A x| / |b|`` recomputed from ``x`` (not the recursive estimate); ``converged``
    (that residual within tolerance, no breakdown); ``breakdown``; ``negative_curvature``
    (the breakdown was ``p^T A p <= 0``); ``matvecs``, operator applications made; ``ritz_max``,
    the largest Ritz value of ``A`` from the first :data:`RITZ_WINDOW` iterations' coefficients
    (:func:`top_ritz`; at no operator application).
    """
    if restarts < 0:
        raise ValueError(f"conjugate_gradient: `restarts` must be >= 0, got {restarts}")
    true_matvec = true_matvec or matvec
    x, info = _cg_run(matvec, b, x0, tol, atol, maxiter, scale_x0, true_matvec)
    if restarts == 0:
        return x, info

    # one nested while loop (the CG body is compiled once however many restarts are allowed)
    def cond(carry):
        n, _, inf = carry
        return (n < restarts) & ~inf["converged"] & ~inf["breakdown"] & jnp.isfinite(inf["residual"])

    def body(carry):
        n, x, inf = carry
        x_new, again = _cg_run(matvec, b, x, tol, atol, maxiter, False, true_matvec)
        merged = {**again, "iterations": inf["iterations"] + again["iterations"],
                  "matvecs": inf["matvecs"] + again["matvecs"], "ritz_max": jnp.fmax(inf["ritz_max"], again["ritz_max"])}
        return n + 1, x_new, merged

    _, x, info = loops.while_loop(cond, body, (jnp.zeros((), jnp.int32), x, info), name="cg restart")
    return x, info


def _cg_run(matvec, b, x0, tol, atol, maxiter, scale_x0=False, true_matvec=None):
    true_matvec = true_matvec or matvec
    b_norm = otu.tree_norm(b)
    threshold = jnp.maximum(tol * b_norm, atol)
    if x0 is None:
        x0 = otu.tree_zeros_like(b)
        r0 = b
        initial_matvecs = 0
    else:
        ax0 = true_matvec(x0)
        if scale_x0:  # c x0 with c = argmin |b - c A x0|: a start never worse than 0 in residual
            aa = otu.tree_vdot(ax0, ax0)
            c = jnp.where((aa > 0) & jnp.isfinite(aa), otu.tree_vdot(b, ax0) / jnp.where(aa > 0, aa, 1.0), 0.0)
            x0, ax0 = otu.tree_scale(c, x0), otu.tree_scale(c, ax0)
        r0 = otu.tree_sub(b, ax0)
        initial_matvecs = 1
    rr0 = otu.tree_vdot(r0, r0)

    def cond(carry):
        k, _, _, _, rr, broke, _, _ = carry
        return (k < maxiter) & (jnp.sqrt(rr) > MARGIN * threshold) & ~broke

    def body(carry):
        k, x, r, p, rr, _, _, coef = carry
        ap = matvec(p)
        pap = otu.tree_vdot(p, ap)
        nonpositive = pap <= 0
        step = rr / pap
        x_new = otu.tree_add_scale(x, step, p)
        r_new = otu.tree_add_scale(r, -step, ap)
        rr_new = otu.tree_vdot(r_new, r_new)
        broke = nonpositive | ~jnp.isfinite(pap) | ~jnp.isfinite(rr_new)
        beta = rr_new / rr
        p_new = otu.tree_add_scale(r_new, beta, p)
        keep = lambda new, old: otu.tree_where(broke, old, new)
        index = jnp.where(broke, RITZ_WINDOW, k)  # out of range: dropped
        coef = coef.at[:, index].set(jnp.stack([step, beta]).astype(coef.dtype), mode="drop")
        return (
            k + 1,
            keep(x_new, x),
            keep(r_new, r),
            keep(p_new, p),
            jnp.where(broke, rr, rr_new),
            broke,
            nonpositive,
            coef,
        )

    coef0 = jnp.zeros((2, RITZ_WINDOW), rr0.dtype)
    init = (jnp.zeros((), jnp.int32), x0, r0, r0, rr0, ~jnp.isfinite(rr0), jnp.zeros((), bool), coef0)
    k, x, _, _, _, broke, nonpositive, coef = loops.while_loop(cond, body, init, name="cg")

    true_r = otu.tree_sub(b, true_matvec(x))
    r_norm = otu.tree_norm(true_r)
    rel = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), r_norm)
    # The recursive residual CG stops on drifts from the true one by rounding; allow 0.1 %.
    converged = ~broke & jnp.isfinite(rel) & (r_norm <= threshold * (1.0 + 1e-3))
    info = {
        "iterations": k,
        "residual": rel,
        "converged": converged & tree_finite(x),
        "breakdown": broke,
        "negative_curvature": broke & nonpositive,
        "matvecs": k + initial_matvecs + 1,
        "ritz_max": top_ritz(coef[0], coef[1], jnp.minimum(k - broke.astype(k.dtype), RITZ_WINDOW)),
    }
    return x, info


def top_ritz(steps: jax.Array, betas: jax.Array, n) -> jax.Array:
    """The largest eigenvalue of the Lanczos matrix of CG's first ``n`` iterations, from their step sizes
    ``steps`` (``alpha_j = r_j^T r_j / p_j^T A p_j``) and ``betas`` (``r_{j+1}^T r_{j+1} / r_j^T r_j``): the
    tridiagonal ``T`` with ``T_jj = 1/alpha_j + beta_{j-1}/alpha_{j-1}`` and ``T_{j,j+1} = sqrt(beta_j)/alpha_j``
    (Saad, *Iterative Methods for Sparse Linear Systems*, 6.7.3). It is the largest Rayleigh quotient of ``A`` on
    the Krylov space, so at most ``lambda_max(A)``; NaN for ``n = 0``. A dense ``eigvalsh`` of the padded
    :data:`RITZ_WINDOW`-square matrix (the rows past ``n`` zero): one small LAPACK call, where a bisection would
    be a loop."""
    j = jnp.arange(steps.shape[0])
    valid = j < n
    inv = jnp.where(valid, 1.0 / jnp.where(valid, steps, 1.0), 0.0)
    diag = jnp.where(valid, inv + jnp.concatenate([jnp.zeros(1, inv.dtype), betas[:-1] * inv[:-1]]), 0.0)
    off = jnp.where(j[1:] < n, jnp.sqrt(jnp.maximum(betas[:-1], 0.0)) * inv[:-1], 0.0)
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.where(n > 0, jnp.linalg.eigvalsh(t)[-1], jnp.nan)


def minres(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree | None = None,
    *,
    tol: float = 1e-6,
    maxiter: int = 100,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Solve ``A x = b`` for symmetric (possibly indefinite) ``A`` by MINRES (Paige and Saunders, 1975).

    One operator application an iteration, where CG on the normal equations ``A^2 x = A b`` needs
    two; the iterates minimise ``|b - A x|`` over the Krylov space, so MINRES never breaks down on
    an indefinite Hessian. Stops when the recurrence's residual estimate falls to ``tol |b|`` or
    after ``maxiter`` iterations (``maxiter`` may be a traced integer). A singular but consistent
    system converges to a solution on the range of ``A``. The written form follows the unpreconditioned
    recurrence of SciPy's ``scipy.sparse.linalg.minres``, on pytrees.

    ``x0`` warm-starts it: MINRES runs on the residual ``b - A x0`` and stops at the same absolute
    threshold ``tol |b|``, so a start at the solution takes no iteration.

    Returns ``x`` and a dict like :func:`conjugate_gradient`'s: ``iterations``, ``residual`` (the
    true relative residual ``|b - A x| / |b|``, recomputed), ``converged``, ``breakdown`` (a
    non-finite value), ``negative_curvature`` (always False: not a failure here), ``matvecs``.
    """
    zeros = otu.tree_zeros_like(b)
    b_norm = otu.tree_norm(b)
    if x0 is None:
        x_start, r0, initial_matvecs = zeros, b, 0
    else:
        x_start, r0, initial_matvecs = x0, otu.tree_sub(b, matvec(x0)), 1
    r0_norm = otu.tree_norm(r0)
    tiny = jnp.finfo(b_norm.dtype).eps
    dt = b_norm.dtype
    f = lambda v: jnp.asarray(v, dt)
    # carry: k, x, r1, r2, y, beta, oldb, dbar, epsln, phibar, cs, sn, w, w2, broke
    init = (jnp.zeros((), jnp.int32), x_start, r0, r0, r0, r0_norm, f(0.0), f(0.0), f(0.0), r0_norm, f(-1.0), f(0.0),
            zeros, zeros, ~jnp.isfinite(r0_norm))

    def cond(c):
        k, phibar, broke = c[0], c[9], c[14]
        return (k < maxiter) & (phibar > MARGIN * tol * b_norm) & ~broke & (r0_norm > 0)

    def body(c):
        k, x, r1, r2, y, beta, oldb, dbar, epsln, phibar, cs, sn, w, w2, _ = c
        v = otu.tree_scale(1.0 / beta, y)
        y = matvec(v)
        y = otu.tree_add_scale(y, -jnp.where(k >= 1, beta / jnp.where(oldb > 0, oldb, 1.0), 0.0), r1)
        alfa = otu.tree_vdot(v, y)
        y = otu.tree_add_scale(y, -alfa / beta, r2)
        r1, r2 = r2, y
        oldb, beta = beta, otu.tree_norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = jnp.maximum(jnp.sqrt(gbar**2 + beta**2), tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = otu.tree_scale(1.0 / gamma, otu.tree_sub(otu.tree_sub(v, otu.tree_scale(oldeps, w1)), otu.tree_scale(delta, w2)))
        x = otu.tree_add_scale(x, phi, w)
        # beta = 0: the Krylov space is exhausted and x is exact; the next division must not run
        done = beta <= tiny * r0_norm
        phibar = jnp.where(done, 0.0, phibar)
        broke = ~jnp.isfinite(phibar) | ~jnp.isfinite(alfa)
        return (k + 1, x, r1, r2, y, jnp.where(done, 1.0, beta), oldb, dbar, epsln, phibar, cs, sn, w, w2, broke)

    out = loops.while_loop(cond, body, init, name="minres")
    k, x, broke = out[0], out[1], out[14]
    r_norm = otu.tree_norm(otu.tree_sub(b, matvec(x)))
    rel = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1.0), r_norm)
    converged = ~broke & jnp.isfinite(rel) & (rel <= tol * (1.0 + 1e-3))
    info = {"iterations": k, "residual": rel, "converged": converged & tree_finite(x), "breakdown": broke,
            "negative_curvature": jnp.zeros((), bool), "matvecs": k + 1 + initial_matvecs}
    return x, info


def neumann_series(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    eta: float | jax.Array,
    num_terms: int,
    growth_tolerance: float = 1e-4,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """``eta * sum_{k < K} (I - eta A)^k b``, the truncated Neumann series for ``A^{-1} b``.

    The series converges when every eigenvalue of ``A`` lies in ``(0, 2 / eta)``. For symmetric
    ``A`` the terms then never grow, so a term larger than ``|b| (1 + growth_tolerance)`` (or a
    non-finite one) marks the series ``diverged``. ``tail_ratio`` is ``|term_K| / |b|``: how
    much the truncation leaves out.
    """
    if num_terms < 1:
        raise ValueError(f"`num_terms` must be >= 1, got {num_terms}")
    b_norm = otu.tree_norm(b)

    def body(_, carry):
        term, acc, max_ratio = carry
        term = otu.tree_add_scale(term, -eta, matvec(term))
        ratio = otu.tree_norm(term) / jnp.where(b_norm > 0, b_norm, 1.0)
        return term, otu.tree_add(acc, term), jnp.maximum(max_ratio, jnp.nan_to_num(ratio, nan=jnp.inf))

    term, acc, max_ratio = jax.lax.fori_loop(0, num_terms - 1, body, (b, b, jnp.ones((), b_norm.dtype)))
    x = otu.tree_scale(eta, acc)
    tail = otu.tree_norm(otu.tree_add_scale(term, -eta, matvec(term))) / jnp.where(b_norm > 0, b_norm, 1.0)
    diverged = (max_ratio > 1.0 + growth_tolerance) | ~tree_finite(x)
    return x, {"diverged": diverged, "tail_ratio": tail, "max_term_ratio": max_ratio, "matvecs": jnp.asarray(num_terms)}


def power_iteration(
    matvec: Callable[[PyTree], PyTree], like: PyTree, key: jax.Array, num_iters: int = 20, *, v0: PyTree | None = None,
    tol: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Largest-magnitude eigenvalue of symmetric ``A`` by power iteration.

    From a random start (``key``), or from ``v0`` (a warm start: the previous call's ``info["vector"]``;
    a zero or non-finite ``v0`` falls back to the random start). ``tol=None``: ``num_iters``
    iterations; else stop once the Rayleigh quotient's relative change between two iterations is at
    most ``tol`` (at least two iterations, at most ``num_iters``). ``info``: ``matvecs`` and
    ``vector``, the last normalised iterate ``A^k v0 / |A^k v0|``.
    """
    # one draw for the whole pytree (optax's tree_random_like draws a leaf at a time: on XLA:CPU each draw
    # is a threefry loop of its own, and a ResNet pair's ~100 leaves cost ~15 s of compilation)
    flat, unravel = ravel_pytree(like)
    v = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    v = otu.tree_scale(1.0 / otu.tree_norm(v), v)
    if v0 is not None:
        n0 = otu.tree_norm(v0)
        usable = (n0 > 0) & jnp.isfinite(n0)
        v = otu.tree_where(usable, otu.tree_scale(1.0 / jnp.where(usable, n0, 1.0), v0), v)
    dtype = otu.tree_norm(v).dtype

    def step(v):
        av = matvec(v)
        n = otu.tree_norm(av)
        return otu.tree_scale(1.0 / jnp.where(n > 0, n, 1.0), av), otu.tree_vdot(v, av)

    if tol is None:
        v, lam = loops.fori_loop(0, num_iters, lambda _, c: step(c[0]), (v, jnp.zeros((), dtype)),
                                 name="power iteration")
        return lam, {"matvecs": jnp.asarray(num_iters, jnp.int32), "vector": v}

    def cond(carry):
        k, _, lam, prev = carry
        return (k < num_iters) & ((k < 2) | (jnp.abs(lam - prev) > tol * jnp.abs(lam)))

    def body(carry):
        k, v, lam, _ = carry
        v, new = step(v)
        return k + 1, v, new, lam

    zero = jnp.zeros((), dtype)
    k, v, lam, _ = loops.while_loop(cond, body, (jnp.zeros((), jnp.int32), v, zero, zero), name="power iteration")
    return lam, {"matvecs": k, "vector": v}
