"""MLP encoder for tabular / pre-extracted feature views (e.g. mfeat's six views)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import BatchNorm, Dropout, check_input

NORMS = ("layer", "batch", "none")


class MLPEncoder(nn.Module):
    """``x [B, in_features]`` -> ``[B, features]``: Dense-norm-ReLU-Dropout blocks, then a Dense.

    ``norm``: ``"layer"`` (LayerNorm, the default), ``"batch"`` (BatchNorm as PyTorch's
    ``BatchNorm1d``: batch statistics in training, running averages in evaluation) or ``"none"``.
    """

    hidden: Sequence[int] = (256,)
    out_features: int = 128
    in_features: int | None = None
    dropout: float = 0.0
    norm: str = "layer"
    dtype: jnp.dtype = jnp.float32
    modality: str = "tabular"

    @property
    def input_shape(self):
        return (self.in_features,)

    @property
    def features(self) -> int:
        return self.out_features

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.input_shape, self.modality)
        if self.norm not in NORMS:
            raise ValueError(f"model.encoders.{self.modality}.norm: unknown {self.norm!r}; known: {', '.join(NORMS)}")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x)
            if self.norm == "layer":
                x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
            elif self.norm == "batch":
                x = BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.relu(x)
            x = Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.out_features, dtype=self.dtype, name="out")(x)
