"""CLIP vision and text towers (Flax Linen) with Hugging Face ``CLIPModel``'s layout."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import check_input
from dyngap_jax.models.transformer import SelfAttention, activation, attention_bias


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # vision
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # text
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    pad_token_id: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTowerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class CLIPLayer(nn.Module):
    config: CLIPTowerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + SelfAttention(c.hidden_size, c.num_attention_heads, 0.0, self.dtype, name="self_attn")(ln("layer_norm1")(x), bias)
        h = activation(c.hidden_act)(nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(ln("layer_norm2")(x)))
        return x + nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPVision(nn.Module):
    """``pixels [B, H, W, C]`` -> post-LayerNorm [CLS] feature, projected to ``projection_dim`` if set."""

    config: CLIPTowerConfig = CLIPTowerConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    projection_dim: int | None = None
    dtype: jnp.dtype = jnp.float32
    modality: str = "image"

    @property
    def input_shape(self):
        s = self.config.image_size
        return (s, s, self.config.num_channels)

    @property
    def features(self) -> int:
        return self.projection_dim or self.config.hidden_size

    @nn.compact
    def __call__(self, pixels, train: bool = False, return_hidden: bool = False):
        del train
        check_input(pixels, self.input_shape, self.modality)
        c = self.config
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(pixels.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size)), x], axis=1)
        x = x + nn.Embed(x.shape[1], c.hidden_size, dtype=self.dtype, name="position_embedding")(jnp.arange(x.shape[1]))[None]
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        for i in range(c.num_hidden_layers):
            x = CLIPLayer(c, self.dtype, name=f"layer_{i}")(x, None)
        pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])
        if self.projection_dim:
            pooled = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="projection")(pooled)
        return (pooled, x) if return_hidden else pooled


class CLIPText(nn.Module):
    """``input_ids [B, L]`` -> final-LayerNorm state at the end-of-text token, projected if ``projection_dim``.

    Causal attention plus the padding ``mask`` (default: all ones, as CLIP pads after the
    end-of-text token). Pooling follows transformers: with ``eos_token_id == 2`` (old configs) the
    position of the largest token id, else the first ``eos_token_id``.
    """

    config: CLIPTowerConfig = CLIPTowerConfig()
    projection_dim: int | None = None
    max_length: int | None = None
    dtype: jnp.dtype = jnp.float32
    modality: str = "text"

    @property
    def input_shape(self):
        return (self.max_length,)

    @property
    def features(self) -> int:
        return self.projection_dim or self.config.hidden_size

    @nn.compact
    def __call__(self, input_ids, mask=None, train: bool = False, return_hidden: bool = False):
        del train
        check_input(input_ids, self.input_shape, self.modality)
        c = self.config
        b, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(f"modality {self.modality!r}: {length} tokens > max_position_embeddings {c.max_position_embeddings}")
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding")(jnp.arange(length))[None]
        bias = attention_bias(mask, length, self.dtype)
        for i in range(c.num_hidden_layers):
            x = CLIPLayer(c, self.dtype, name=f"layer_{i}")(x, bias)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if c.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        pooled = x[jnp.arange(b), eos]
        if self.projection_dim:
            pooled = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="projection")(pooled)
        return (pooled, x) if return_hidden else pooled
