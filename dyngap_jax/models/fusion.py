"""Fusion heads for any number of modalities: fused logits and each modality's own logits.

Each head maps ``features: {modality: [B, d_j]}`` (in ``modalities`` order) to
``(logits [B, C], {modality: [B, C]})``. Per-modality logits follow the field's conventions:

* ``concat``: one linear layer on the concatenation; modality ``j``'s logits use its block of
  the weight matrix and ``bias / m``, so they sum exactly to the fused logits (OGM-GE, PMR, ...);
  with ``unimodal_heads``, a linear head of its own instead (``head_<m>``: MMPareto's three heads).
* ``sum`` (the authors' code): a linear head per modality; fused = their mean (``reduce="mean"``,
  the authors' ``0.5 o_a + 0.5 o_v``) or sum.
* ``shared`` (MLA): one linear head applied to each modality's features alone; fused = the mean.
* ``weighted`` ("Weight" in Table 1): per-modality heads mixed by learned softmax weights.
* ``film`` (FiLM / affine): the other modalities give a scale and shift for the target
  modality's features before the linear layer.
* ``gated``: gated multimodal unit, per-modality ``tanh`` projections mixed by softmax gates.

``film`` and ``gated`` do not separate by modality; their per-modality logits are the head's
output with every other modality's features set to zero (the other convention in the field).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


def _ordered(features: dict, modalities: Sequence[str]) -> list:
    missing = [m for m in modalities if m not in features]
    if missing:
        raise ValueError(f"fusion: features for modalities {missing} are missing (have {sorted(features)})")
    return [features[m] for m in modalities]


class ConcatFusion(nn.Module):
    num_classes: int
    modalities: Sequence[str]
    unimodal_heads: bool = False
    dtype: Any = jnp.float32  # the computation's (parameters stay float32)

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        zs = [z.astype(self.dtype) for z in _ordered(features, self.modalities)]
        dims = [z.shape[-1] for z in zs]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (sum(dims), self.num_classes)).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,)).astype(self.dtype)
        logits = jnp.concatenate(zs, axis=-1) @ kernel + bias
        if self.unimodal_heads:
            return logits, {m: nn.Dense(self.num_classes, dtype=self.dtype, name=f"head_{m}")(z)
                            for m, z in zip(self.modalities, zs)}
        per, start = {}, 0
        for m, z, d in zip(self.modalities, zs, dims):
            per[m] = z @ kernel[start:start + d] + bias / len(zs)
            start += d
        return logits, per


class SumFusion(nn.Module):
    num_classes: int
    modalities: Sequence[str]
    reduce: str = "mean"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        if self.reduce not in ("mean", "sum"):
            raise ValueError(f"SumFusion: `reduce` must be 'mean' or 'sum', got {self.reduce!r}")
        zs = _ordered(features, self.modalities)
        per = {m: nn.Dense(self.num_classes, dtype=self.dtype, name=f"head_{m}")(z) for m, z in zip(self.modalities, zs)}
        stacked = jnp.stack(list(per.values()))
        return (jnp.mean(stacked, 0) if self.reduce == "mean" else jnp.sum(stacked, 0)), per


class WeightedFusion(nn.Module):
    num_classes: int
    modalities: Sequence[str]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        zs = _ordered(features, self.modalities)
        per = {m: nn.Dense(self.num_classes, dtype=self.dtype, name=f"head_{m}")(z) for m, z in zip(self.modalities, zs)}
        w = nn.softmax(self.param("modality_weights", nn.initializers.zeros, (len(zs),))).astype(self.dtype)
        return jnp.einsum("m,mbc->bc", w, jnp.stack(list(per.values()))), per


def _zero_others(fuse, zs: list, modalities: Sequence[str]):
    """Fused logits and, for heads that do not separate by modality, each modality's logits with the others zeroed."""
    per = {m: fuse([z if i == j else jnp.zeros_like(z) for i, z in enumerate(zs)]) for j, m in enumerate(modalities)}
    return fuse(zs), per


class FiLMFusion(nn.Module):
    num_classes: int
    modalities: Sequence[str]
    target: str | None = None  # the modulated modality; default the first
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        target = self.target or self.modalities[0]
        if target not in self.modalities:
            raise ValueError(f"FiLMFusion: `target` {target!r} is not one of {list(self.modalities)}")
        t = list(self.modalities).index(target)
        zs = _ordered(features, self.modalities)
        film = nn.Dense(2 * zs[t].shape[-1], dtype=self.dtype, name="film")
        out = nn.Dense(self.num_classes, dtype=self.dtype, name="out")

        def fuse(zs):
            cond = jnp.concatenate([z for i, z in enumerate(zs) if i != t], axis=-1)
            gamma, beta = jnp.split(film(cond), 2, axis=-1)
            return out(gamma * zs[t] + beta)

        return _zero_others(fuse, zs, self.modalities)


class GatedFusion(nn.Module):
    num_classes: int
    modalities: Sequence[str]
    hidden: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        zs = _ordered(features, self.modalities)
        proj = [nn.Dense(self.hidden, dtype=self.dtype, name=f"proj_{m}") for m in self.modalities]
        gate = nn.Dense(len(self.modalities), dtype=self.dtype, name="gate")
        out = nn.Dense(self.num_classes, dtype=self.dtype, name="out")

        def fuse(zs):
            h = jnp.stack([jnp.tanh(p(z)) for p, z in zip(proj, zs)], axis=1)  # [B, m, hidden]
            g = nn.softmax(gate(jnp.concatenate(zs, axis=-1)), axis=-1)  # [B, m]
            return out(jnp.einsum("bm,bmh->bh", g, h))

        return _zero_others(fuse, zs, self.modalities)


class SharedFusion(nn.Module):
    """One linear head that every modality's features go through alone (MLA's shared head): modality ``m``'s logits
    are the head on its features, the fused logits their mean. The features must have one width."""

    num_classes: int
    modalities: Sequence[str]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict, train: bool = False):
        zs = _ordered(features, self.modalities)
        widths = {m: z.shape[-1] for m, z in zip(self.modalities, zs)}
        if len(set(widths.values())) != 1:
            raise ValueError(f"config.model.fusion: the 'shared' head takes every modality's features, which need one "
                             f"width; got {widths} (config.model.projection_dim sets one)")
        head = nn.Dense(self.num_classes, dtype=self.dtype, name="head")
        per = {m: head(z) for m, z in zip(self.modalities, zs)}
        return jnp.mean(jnp.stack(list(per.values())), 0), per


FUSIONS = {
    "concat": ConcatFusion,
    "shared": SharedFusion,
    "sum": SumFusion,
    "weighted": WeightedFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}
