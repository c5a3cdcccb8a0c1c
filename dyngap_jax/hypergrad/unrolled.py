"""Hypergradients without the implicit function theorem: differentiate through K inner steps, or take
central differences of re-solved inner problems."""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from dyngap_jax import losses
from dyngap_jax.hypergrad.problem import Loss, Method, Problem, PyTree


@dataclasses.dataclass(frozen=True)
class Unrolled(Method):
    """Differentiate ``L_outer(theta_K(alpha))`` through ``K = num_steps`` SGD steps on L_total from ``params``.

    With the inputs ``sampler`` and ``key`` each step uses a fresh mini-batch's losses; otherwise the
    caller's ``cls_loss`` and ``mm_loss``. Memory grows with ``K`` (reverse mode through the loop).
    """

    name: ClassVar[str] = "unrolled"
    solves: ClassVar[bool] = False
    inputs: ClassVar[tuple[str, ...]] = ("sampler", "key")

    num_steps: int = 10
    inner_lr: float = 0.1

    def validate(self):
        self._number("num_steps", integer=True, minimum=1)
        self._number("inner_lr", minimum=0.0, strict=True)

    def estimate(self, problem: Problem, sampler: Callable | None = None, key=None):
        if sampler is not None and key is None:
            raise ValueError("unrolled: a `sampler` needs a `key`")

        def outer_after(a):
            def step(theta, k):
                if sampler is None:
                    total_k = lambda q: problem.total(q, a)
                else:
                    cls_k, mm_k = sampler(jax.random.fold_in(key, k))
                    total_k = lambda q: losses.total(cls_k(q), mm_k(q), a)
                return otu.tree_add_scale(theta, -self.inner_lr, jax.grad(total_k)(theta)), None

            theta, _ = jax.lax.scan(step, problem.params, jnp.arange(self.num_steps))
            return problem.outer_loss(theta)

        value = jax.grad(outer_after)(problem.a)
        return value, {"iterations": jnp.asarray(self.num_steps), "hvp_count": jnp.asarray(self.num_steps)}


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


@dataclasses.dataclass(frozen=True)
class FiniteDifference(Method):
    """Central differences ``(L_outer(theta*(a + eps)) - L_outer(theta*(a - eps))) / (2 eps)``.

    Each ``theta*`` is re-solved from ``params`` by L-BFGS (``inner_steps``, ``inner_tol``) or by the
    input ``inner_solver(loss, params) -> params``. ``converged`` means every re-solve reached
    ``|grad| < inner_tol``; the estimate is only as good as those solves and needs a unique inner
    minimum (small models only).
    """

    name: ClassVar[str] = "finite_difference"
    solves: ClassVar[bool] = False
    inputs: ClassVar[tuple[str, ...]] = ("inner_solver",)

    eps: float = 1e-4
    inner_steps: int = 500
    inner_tol: float = 1e-9

    def validate(self):
        self._number("eps", minimum=0.0, strict=True)
        self._number("inner_steps", integer=True, minimum=1)
        self._number("inner_tol", minimum=0.0, strict=True)

    def estimate(self, problem: Problem, inner_solver: Callable | None = None):
        a = problem.a
        directions = jnp.eye(a.size, dtype=a.dtype).reshape((a.size,) + a.shape)

        def solve(a_shifted):
            f = problem.total_at(a_shifted)
            if inner_solver is not None:
                p = inner_solver(f, problem.params)
                return p, jnp.asarray(0), otu.tree_norm(jax.grad(f)(p))
            return lbfgs_minimize(f, problem.params, max_steps=self.inner_steps, tol=self.inner_tol)

        def one(e):
            p_plus, k_plus, gn_plus = solve(a + self.eps * e)
            p_minus, k_minus, gn_minus = solve(a - self.eps * e)
            diff = (problem.outer_loss(p_plus) - problem.outer_loss(p_minus)) / (2 * self.eps)
            return diff, k_plus + k_minus, jnp.maximum(gn_plus, gn_minus)

        diffs, steps, grad_norms = jax.lax.map(one, directions)
        grad_norm = jnp.max(grad_norms)
        info = {
            "iterations": jnp.sum(steps),
            "hvp_count": jnp.asarray(0),
            "converged": grad_norm < self.inner_tol if inner_solver is None else jnp.isfinite(grad_norm),
            "inner_grad_norm": grad_norm,
        }
        return diffs.reshape(a.shape), info
