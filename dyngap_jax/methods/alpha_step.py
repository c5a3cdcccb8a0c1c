"""**Algorithm 1's alpha step**, compiled: the hypergradient of the learned alpha and its update.

:func:`make_alpha_step` forms the hypergradient from the inner batch (L_CLS and L_MM: the Hessian of
L_total) and the outer batch (L_CLS: the upper-level objective) with :func:`alpha_losses`,
estimates ``d L_outer / d alpha`` with the config's method
(:func:`dyngap_jax.hypergrad.alpha_hypergradient`; Eq. 3 with ``H^{-1} g`` from a Krylov solve for
the exact methods) and updates alpha with :meth:`dyngap_jax.alpha.LearnedAlpha.update`
(``alpha <- clip(alpha - eta * hypergradient)``). When it runs, on which batches, in which
BatchNorm mode and what it reports is :class:`dyngap_jax.methods.lfm.AlphaStep`, the part of LFM
the training loop calls.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dyngap_jax import hypergrad, losses, models
from dyngap_jax.alpha import LearnedAlpha
from dyngap_jax.methods.state import TrainState, forward

# the call-time inputs the training loop can give a hypergradient method
TRAINING_INPUTS = ("sampler", "key")
# where the solvers' iterations run (config.alpha.hypergrad.loop; "auto" resolved by resolve_loop)
LOOPS = ("device", "host")


def resolve_loop(loop: str, backend: str | None = None) -> str:
    """``config.alpha.hypergrad.loop``: ``"auto"`` is ``"host"`` on a CPU, where an HVP runs ~10x slower
    inside an XLA while loop (docs/benchmarks.md), and ``"device"`` elsewhere (no host round trip an
    iteration); ``"device"`` and ``"host"`` as they are."""
    if loop == "auto":
        return "host" if (backend or jax.default_backend()) == "cpu" else "device"
    return loop


def with_precision(precision: str):
    """Trace the decorated function under ``jax.default_matmul_precision(precision)``: every dot and
    convolution in it carries that precision, whatever the backend's default (TF32 on NVIDIA GPUs)."""

    def wrap(fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with jax.default_matmul_precision(precision):
                return fn(*args, **kwargs)

        return traced

    return wrap


def alpha_key(state: TrainState) -> jax.Array:
    """The alpha step's dropout key at ``state`` (fixed through the whole hypergradient)."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)


def alpha_losses(model, mm_loss: Callable, state: TrainState, inner, outer, train_bn=True):
    """``(cls_loss, mm_loss, outer_loss)``: the closures ``params -> loss`` of the alpha step at ``state``.

    L_CLS and L_MM on the ``inner`` batch, L_CLS on the ``outer`` batch. ``train_bn`` (True, False,
    or a traced bool): the forward pass runs in training mode (BatchNorm on the batch's statistics,
    dropout on, with the key :func:`alpha_key`) or in evaluation mode (the running averages); the
    running averages are not updated here, so the Hessian is that of one function. The
    hypergradient comparison builds its closures here too, so it measures what training applies.
    """
    rng = alpha_key(state)

    def fwd(p, b):
        if isinstance(train_bn, bool):
            return forward(model, p, state.model_state, b, rng, train_bn)[0]
        return jax.lax.cond(train_bn, lambda: forward(model, p, state.model_state, b, rng, True)[0],
                            lambda: forward(model, p, state.model_state, b, rng, False)[0])

    cls_loss = lambda p: losses.cross_entropy(fwd(p, inner)["logits"], inner["label"])
    inner_mm = lambda p: mm_loss(fwd(p, inner))
    outer_loss = lambda p: losses.cross_entropy(fwd(p, outer)["logits"], outer["label"])
    return cls_loss, inner_mm, outer_loss


def subbatch_sampler(model, mm_loss: Callable, state: TrainState, batch, size: int, train_bn=True):
    """``key -> (cls_loss, mm_loss)`` on ``size`` examples of ``batch`` drawn without replacement.

    The fresh mini-batches of the stochastic methods (Ghadimi-Wang) in training, drawn from the
    alpha step's inner batch.
    """
    n = batch["label"].shape[0]

    def sampler(key):
        idx = jax.random.permutation(key, n)[:size]
        sub = jax.tree_util.tree_map(lambda x: x[idx], batch)
        cls_loss, inner_mm, _ = alpha_losses(model, mm_loss, state, sub, sub, train_bn)
        return cls_loss, inner_mm

    return sampler


def _cast(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype`` (labels, token ids and keys kept)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _finite_or_zero(tree):
    ok = hypergrad.tree_finite(tree)
    return jax.tree_util.tree_map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), tree)


def _identity(batch):
    return batch


def make_alpha_step(*, model, mm_loss: Callable, learned: LearnedAlpha, method: hypergrad.Method,
                    require_converged: bool = False, shardings=None, precision: str = "highest",
                    warm_start: bool = False, warm_power: bool = False, reuse_lambda: bool = False, prepare: Callable | None = None, donate: bool = False,
                    hvp_remat: str = "none", batch_norm: str = "batch", loop: str = "device",
                    progress: Callable | None = None):
    """``alpha_step(state, inner_batch, outer_batch, train_bn=True) -> (state, result, applied)``: Algorithm 1's
    alpha update (see the module docstring).

    The update is skipped (and counted in ``alpha.skipped``) when the estimate is non-finite or broke
    down, and, with ``require_converged``, when the solve did not reach its tolerance.
    ``precision``: every matmul and convolution of the step (``"float64"``: the model, batches,
    parameters and solve in float64, under ``jax.enable_x64(True)``; the run's resolved precision
    decides it, ``cfg.precision``). ``warm_start``: start the solve from
    ``state.alpha_solution`` (the last solution, non-finite entries replaced by 0) and keep the new one.
    ``warm_power``: start the method's power iteration (input ``v0``) from
    ``state.method_state["power_vector"]`` and keep its last iterate there (also when the step is not
    applied: it is an estimate of the curvature's top direction either way). ``reuse_lambda``: the method's input
    ``lambda_max`` from ``state.method_state["lambda_max"]`` (0, none, runs the power iteration) and its
    ``carry["ritz_lambda_max"]`` kept there (non-finite: 0).
    ``prepare``: the run's batch preparation (frames augmented on the device), traced inside the step;
    ``shardings = (state, batch, replicated)``; ``donate``: the input state's buffers are reused.
    ``hvp_remat``: :func:`dyngap_jax.hypergrad.alpha_hypergradient`'s (``config.alpha.hypergrad.remat``).
    ``batch_norm`` (``config.alpha.batch_norm``): ``"batch"``, the closures' forward passes in training
    mode (batch statistics) with the running averages untouched; ``"running"``, in evaluation mode;
    ``"authors"``, as the authors' code: in training mode when ``train_bn`` (the caller passes it
    until the run's first evaluation) and then the running averages move once, as their
    training-mode forward on the inner batch moves them, else in evaluation mode.
    ``loop`` (``config.alpha.hypergrad.loop``, resolved): ``"device"``, the step one program, its solver
    loops XLA while loops; ``"host"``, the solvers' iterations driven from the host and every HVP one
    shared compiled program (:class:`dyngap_jax.hypergrad.loops.HostLoops`; ``progress(name,
    iteration)`` is called after each iteration).
    """
    if batch_norm not in ("batch", "running", "authors"):
        raise ValueError(f"config.alpha.batch_norm: unknown {batch_norm!r}; known: batch, running, authors")
    if loop not in LOOPS:
        raise ValueError(f"config.alpha.hypergrad.loop: unknown {loop!r}; known: {', '.join(LOOPS)}")
    float64 = precision == "float64"
    prepare = prepare or _identity
    run_model = models.with_dtype(model, jnp.float64) if float64 else model

    @with_precision("highest" if float64 else precision)
    def alpha_step(state: TrainState, inner, outer, train_bn):
        inner, outer = prepare(inner), prepare(outer)
        mode = {"batch": True, "running": False, "authors": train_bn}[batch_norm]
        work = state
        if float64:
            work = state.replace(params=_cast(state.params, jnp.float64),
                                 model_state=_cast(state.model_state, jnp.float64))
            inner, outer = _cast(inner, jnp.float64), _cast(outer, jnp.float64)
        a = work.alpha.value.astype(jnp.float64) if float64 else work.alpha.value
        cls_loss, inner_mm, outer_loss = alpha_losses(run_model, mm_loss, work, inner, outer, mode)
        inputs = {}
        if "sampler" in method.required_inputs():
            size = max(1, inner["label"].shape[0] // 2)
            inputs["sampler"] = subbatch_sampler(run_model, mm_loss, work, inner, size, mode)
        if "key" in method.required_inputs():
            inputs["key"] = jax.random.fold_in(alpha_key(state), 2)
        if warm_start:
            inputs["x0"] = _cast(_finite_or_zero(state.alpha_solution), a.dtype)
        if warm_power:
            inputs["v0"] = _cast(_finite_or_zero(state.method_state["power_vector"]), a.dtype)
        if reuse_lambda:
            inputs["lambda_max"] = state.method_state["lambda_max"].astype(a.dtype)
        # no Hessian residual: of the undamped H, which a damped system's solution is not meant to invert
        res = hypergrad.alpha_hypergradient(cls_loss, inner_mm, outer_loss, work.params, a, method, hvp_remat=hvp_remat,
                                            report_residual=False, **inputs)
        usable = res.ok if require_converged else res.info["finite"] & ~res.info["breakdown"]
        g = jnp.where(usable, res.value, jnp.nan)
        new = state.replace(alpha=learned.update(state.alpha, g))
        if batch_norm == "authors":  # their training-mode forward moved the running averages (once, on the inner batch)
            def moved():  # only run when train_bn: after the first evaluation no forward is spent on it
                after = forward(run_model, work.params, work.model_state, inner, alpha_key(state), True)[1]
                return jax.tree_util.tree_map(lambda m, old: m.astype(old.dtype), after, state.model_state)

            new = new.replace(model_state=jax.lax.cond(train_bn, moved, lambda: state.model_state))
        if warm_start:
            new = new.replace(alpha_solution=_cast(_finite_or_zero(res.solution), jnp.float32))
        if warm_power:
            vector = _cast(_finite_or_zero(res.carry["power_vector"]), jnp.float32)
            new = new.replace(method_state={**new.method_state, "power_vector": vector})
        if reuse_lambda:
            lam = res.carry["ritz_lambda_max"].astype(jnp.float32)
            new = new.replace(method_state={**new.method_state, "lambda_max": jnp.where(jnp.isfinite(lam), lam, 0.0)})
        return new, res.replace(solution=None, carry=None), usable

    donate_argnums = (0,) if donate else ()
    if loop == "host":  # traced once, split into programs; the outputs placed as the jitted step places them
        out_shardings = None if shardings is None else (shardings[0], shardings[2], shardings[2])
        return CompiledAlphaStep(hypergrad.HostLoops(alpha_step, donate_argnums=donate_argnums,
                                                     out_shardings=out_shardings, progress=progress), float64)
    if shardings is None:
        step = jax.jit(alpha_step, donate_argnums=donate_argnums)
    else:
        state_sh, batch_sh, repl = shardings
        step = jax.jit(alpha_step, in_shardings=(state_sh, batch_sh, batch_sh, repl),
                       out_shardings=(state_sh, repl, repl), donate_argnums=donate_argnums)
    return CompiledAlphaStep(step, float64)


class CompiledAlphaStep:
    """The jitted alpha step with ``train_bn`` defaulting to True (and, for a float64 step, run in x64)."""

    def __init__(self, step, x64: bool):
        self.step, self.x64 = step, x64
        functools.update_wrapper(self, step, updated=())

    def _context(self):
        return jax.enable_x64(True) if self.x64 else contextlib.nullcontext()

    def __call__(self, state, inner, outer, train_bn=True):
        with self._context():
            return self.step(state, inner, outer, jnp.asarray(train_bn, bool))

    def lower(self, state, inner, outer, train_bn=True):
        with self._context():
            return self.step.lower(state, inner, outer, jnp.asarray(train_bn, bool))


__all__ = ["CompiledAlphaStep", "LOOPS", "TRAINING_INPUTS", "alpha_key", "alpha_losses", "make_alpha_step",
           "resolve_loop", "subbatch_sampler", "with_precision"]
