"""Shared pieces of the encoders: input checks, a dtype-independent Dropout, PyTorch's BatchNorm, ``with_dtype``."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def check_input(x, expected: Sequence[int | None], modality: str) -> None:
    """Raise a ValueError naming ``modality`` unless ``x`` is ``[batch, *expected]`` (None: any size)."""
    shape = tuple(x.shape)
    want = "[batch, " + ", ".join("*" if d is None else str(d) for d in expected) + "]"
    if len(shape) != len(expected) + 1 or any(e is not None and s != e for s, e in zip(shape[1:], expected)):
        raise ValueError(f"modality {modality!r}: expected input of shape {want}, got {list(shape)}")


class Dropout(nn.Dropout):
    """Flax's ``Dropout`` with the mask drawn at float32 whatever the computation dtype.

    ``jax.random.bernoulli`` with a Python-float probability draws float64 uniforms when x64 is
    on, so flax's own layer gives another mask (18 % of entries differ at rate 0.1) to a float64 run
    of the same key: a float64 reference would then differentiate another function than the float32
    step it checks. Here the mask depends on the key alone; in float32 it is flax's mask bit for bit.
    """

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        rng = self.make_rng(self.rng_collection) if rng is None else rng
        shape = list(inputs.shape)
        for dim in self.broadcast_dims:
            shape[dim] = 1
        # jax.random.bernoulli at float32 is `uniform < p` with uniform = (bits >> 9) * 2^-23: the same test in
        # integers, so no float32 value enters a float64 computation
        bits = jax.random.bits(rng, tuple(shape), jnp.uint32)
        threshold = math.ceil(float(np.float32(keep_prob)) * 2**23)
        mask = jnp.broadcast_to(jax.lax.shift_right_logical(bits, jnp.uint32(9)) < jnp.uint32(threshold), inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, as PyTorch's ``BatchNorm{1,2,3}d`` computes it.

    In training mode the batch's mean and biased variance normalise, and the running averages move
    by ``1 - momentum`` towards the batch's mean and its **unbiased** variance (``n / (n - 1)``
    times the biased one, ``n`` the values per channel), as PyTorch's do; flax's ``BatchNorm``
    averages the biased variance, so a model trained with it evaluates (and, in the authors'
    recipe, takes alpha steps) on other statistics than the PyTorch model it reproduces.
    ``momentum`` is flax's convention, the weight of the old average (PyTorch's 0.1 is 0.9 here).
    Statistics are computed in float32 at least (a bfloat16 model's too). The variables are
    flax's: ``params`` ``scale``, ``bias``; ``batch_stats`` ``mean``, ``var``. While initialising,
    the averages are not moved (as flax's).
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if use_running:
            mean, var = ra_mean.value.astype(stat_dtype), ra_var.value.astype(stat_dtype)
        else:
            axes = tuple(range(x.ndim - 1))
            xs = x.astype(stat_dtype)
            mean = jnp.mean(xs, axis=axes)
            var = jnp.mean(jnp.square(xs - mean), axis=axes)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / (n - 1)) if n > 1 else var
                m = self.momentum
                ra_mean.value = (m * ra_mean.value + (1 - m) * mean).astype(ra_mean.value.dtype)
                ra_var.value = (m * ra_var.value + (1 - m) * unbiased).astype(ra_var.value.dtype)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(stat_dtype)
        y = (x.astype(stat_dtype) - mean) * inv + bias.astype(stat_dtype)
        return y.astype(self.dtype)


def with_dtype(module, dtype):
    """A copy of an (unbound) Flax module tree with every ``dtype`` field set to ``dtype``.

    Walks the module's dataclass fields: sub-modules, and dicts / lists / tuples of them (a
    ``MultimodalClassifier``'s encoders, a video encoder's backbone). Used to run a model in
    float64 for a reference computation; the parameters must be cast by the caller.
    """
    import dataclasses

    import flax.linen as nn

    def convert(value):
        if isinstance(value, nn.Module):
            return with_dtype(value, dtype)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and any(isinstance(v, nn.Module) for v in value):
            return type(value)(convert(v) for v in value)
        return value

    changes = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if f.name == "dtype":
            changes["dtype"] = dtype
        else:
            new = convert(value)
            if new is not value:
                changes[f.name] = new
    return module.clone(**changes)
