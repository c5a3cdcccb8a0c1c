"""Series and shortcuts for ``H^{-1} g``: identity, Neumann, Ghadimi-Wang, and the authors' ``H g``.

None of these solves a linear system to a tolerance; they are the approximations the exact
solves are compared with (``scripts/compare_hypergrads.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from dyngap_jax import losses
from dyngap_jax.hypergrad.hvp import make_hvp
from dyngap_jax.hypergrad.problem import Method, Problem, damped, implicit_hypergradient, is_tracer
from dyngap_jax.hypergrad.solvers import neumann_series, power_iteration

LFM_REDUCTIONS = ("cross", "first_tensor_mean", "mean")


@dataclasses.dataclass(frozen=True)
class Identity(Method):
    """``H^{-1} ~ scale * I`` (T1-T2, first-order DARTS): no Hessian at all."""

    name: ClassVar[str] = "identity"

    scale: float = 1.0

    def validate(self):
        self._number("scale")

    def estimate(self, problem: Problem):
        return otu.tree_scale(self.scale, problem.outer_grad()), {"hvp_count": jnp.asarray(0)}


def _eta_from_power_iteration(matvec, like, key, power_iters):
    lam, _ = power_iteration(matvec, like, key, power_iters)
    return 1.0 / jnp.abs(lam), lam


@dataclasses.dataclass(frozen=True)
class _Series(Method):
    """The options the two Neumann-type series share: terms, step ``eta`` (``None``: ``1 / |lambda_max|``
    from ``power_iters`` steps of power iteration), ``damping``."""

    min_terms: ClassVar[int] = 0

    num_terms: int = 20
    eta: float | None = None
    damping: float = 0.0
    power_iters: int = 20

    def validate(self):
        self._number("num_terms", integer=True, minimum=self.min_terms)
        self._number("eta", minimum=0.0, strict=True, allow_none=True)
        self._number("damping", minimum=0.0)
        self._number("power_iters", integer=True, minimum=1)


@dataclasses.dataclass(frozen=True)
class Neumann(_Series):
    """``H^{-1} g ~ eta sum_{k<K} (I - eta H)^k g`` (Lorraine et al. 2020).

    ``eta=None`` takes ``1 / |lambda_max|`` from ``power_iters`` steps of power iteration (the input
    ``key`` seeds its start; default ``PRNGKey(0)``). Divergence (``eta`` too large, or H not
    positive definite) is flagged in ``info["diverged"]`` and makes ``converged`` false.
    """

    name: ClassVar[str] = "neumann"
    inputs: ClassVar[tuple[str, ...]] = ("key",)

    def estimate(self, problem: Problem, key=None):
        matvec = damped(problem.hvp(), self.damping)
        g = problem.outer_grad()
        extra, eta = 0, self.eta
        lam = jnp.asarray(jnp.nan)
        if eta is None:
            key = jax.random.PRNGKey(0) if key is None else key
            eta, lam = _eta_from_power_iteration(matvec, g, key, self.power_iters)
            extra = self.power_iters
        v, ninfo = neumann_series(matvec, g, eta=eta, num_terms=self.num_terms)
        info = {
            "iterations": jnp.asarray(self.num_terms),
            "hvp_count": ninfo["matvecs"] + extra,
            "converged": ~ninfo["diverged"],
            "breakdown": ninfo["diverged"],  # a diverging series is a failed estimate, not a slow one
            "diverged": ninfo["diverged"],
            "tail_ratio": ninfo["tail_ratio"],
            "eta": jnp.asarray(eta),
            "lambda_max": lam,
        }
        return v, info


@dataclasses.dataclass(frozen=True)
class GhadimiWang(_Series):
    """Ghadimi & Wang (2018): ``b eta prod_{k=1..p} (I - eta H_k) g`` with ``p ~ U{0..b-1}``.

    Inputs: ``sampler(key) -> (cls_loss_k, mm_loss_k)`` gives the losses of a fresh mini-batch (it
    is traced, so draw indices with ``jax.random`` and index arrays; training draws sub-batches of
    the inner batch), and ``key``. ``H_k`` is the Hessian of their L_total. Unbiased for the
    ``b``-term truncated Neumann series. ``eta=None`` uses power iteration on the caller's losses.
    """

    name: ClassVar[str] = "ghadimi_wang"
    inputs: ClassVar[tuple[str, ...]] = ("sampler", "key")
    min_terms: ClassVar[int] = 1

    def required_inputs(self):
        return ("sampler", "key")

    def estimate(self, problem: Problem, sampler: Callable | None = None, key=None):
        if sampler is None or not callable(sampler):
            raise ValueError("ghadimi_wang needs `sampler`: key -> (cls_loss, mm_loss) of a fresh mini-batch")
        if key is None:
            raise ValueError("ghadimi_wang needs `key` (a jax.random key) for the series length and the batches")
        g = problem.outer_grad()
        key_p, key_b, key_eta = jax.random.split(key, 3)
        extra, eta = 0, self.eta
        if eta is None:
            eta, _ = _eta_from_power_iteration(damped(problem.hvp(), self.damping), g, key_eta, self.power_iters)
            extra = self.power_iters
        p = jax.random.randint(key_p, (), 0, self.num_terms)

        def body(carry):
            k, term = carry
            sampled = sampler(jax.random.fold_in(key_b, k))
            if not (isinstance(sampled, tuple) and len(sampled) == 2):
                raise ValueError("ghadimi_wang: `sampler(key)` must return a pair (cls_loss, mm_loss)")
            cls_k, mm_k = sampled
            total_k = lambda q: losses.total(cls_k(q), mm_k(q), problem.a)
            h_k = damped(make_hvp(total_k, problem.params, problem.hvp_mode, problem.hvp_remat)[0], self.damping)
            return k + 1, otu.tree_add_scale(term, -eta, h_k(term))

        _, term = jax.lax.while_loop(lambda c: c[0] < p, body, (jnp.zeros((), p.dtype), g))
        v = otu.tree_scale(self.num_terms * eta, term)
        return v, {"iterations": p, "hvp_count": p + extra, "p": p, "eta": jnp.asarray(eta)}


@dataclasses.dataclass(frozen=True)
class LFMCode(Method):
    """The authors' shortcut: ``H . g`` in place of ``H^{-1} g`` (no inverse).

    ``reduction`` turns ``H g`` into alpha's update: ``"cross"`` puts it in Eq. 3 in place of
    ``H^{-1} g`` (``-(g_MM - g_CLS)^T H g``; works for a vector alpha); ``"first_tensor_mean"``
    is what their code does: the mean of one parameter tensor's entries of ``H g``, their first
    (``model.parameters()[0]``); ``"mean"`` averages all entries.

    Which tensor: ``tensor``, its path (``'/'``-joined keys of the parameter tree, e.g.
    ``"encoders_audio/embedder/convolution/kernel"``), or, when empty, ``tensor_index`` in
    ``jax.tree_util.tree_leaves`` order (which sorts dict keys: for an MLP ``dense_0/bias`` before
    ``dense_0/kernel``, unlike PyTorch's registration order). ``tensor="first"`` names the
    parameter the model creates first, PyTorch's first for modules written in forward order; the
    training setup resolves it to a path (:func:`dyngap_jax.methods.lfm.resolve_estimator`).
    """

    name: ClassVar[str] = "lfm_code"
    solves: ClassVar[bool] = False

    reduction: str = "cross"
    tensor_index: int = 0
    tensor: str = ""

    def validate(self):
        self._choice("reduction", LFM_REDUCTIONS)
        self._number("tensor_index", integer=True)
        if not isinstance(self.tensor, str):
            self._fail("tensor", f"`tensor` must be a parameter's path ('a/b/kernel'), 'first' or '', got {self.tensor!r}")

    def estimate(self, problem: Problem):
        hg = problem.hvp()(problem.outer_grad())
        info = {"hvp_count": jnp.asarray(1)}
        if self.reduction == "cross":
            value = implicit_hypergradient(problem.cls_loss, problem.mm_loss, problem.params, problem.a, hg,
                                           problem.cross_mode)
            return value, info
        if problem.a.ndim:
            raise ValueError(
                f"lfm_code: reduction={self.reduction!r} gives one number, not one per modality pair; "
                "use reduction='cross' with a vector alpha")
        leaves = jax.tree_util.tree_leaves(hg)
        if self.reduction == "first_tensor_mean":
            if self.tensor:
                value = jnp.mean(self._by_path(hg))
            else:
                index = self.tensor_index
                if not is_tracer(index) and not -len(leaves) <= index < len(leaves):
                    self._fail("tensor_index", f"`tensor_index` {index} out of range for {len(leaves)} tensors")
                value = jnp.mean(leaves[index])
        else:
            value = jnp.mean(ravel_pytree(hg)[0])
        return value.astype(problem.a.dtype), info

    def _by_path(self, tree):
        if self.tensor == "first":
            self._fail("tensor", "`tensor`='first' is the model's first-created parameter, which only the training "
                                 "setup knows; give the parameter's path here")
        paths = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
                 for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        if self.tensor not in paths:
            self._fail("tensor", f"`tensor` {self.tensor!r} is not a parameter; the first few: {sorted(paths)[:5]}")
        return paths[self.tensor]
