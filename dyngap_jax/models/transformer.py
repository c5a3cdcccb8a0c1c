"""Transformer pieces shared by BERT (post-LayerNorm) and CLIP (pre-LayerNorm)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dyngap_jax.models.common import Dropout

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def attention_bias(mask: jax.Array | None, causal_len: int | None, dtype) -> jax.Array | None:
    """Additive bias ``[B or 1, 1, L, L]`` from a padding mask ``[B, L]`` (1 = keep) and/or causality."""
    big_neg = jnp.finfo(dtype).min
    bias = None
    if mask is not None:
        bias = jnp.where(mask[:, None, None, :].astype(bool), 0.0, big_neg).astype(dtype)
    if causal_len is not None:
        causal = jnp.where(jnp.tril(jnp.ones((causal_len, causal_len), bool)), 0.0, big_neg).astype(dtype)[None, None]
        bias = causal if bias is None else jnp.maximum(bias + causal, big_neg)
    return bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (biases on), as BERT and CLIP have."""

    hidden_size: int
    num_heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias=None, train: bool = False):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        head_dim = self.hidden_size // self.num_heads
        split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, head_dim))
        q = split(nn.Dense(self.hidden_size, dtype=self.dtype, name="query")(x))
        k = split(nn.Dense(self.hidden_size, dtype=self.dtype, name="key")(x))
        v = split(nn.Dense(self.hidden_size, dtype=self.dtype, name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
        if bias is not None:
            scores = scores + bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = Dropout(self.dropout, deterministic=not train)(probs)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape[:2] + (self.hidden_size,))
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="out")(out)
