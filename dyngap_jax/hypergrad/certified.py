"""A bilinear form ``u_j^T A^{-1} b`` by conjugate gradient, stopped on a certified bound of its own error.

The hypergradient is a scalar (one an entry of a vector alpha): ``-u^T A^{-1} b`` with ``A = H^2 + d I``,
``b = H g`` and ``u = g_MM - g_CLS`` (the normal system of :class:`~dyngap_jax.hypergrad.exact.CG`). A
residual tolerance on ``A x = b`` says little about that scalar: the scalar's error is not monotone in the
iterations, and a tolerance that suits one step overshoots another. Here the solve stops when the scalar
is known to a stated accuracy:

* the primal ``A x = b`` and the duals ``A y_j = u_j`` run in lockstep, one batched operator application
  an iteration (:func:`jax.vmap` over the right-hand sides);
* the estimate is the adjoint-corrected ``J_j = u_j^T x + y_j^T r`` (Pierce and Giles, 2000), whose
  error is ``e_{y_j}^T A e_x``, so ``|J_j - u_j^T A^{-1} b| <= ||e_{y_j}||_A ||e_x||_A``;
* each A-norm error is bounded above by the Gauss-Radau rule with a prescribed node ``mu <= lambda_min(A)``,
  from CG's own step lengths and residual norms (Golub and Meurant; in the recurrence of Meurant and
  Tichy, "The behaviour of the Gauss-Radau upper bound of the error norm in CG", Numer. Algorithms 2023:
  ``c_0 = 1 / mu``, ``c_{k+1} = (c_k - gamma_k) / (mu (c_k - gamma_k) + delta_{k+1})``,
  ``||x - x_k||_A^2 <= c_k ||r_k||^2``): no operator application beyond CG's. For ``H^2 + d I`` the node
  ``mu = d`` is a lower bound of the spectrum whatever H is.

jax.scipy and lineax have CG, but neither the Gauss-Radau recurrence nor a stopping rule on a functional
of the solution, so this is written here, on pytrees like :mod:`~dyngap_jax.hypergrad.solvers`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from dyngap_jax.hypergrad import loops

PyTree = Any


def scale_columns(scale: jax.Array, tree: PyTree) -> PyTree:
    """Scale each column ``k`` (the leading axis of every leaf) of ``tree`` by ``scale[k]``."""
    return jax.tree_util.tree_map(lambda x: scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype) * x, tree)


def column_dots(a: PyTree, b: PyTree) -> jax.Array:
    """``[a_k . b_k for each column k]``: the per-column inner products of two stacked pytrees."""
    leaves = [jnp.sum((x * y).reshape(x.shape[0], -1), axis=1)
              for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(leaves[1:], leaves[0])


def _gauss_radau(c: jax.Array, gamma: jax.Array, delta: jax.Array, mu) -> jax.Array:
    """One step of the Gauss-Radau coefficient's recurrence (``c_k -> c_{k+1}``)."""
    diff = jnp.maximum(c - gamma, 0.0)  # >= 0 in exact arithmetic (the Radau rule dominates the Gauss rule)
    den = mu * diff + delta
    return jnp.where(den > 0, diff / jnp.where(den > 0, den, 1.0), 1.0 / mu)


def bilinear_cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    duals: PyTree,
    mu,
    *,
    tol,
    atol=0.0,
    maxiter: int = 1000,
    x0: PyTree | None = None,
    record: int = 0,
) -> tuple[PyTree, jax.Array, jax.Array, dict[str, jax.Array]]:
    """``J_j = u_j^T A^{-1} b`` for SPD ``A`` with ``lambda_min(A) >= mu > 0``, to a certified accuracy.

    ``duals``: the ``u_j`` stacked on a leading axis (``[P, ...]`` leaves, the structure of ``b``).
    Stops when every entry's bound is within ``max(tol |J_j|, atol)``, after ``maxiter`` iterations,
    or on breakdown (a non-finite value, or ``p^T A p <= 0``: then ``A`` was not positive definite).
    ``x0`` warm-starts the primal, scaled by the ``c`` minimising ``|b - c A x0|`` (the duals start at 0). ``record``: with ``record = n > 0`` the
    estimates and bounds of iterations ``0 .. n-1`` (0: the start) are returned in
    ``info["history_estimate"]`` / ``info["history_bound"]`` (``[n, P]``; NaN past the last iteration).

    Returns ``(x, J, bound, info)``: the primal iterate (what a later solve may warm-start from),
    the corrected estimates ``[P]``, their certified error bounds ``[P]``, and ``iterations``,
    ``matvecs`` (operator applications, one per right-hand side and iteration), ``residual`` (the
    primal's relative residual, by the recurrence), ``dual_residual`` (the largest of the duals'),
    ``converged`` (every bound met, nothing broke down), ``breakdown``.
    """
    num = jax.tree_util.tree_leaves(duals)[0].shape[0]
    stack = lambda first, rest: jax.tree_util.tree_map(lambda f, r: jnp.concatenate([f[None], r]), first, rest)
    batched = jax.vmap(matvec)
    if x0 is None:
        x_start, r_start, initial = otu.tree_zeros_like(b), b, 0
    else:  # c x0 with c = argmin |b - c A x0|: a warm start from another system is never worse than 0
        ax0 = matvec(x0)
        aa = otu.tree_vdot(ax0, ax0)
        c = jnp.where((aa > 0) & jnp.isfinite(aa), otu.tree_vdot(b, ax0) / jnp.where(aa > 0, aa, 1.0), 0.0)
        x_start, r_start, initial = otu.tree_scale(c, x0), otu.tree_sub(b, otu.tree_scale(c, ax0)), 1
    X = stack(x_start, otu.tree_zeros_like(duals))
    R = stack(r_start, duals)
    norms0 = jnp.sqrt(column_dots(stack(b, duals), stack(b, duals)))
    rr0 = column_dots(R, R)
    dtype = rr0.dtype
    mu = jnp.asarray(mu, dtype)
    c0 = jnp.full((num + 1,), 1.0, dtype) / mu

    def estimate(X, R, rr, c):
        x_dot_u = column_dots(jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x[0], x[1:].shape), X),
                               duals)
        y_dot_r = column_dots(jax.tree_util.tree_map(lambda x: x[1:], X),
                               jax.tree_util.tree_map(lambda r: jnp.broadcast_to(r[0], r[1:].shape), R))
        err2 = jnp.maximum(c * rr, 0.0)  # Gauss-Radau upper bounds of the squared A-norm errors
        return x_dot_u + y_dot_r, jnp.sqrt(err2[0] * err2[1:])

    def met(J, bound):
        return jnp.all(bound <= jnp.maximum(tol * jnp.abs(J), atol))

    J0, bound0 = estimate(X, R, rr0, c0)
    hist = jnp.full((max(record, 1), num, 2), jnp.nan, dtype).at[0].set(jnp.stack([J0, bound0], -1))
    broke0 = ~jnp.all(jnp.isfinite(rr0))
    init = (jnp.zeros((), jnp.int32), X, R, R, rr0, c0, J0, bound0, broke0, hist)

    def cond(carry):
        k, J, bound, broke = carry[0], carry[6], carry[7], carry[8]
        return (k < maxiter) & ~met(J, bound) & ~broke

    def body(carry):
        k, X, R, P, rr, c, _, _, _, hist = carry
        AP = jax.tree_util.tree_map(lambda y, p: y.astype(p.dtype), batched(P), P)  # a damping may promote
        pap = column_dots(P, AP)
        live = rr > 0  # a column solved exactly (its residual 0) stays where it is
        safe_pap = jnp.where(live & (pap > 0), pap, 1.0)
        gamma = jnp.where(live, rr / safe_pap, 0.0)
        X = otu.tree_add(X, scale_columns(gamma, P))
        R = otu.tree_sub(R, scale_columns(gamma, AP))
        rr_new = column_dots(R, R)
        delta = jnp.where(live, rr_new / jnp.where(live, rr, 1.0), 0.0)
        c = jnp.where(live, _gauss_radau(c, gamma, delta, mu), c)
        P = otu.tree_add(R, scale_columns(delta, P))
        broke = jnp.any(live & (pap <= 0)) | ~jnp.all(jnp.isfinite(rr_new)) | ~jnp.all(jnp.isfinite(pap))
        J, bound = estimate(X, R, rr_new, c)
        if record:
            hist = hist.at[jnp.minimum(k + 1, record - 1)].set(
                jnp.where(k + 1 < record, jnp.stack([J, bound], -1), hist[record - 1]))
        return k + 1, X, R, P, rr_new, c, J, bound, broke, hist

    k, X, R, _, rr, _, J, bound, broke, hist = loops.while_loop(cond, body, init, name="certified cg")
    rel = jnp.sqrt(rr) / jnp.where(norms0 > 0, norms0, 1.0)
    x = jax.tree_util.tree_map(lambda leaf: leaf[0], X)
    info = {"iterations": k, "matvecs": k * (num + 1) + initial, "residual": rel[0], "dual_residual": jnp.max(rel[1:]),
            "converged": met(J, bound) & ~broke & jnp.all(jnp.isfinite(J)), "breakdown": broke}
    if record:
        info["history_estimate"], info["history_bound"] = hist[..., 0], hist[..., 1]
    return x, J, bound, info
