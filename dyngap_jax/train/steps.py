"""The compiled train and evaluation steps: the training method's step and its fusion, jitted on the run's mesh.

The train step is the method's (:meth:`dyngap_jax.methods.Method.step`; LFM's: one optimiser step
on Eq. 1 at ``state.alpha.value``); LFM's alpha step is compiled by its part
(:mod:`dyngap_jax.methods.alpha_step`). Every step takes the loader's batches and prepares them on
the device (frames cropped, resized, flipped and normalised: :mod:`dyngap_jax.data.augment`); the
train step can donate the state's buffers to its output.
"""
from __future__ import annotations

from typing import Callable

import jax

from dyngap_jax.methods import Method, StepContext, TrainState, forward
from dyngap_jax.methods.alpha_step import with_precision


def _identity(batch):
    return batch


def make_train_step(*, model, tx, method: Method, shardings=None, precision: str = "default",
                    prepare: Callable | None = None, donate: bool = False):
    """``train_step(state, batch) -> (state, metrics)``: the method's step (LFM: one optimiser step on Eq. 1).

    ``batch`` is a loader batch: ``prepare`` (the run's) turns it into the model's inputs inside the
    step. ``shardings = (state, batch, replicated)`` compiles it for a mesh with those explicit
    shardings. ``precision`` (the run's resolved matmul precision) is every matmul's and
    convolution's. ``donate``: the input state's buffers are reused for the output (the caller must
    not touch the state it passed in again). The metrics stay on the device: ``finite`` (loss and
    gradients) and ``params_finite`` (parameters and batch statistics after the update) say whether
    the step is usable; the loop fetches them at log intervals, not every step.
    """
    prepare = prepare or _identity
    modalities = tuple(method.cfg.model.modalities)

    @with_precision(precision)
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        ctx = StepContext(model=model, state=state, inputs=prepare(batch), rng=rng, modalities=modalities, tx=tx)
        return method.step(ctx)

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    state_sh, batch_sh, repl = shardings
    return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                   donate_argnums=donate_argnums)


def make_eval_step(*, model, method: Method | None = None, shardings=None, precision: str = "default",
                   prepare: Callable | None = None):
    """``eval_step(state, batch) -> {logits, modality_logits, features}`` in evaluation mode: the fused logits
    as the method fuses them (default: the model's fusion head); ``prepare`` as in :func:`make_train_step`."""
    prepare = prepare or _identity

    @with_precision(precision)
    def eval_step(state: TrainState, batch):
        out, _ = forward(model, state.params, state.model_state, prepare(batch), None, False)
        logits = out["logits"] if method is None else method.fuse(out, state.method_state)
        return {"logits": logits, "modality_logits": out["modality_logits"], "features": out["features"]}

    if shardings is None:
        return jax.jit(eval_step)
    state_sh, batch_sh, repl = shardings
    return jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=batch_sh)


__all__ = ["TrainState", "forward", "make_eval_step", "make_train_step", "with_precision"]
