"""The train state and the model's forward pass: what every method's step reads and changes."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    """Everything a step changes, as one pytree (checkpointed whole, sharded leaf by leaf).

    ``model_state``: the non-parameter collections (``batch_stats``). ``alpha``: the weight of L_MM
    in Eq. 1 and, for LFM's learned strategy, its optimiser state (a method that does not weigh
    L_MM leaves it at 0); ``alpha_solution``: the last alpha step's ``v ~ H^{-1} grad L_outer``
    (the structure of ``params``), which warm-starts the next solve, or None. Both are LFM's and
    stay fields of their own so that checkpoints written before the method interface restore.
    ``method_state``: a training method's own state (``Method.init_state``; None for LFM).
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    alpha: Any
    rng: jax.Array
    alpha_solution: PyTree = None
    method_state: PyTree = None


def at_least_float32(tree):
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
        return at_least_float32(out), new_state
    return at_least_float32(model.apply(variables, batch, train=False)), model_state


__all__ = ["TrainState", "at_least_float32", "forward"]
