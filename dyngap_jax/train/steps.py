"""The train state and the three compiled steps of Algorithm 1: train_step, eval_step, alpha_step."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dyngap_jax import hypergrad, losses
from dyngap_jax.alpha import AlphaState, LearnedAlpha

PyTree = Any


@struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree (checkpointed whole).

    ``model_state``: the non-parameter collections (``batch_stats``). ``alpha``: alpha's state; for
    the fixed strategies only ``alpha.value`` is used, set by the loop each epoch.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    alpha: AlphaState
    rng: jax.Array


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


def _forward(model, params, model_state, batch, rng, train: bool):
    variables = {"params": params, **model_state}
    if train:
        out, new_state = model.apply(variables, batch, train=True, mutable=list(model_state), rngs={"dropout": rng})
        return out, new_state
    return model.apply(variables, batch, train=False), model_state


def make_train_step(model, tx: optax.GradientTransformation, mm_loss: Callable, shardings=None):
    """``train_step(state, batch, alpha) -> (state, metrics)``: one SGD step on Eq. 1 with ``alpha`` as an argument.

    ``shardings = (state, batch, replicated)`` compiles it for a mesh with those explicit shardings.
    """

    def train_step(state: TrainState, batch, alpha):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            out, new_model_state = _forward(model, params, state.model_state, batch, rng, True)
            l_cls = losses.cross_entropy(out["logits"], batch["label"])
            l_mm = mm_loss(out)
            return losses.total(l_cls, l_mm, alpha), (l_cls, jnp.mean(l_mm), new_model_state)

        (loss, (l_cls, l_mm, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            model_state=new_model_state, opt_state=opt_state)
        metrics = {"loss": loss, "l_cls": l_cls, "l_mm": l_mm, "grad_norm": optax.global_norm(grads),
                   "finite": jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))}
        return new, metrics

    if shardings is None:
        return jax.jit(train_step)
    state_sh, batch_sh, repl = shardings
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl))


def make_eval_step(model, shardings=None):
    """``eval_step(state, batch) -> {logits, modality_logits, features}`` in evaluation mode."""

    def eval_step(state: TrainState, batch):
        out, _ = _forward(model, state.params, state.model_state, batch, None, False)
        return {"logits": out["logits"], "modality_logits": out["modality_logits"], "features": out["features"]}

    if shardings is None:
        return jax.jit(eval_step)
    state_sh, batch_sh, repl = shardings
    return jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=batch_sh)


def make_alpha_step(model, mm_loss: Callable, learned: LearnedAlpha, method: str, options: dict,
                    require_converged: bool = False, shardings=None):
    """``alpha_step(state, inner_batch, outer_batch) -> (state, hypergradient result)``: Algorithm 1's alpha update.

    L_CLS and L_MM on the inner batch define L_total's Hessian; L_CLS on the outer batch is the
    upper-level objective. The forward pass runs in training mode with the batch statistics and
    dropout key held fixed (the running averages are not updated), so the Hessian is that of one
    function. A non-finite or broken-down (CG breakdown, diverging series) hypergradient skips
    the update and is counted in ``alpha.skipped``; a solve stopped at ``maxiter`` (truncated CG,
    as iMAML uses) is applied unless ``require_converged``.
    """

    def alpha_step(state: TrainState, inner, outer):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        fwd = lambda p, b: _forward(model, p, state.model_state, b, rng, True)[0]
        cls_loss = lambda p: losses.cross_entropy(fwd(p, inner)["logits"], inner["label"])
        inner_mm = lambda p: mm_loss(fwd(p, inner))
        outer_loss = lambda p: losses.cross_entropy(fwd(p, outer)["logits"], outer["label"])
        res = hypergrad.alpha_hypergradient(cls_loss, inner_mm, outer_loss, state.params, state.alpha.value, method,
                                            **options)
        usable = res.ok if require_converged else res.info["finite"] & ~res.info["breakdown"]
        g = jnp.where(usable, res.value, jnp.nan)
        return state.replace(alpha=learned.update(state.alpha, g)), res, usable

    if shardings is None:
        return jax.jit(alpha_step)
    state_sh, batch_sh, repl = shardings
    return jax.jit(alpha_step, in_shardings=(state_sh, batch_sh, batch_sh), out_shardings=(state_sh, repl, repl))
