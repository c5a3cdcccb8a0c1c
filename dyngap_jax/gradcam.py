"""Grad-CAM (Selvaraju et al., 2017) for the image and video encoders: the paper's Figure 4.

The heat map of a class score over an input's frames: with ``A`` the last ResNet feature map of
the chosen modality (``[h, w, channels]`` per image or frame) and ``y`` the class score (the fused
logit, or that modality's own logit), ``cam = ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean
of ``dy / dA_k``; upsampled to the input size and scaled to [0, 1] per image or frame.

``dy / dA`` comes from Flax's perturbation variables (``ResNet`` marks its last feature map), so
the gradient is exact and taken in one reverse pass through the whole multimodal model.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def _find(tree, modality: str, what: str):
    """The one ``feature_map`` leaf of ``modality``'s encoder in a collection."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        if f"encoders_{modality}" in keys and "feature_map" in keys:
            found.append(leaf)
    if len(found) != 1:
        raise ValueError(f"grad_cam: modality {modality!r} has {len(found)} marked feature maps in {what}; "
                         "Grad-CAM needs a ResNet (image) or video ResNet encoder")
    return found[0]


def grad_cam(model, variables: Mapping, batch: Mapping, modality: str, target="predicted", head: str = "fused",
             upsample: bool = True) -> jax.Array:
    """Heat maps of ``modality`` for each example: ``[B, H, W]`` (image) or ``[B, T, H, W]`` (video), in [0, 1].

    Args:
      model: a ``MultimodalClassifier`` whose ``modality`` encoder is a ResNet or a video ResNet.
      variables: ``{"params": ..., "batch_stats": ...}`` (evaluation mode is used).
      batch: the model's input batch.
      target: ``"predicted"`` (the head's argmax), ``"label"`` (``batch["label"]``), an int, or
        an int array ``[B]``: the class whose score is explained.
      head: ``"fused"`` (the fused logits) or ``"modality"`` (that modality's own logits).
      upsample: bilinear to the input's spatial size (False: the feature map's ``h x w``).
    """
    if head not in ("fused", "modality"):
        raise ValueError(f"grad_cam: `head` must be 'fused' or 'modality', got {head!r}")
    if modality not in batch:
        raise ValueError(f"grad_cam: the batch has no modality {modality!r} (keys: {sorted(batch)})")
    variables = {k: v for k, v in variables.items() if k not in ("perturbations", "intermediates")}
    out, aux = model.apply(variables, batch, train=False, mutable=["perturbations", "intermediates"])
    fmap = _find(aux.get("intermediates", {}), modality, "intermediates")
    fmap = fmap[0] if isinstance(fmap, tuple) else fmap

    def pick(out):
        return out["logits"] if head == "fused" else out["modality_logits"][modality]

    logits = pick(out)  # the perturbations are zeros: these are the model's logits
    n = logits.shape[0]
    if isinstance(target, str):
        if target == "predicted":
            cls = jnp.argmax(logits, -1)
        elif target == "label":
            if "label" not in batch:
                raise ValueError("grad_cam: target='label' needs batch['label']")
            cls = jnp.asarray(batch["label"])
        else:
            raise ValueError(f"grad_cam: `target` must be 'predicted', 'label' or class indices, got {target!r}")
    else:
        cls = jnp.broadcast_to(jnp.asarray(target, jnp.int32), (n,))
    if jnp.any((cls < 0) | (cls >= logits.shape[-1])):
        raise ValueError(f"grad_cam: class indices must lie in [0, {logits.shape[-1]}), got {np.asarray(cls)}")

    def score(perturbations):
        out = model.apply({**variables, "perturbations": perturbations}, batch, train=False)
        return jnp.sum(pick(out)[jnp.arange(n), cls])

    grads = _find(jax.grad(score)(aux["perturbations"]), modality, "perturbations")
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # [N, 1, 1, C]
    cam = jax.nn.relu(jnp.sum(weights * fmap, axis=-1))  # [N, h, w]
    x = batch[modality]
    frames = x.ndim == 5  # [B, T, H, W, C]
    if frames:
        cam = cam.reshape((x.shape[0], x.shape[1]) + cam.shape[1:])
    if upsample:
        cam = jax.image.resize(cam, cam.shape[:-2] + tuple(x.shape[-3:-1]), "bilinear")
        cam = jax.nn.relu(cam)
    peak = jnp.max(cam, axis=(-2, -1), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


def overlay(image: np.ndarray, cam: np.ndarray, strength: float = 0.5) -> np.ndarray:
    """An RGB ``[H, W, 3]`` float image in [0, 1]: ``image`` (any channels, min-max scaled) under a jet heat map."""
    import matplotlib

    img = np.asarray(image, np.float64)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    elif img.shape[-1] == 2:  # optical flow: show the magnitude
        img = np.repeat(np.linalg.norm(img, axis=-1, keepdims=True), 3, -1)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    heat = matplotlib.colormaps["jet"](np.clip(np.asarray(cam), 0, 1))[..., :3]
    return (1 - strength) * img + strength * heat
