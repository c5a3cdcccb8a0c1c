"""Video encoders: a 2D backbone on each of T frames, features pooled over time.

This is what the field's CREMA-D / Kinetics-Sounds code does (OGM-GE, PMR, MLA: a ResNet18 on
each frame, then pooling over time and space), and what NVGesture's RGB, depth and optical-flow
streams use here. ``temporal="mean"`` / ``"max"`` are invariant to frame order;
``"attention"`` adds learned time-position embeddings and attention pooling, so it is not.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import check_input
from dyngap_jax.models.resnet import ResNet

TEMPORAL_POOLING = ("mean", "max", "attention")


class VideoEncoder(nn.Module):
    """``x [B, T, H, W, C]`` -> ``[B, D]``; the backbone sees ``[B*T, H, W, C]``."""

    backbone: ResNet
    num_frames: int | None = None
    temporal: str = "mean"
    modality: str = "video"

    @property
    def input_shape(self):
        return (self.num_frames, None, None, self.backbone.num_channels)

    @property
    def features(self) -> int:
        return self.backbone.features

    @nn.compact
    def __call__(self, x, train: bool = False, return_map: bool = False):
        check_input(x, self.input_shape, self.modality)
        if self.temporal not in TEMPORAL_POOLING:
            raise ValueError(f"VideoEncoder: `temporal` must be one of {TEMPORAL_POOLING}, got {self.temporal!r}")
        b, t = x.shape[:2]
        pooled, fmap = self.backbone(x.reshape((b * t,) + x.shape[2:]), train=train, return_map=True)
        per_frame = pooled.reshape(b, t, -1)
        if self.temporal == "mean":
            out = jnp.mean(per_frame, axis=1)
        elif self.temporal == "max":
            out = jnp.max(per_frame, axis=1)
        else:
            if self.num_frames is None:
                raise ValueError("VideoEncoder: temporal='attention' needs `num_frames` (its time embeddings)")
            pos = self.param("time_embedding", nn.initializers.normal(0.02), (self.num_frames, per_frame.shape[-1]))
            h = per_frame + pos[None]
            scores = nn.Dense(1, name="attention_score")(jnp.tanh(h))[..., 0]
            out = jnp.einsum("bt,btd->bd", nn.softmax(scores, axis=1), h)
        if return_map:
            return out, fmap.reshape((b, t) + fmap.shape[1:])
        return out
