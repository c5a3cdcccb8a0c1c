"""BERT encoder (Flax Linen) with Hugging Face ``BertModel``'s layout, pooled by [CLS] or by mean."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import Dropout, check_input
from dyngap_jax.models.transformer import SelfAttention, activation, attention_bias


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"BERT: only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class BertLayer(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias, train: bool):
        c = self.config
        drop = lambda t: Dropout(c.hidden_dropout_prob, deterministic=not train)(t)
        a = SelfAttention(c.hidden_size, c.num_attention_heads, c.attention_probs_dropout_prob, self.dtype,
                          name="attention")(x, bias, train)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="attention_norm")(x + drop(a))
        h = activation(c.hidden_act)(nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate")(x))
        h = nn.Dense(c.hidden_size, dtype=self.dtype, name="output")(h)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="output_norm")(x + drop(h))


class Bert(nn.Module):
    """``input_ids [B, L]`` (int) -> features ``[B, hidden_size]``.

    ``pooling="cls"``: BertModel's pooler (dense + tanh on [CLS]); ``"mean"``: mean of the last
    hidden states over unmasked tokens (sentence-transformers). ``mask`` defaults to
    ``input_ids != pad_token_id``. ``return_hidden=True`` also returns the last hidden states.
    """

    config: BertConfig = BertConfig()
    pooling: str = "cls"
    max_length: int | None = None
    dtype: jnp.dtype = jnp.float32
    modality: str = "text"

    @property
    def input_shape(self):
        return (self.max_length,)

    @property
    def features(self) -> int:
        return self.config.hidden_size

    @nn.compact
    def __call__(self, input_ids, mask=None, token_type_ids=None, train: bool = False, return_hidden: bool = False):
        check_input(input_ids, self.input_shape, self.modality)
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"modality {self.modality!r}: BERT takes integer token ids, got dtype {input_ids.dtype}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"Bert: `pooling` must be 'cls' or 'mean', got {self.pooling!r}")
        c = self.config
        b, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"modality {self.modality!r}: {length} tokens > max_position_embeddings {c.max_position_embeddings}")
        if mask is None:
            mask = input_ids != c.pad_token_id
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = lambda rows, name: nn.Embed(rows, c.hidden_size, dtype=self.dtype, name=name)
        x = (embed(c.vocab_size, "word_embeddings")(input_ids)
             + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(length)[None])
             + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(x)
        x = Dropout(c.hidden_dropout_prob, deterministic=not train)(x)
        bias = attention_bias(mask, None, self.dtype)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, self.dtype, name=f"layer_{i}")(x, bias, train)
        pooler = nn.Dense(c.hidden_size, dtype=self.dtype, name="pooler")  # always built: checkpoints carry it
        cls_pooled = jnp.tanh(pooler(x[:, 0]))
        if self.pooling == "cls":
            pooled = cls_pooled
        else:
            m = mask.astype(x.dtype)[..., None]
            pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        return (pooled, x) if return_hidden else pooled
