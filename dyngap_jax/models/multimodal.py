"""``MultimodalClassifier``: one encoder per modality and a fusion head, returning DESIGN.md's dict."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import check_input


class MultimodalClassifier(nn.Module):
    """``apply(variables, batch, train=...)`` -> ``{"features", "logits", "modality_logits"}``.

    ``batch`` holds one array per modality under its name (plus ``"label"``, ignored here, and
    an optional ``"<modality>_mask"`` for text encoders). ``modalities`` fixes the order used by
    the fusion head and by modality pairs in L_MM. ``projection_dim`` adds a linear map per
    modality to a common width (InfoNCE compares features across modalities, so encoders of
    different widths, e.g. ResNet-50's 2048 and BERT's 768, need one).
    """

    modalities: Sequence[str]
    encoders: Mapping[str, nn.Module]
    fusion: nn.Module
    projection_dim: int | None = None
    dtype: Any = jnp.float32  # the projections' computation dtype (each encoder and the fusion head have their own)

    @nn.compact
    def __call__(self, batch: Mapping[str, Any], train: bool = False):
        if set(self.modalities) != set(self.encoders) or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(
                f"MultimodalClassifier: `modalities` {list(self.modalities)} must name each encoder once "
                f"(encoders: {sorted(self.encoders)})"
            )
        features = {}
        for m in self.modalities:
            if m not in batch:
                raise ValueError(f"batch has no modality {m!r} (keys: {sorted(batch)})")
            enc = self.encoders[m]
            x = batch[m]
            check_input(x, enc.input_shape, m)
            mask_key = f"{m}_mask"
            kwargs = {"mask": batch[mask_key]} if mask_key in batch else {}
            z = enc(x, train=train, **kwargs)
            if self.projection_dim:
                z = nn.Dense(self.projection_dim, dtype=self.dtype, name=f"projection_{m}")(z)
            features[m] = z
        logits, modality_logits = self.fusion(features, train=train)
        return {"features": features, "logits": logits, "modality_logits": modality_logits}
