"""The train state and the three compiled steps of Algorithm 1: train_step, eval_step, alpha_step.

:func:`make_alpha_step` is **Algorithm 1's alpha step**: it forms the hypergradient from the inner
batch (L_CLS and L_MM: the Hessian of L_total) and the outer batch (L_CLS: the upper-level
objective) with :func:`alpha_losses`, estimates ``d L_outer / d alpha`` with the config's method
(:func:`dyngap_jax.hypergrad.alpha_hypergradient`; Eq. 3 with ``H^{-1} g`` from a Krylov solve for
the exact methods) and updates alpha with :meth:`dyngap_jax.alpha.LearnedAlpha.update`
(``alpha <- clip(alpha - eta * hypergradient)``). The loop runs it every ``config.alpha.inner_iters``
train steps (0: once per epoch, after the epoch's last step).

Every step takes the loader's batches and prepares them on the device (frames cropped, resized,
flipped and normalised: :mod:`dyngap_jax.data.augment`); the train and alpha steps can donate the
state's buffers to their output.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dyngap_jax import hypergrad, losses, models
from dyngap_jax.alpha import AlphaState, LearnedAlpha

PyTree = Any


@struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree (checkpointed whole).

    ``model_state``: the non-parameter collections (``batch_stats``). ``alpha``: alpha's state; for
    the fixed strategies only ``alpha.value`` is used, set by the loop each epoch.
    ``alpha_solution``: the last alpha step's ``v ~ H^{-1} grad L_outer`` (the structure of
    ``params``), which warm-starts the next solve; None when nothing is warm-started.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    alpha: AlphaState
    rng: jax.Array
    alpha_solution: PyTree = None


def mm_loss_fn(kind: str, modalities: Sequence[str], temperature: float, per_pair: bool) -> Callable:
    """L_MM from the model's output dict: InfoNCE between features (the paper) or the authors' JS alignment."""
    if kind == "infonce":
        return lambda out: losses.modality_matching([out["features"][m] for m in modalities], temperature,
                                                    reduce=not per_pair)
    if kind == "js":
        return lambda out: losses.js_alignment([out["modality_logits"][m] for m in modalities], reduce=not per_pair)
    if kind == "none":
        zero = jnp.zeros((losses.num_pairs(len(modalities)),)) if per_pair else jnp.zeros(())
        return lambda out: zero
    raise ValueError(f"config.loss.mm: unknown modality-matching loss {kind!r}; known: infonce, js, none")


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


def _at_least_float32(tree):
    """Half-precision outputs (a bfloat16 model's) as float32, so that losses and metrics are float32."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32 else x,
        tree)


def forward(model, params, model_state, batch, rng, train: bool):
    """``(outputs, new_model_state)``; in training mode BatchNorm uses and updates batch statistics.

    Outputs of a half-precision model (``config.train.compute_dtype``) come back as float32.
    """
    variables = {"params": params, **model_state}
    if train:
        out, new_state = model.apply(variables, batch, train=True, mutable=list(model_state), rngs={"dropout": rng})
        return _at_least_float32(out), new_state
    return _at_least_float32(model.apply(variables, batch, train=False)), model_state


def _identity(batch):
    return batch


def make_train_step(model, tx: optax.GradientTransformation, mm_loss: Callable, shardings=None,
                    precision: str = "default", prepare: Callable | None = None, donate: bool = False,
                    loss_scale: float = 1.0):
    """``train_step(state, batch) -> (state, metrics)``: one optimiser step on Eq. 1 at ``state.alpha.value``.

    ``batch`` is a loader batch: ``prepare`` (:func:`dyngap_jax.data.augment.make_prepare`, the run's)
    turns it into the model's inputs inside the step (frames cropped, resized, flipped and
    normalised on the device). ``shardings = (state, batch, replicated)`` compiles it for a mesh
    with those explicit shardings. ``precision`` (``config.train.matmul_precision``) is every
    matmul's and convolution's. ``donate``: the input state's buffers are reused for the output
    (the caller must not touch the state it passed in again). ``loss_scale`` multiplies the
    loss the step descends (the authors' code trains on ``2 L_total``); the metrics report
    L_total itself. The metrics stay on the device: ``finite`` (loss and gradients) and
    ``params_finite`` (parameters and batch statistics after the update) say whether the step
    is usable; the loop fetches them at log intervals, not every step.
    """
    prepare = prepare or _identity

    @with_precision(precision)
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        inputs = prepare(batch)
        alpha = state.alpha.value

        def loss_fn(params):
            out, new_model_state = forward(model, params, state.model_state, inputs, rng, True)
            l_cls = losses.cross_entropy(out["logits"], inputs["label"])
            l_mm = mm_loss(out)
            loss = losses.total(l_cls, l_mm, alpha)
            return loss_scale * loss, (loss, l_cls, jnp.mean(l_mm), new_model_state)

        (_, (loss, l_cls, l_mm, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            model_state=new_model_state, opt_state=opt_state)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "l_cls": l_cls, "l_mm": l_mm, "grad_norm": grad_norm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
                   # a finite loss and gradient can still step to non-finite parameters (an overflowing update)
                   "params_finite": hypergrad.tree_finite((new.params, new.model_state))}
        return new, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    state_sh, batch_sh, repl = shardings
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                   donate_argnums=donate_argnums)


def make_eval_step(model, shardings=None, precision: str = "default", prepare: Callable | None = None):
    """``eval_step(state, batch) -> {logits, modality_logits, features}`` in evaluation mode (``prepare``
    as in :func:`make_train_step`: evaluation's resize runs on the device)."""
    prepare = prepare or _identity

    @with_precision(precision)
    def eval_step(state: TrainState, batch):
        out, _ = forward(model, state.params, state.model_state, prepare(batch), None, False)
        return {"logits": out["logits"], "modality_logits": out["modality_logits"], "features": out["features"]}

    if shardings is None:
        return jax.jit(eval_step)
    state_sh, batch_sh, repl = shardings
    return jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=batch_sh)


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


def make_alpha_step(model, mm_loss: Callable, learned: LearnedAlpha, method: hypergrad.Method,
                    require_converged: bool = False, shardings=None, precision: str = "highest",
                    warm_start: bool = False, prepare: Callable | None = None, donate: bool = False,
                    hvp_remat: str = "none", batch_norm: str = "batch"):
    """``alpha_step(state, inner_batch, outer_batch, train_bn=True) -> (state, result, applied)``: Algorithm 1's
    alpha update.

    Forms the hypergradient from the inner batch (L_CLS and L_MM, whose L_total's Hessian H is) and
    the outer batch (L_CLS, the upper-level objective) with :func:`alpha_losses`, estimates
    ``d L_outer / d alpha`` with ``method`` (a validated :class:`~dyngap_jax.hypergrad.Method`; for the
    exact ones Eq. 3 with ``v = H^{-1} grad L_outer`` from a Krylov solve on HVPs), and applies
    ``alpha <- clip(alpha - eta * hypergradient)`` (:meth:`LearnedAlpha.update`). The loop calls it
    every ``config.alpha.inner_iters`` train steps (0: once per epoch).

    The update is skipped (and counted in ``alpha.skipped``) when the estimate is non-finite or broke
    down, and, with ``require_converged``, when the solve did not reach its tolerance.
    ``precision``: every matmul and convolution of the step (``"float64"``: the model, batches,
    parameters and solve in float64; call the step under ``jax.enable_x64(True)``, as
    :class:`~dyngap_jax.train.setup.Run` does). ``warm_start``: start the solve from
    ``state.alpha_solution`` (the last solution, non-finite entries replaced by 0) and keep the new one.
    ``prepare`` and ``donate`` as in :func:`make_train_step`: the batches are loader batches.
    ``hvp_remat``: :func:`dyngap_jax.hypergrad.alpha_hypergradient`'s (``config.alpha.hypergrad.remat``).
    ``batch_norm`` (``config.alpha.batch_norm``): ``"batch"``, the closures' forward passes in training
    mode (batch statistics) with the running averages untouched; ``"running"``, in evaluation mode;
    ``"authors"``, as the authors' code: in training mode when ``train_bn`` (the loop passes it
    until the run's first evaluation) and then the running averages move once, as their
    training-mode forward on the inner batch moves them, else in evaluation mode.
    """
    if batch_norm not in ("batch", "running", "authors"):
        raise ValueError(f"config.alpha.batch_norm: unknown {batch_norm!r}; known: batch, running, authors")
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
        res = hypergrad.alpha_hypergradient(cls_loss, inner_mm, outer_loss, work.params, a, method, hvp_remat=hvp_remat,
                                            **inputs)
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
        return new, res.replace(solution=None), usable

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        step = jax.jit(alpha_step, donate_argnums=donate_argnums)
    else:
        state_sh, batch_sh, repl = shardings
        step = jax.jit(alpha_step, in_shardings=(state_sh, batch_sh, batch_sh, repl),
                       out_shardings=(state_sh, repl, repl), donate_argnums=donate_argnums)
    return _AlphaStep(step, float64)


class _AlphaStep:
    """The jitted alpha step with ``train_bn`` defaulting to True (and, for a float64 step, run in x64)."""

    def __init__(self, step, x64: bool):
        self.step, self.x64 = step, x64
        functools.update_wrapper(self, step)

    def _context(self):
        return jax.enable_x64(True) if self.x64 else contextlib.nullcontext()

    def __call__(self, state, inner, outer, train_bn=True):
        with self._context():
            return self.step(state, inner, outer, jnp.asarray(train_bn, bool))

    def lower(self, state, inner, outer, train_bn=True):
        with self._context():
            return self.step.lower(state, inner, outer, jnp.asarray(train_bn, bool))


# the call-time inputs the training loop can give a method
TRAINING_INPUTS = ("sampler", "key")
