"""Frame augmentation on the device: crop, resize, flip and normalisation inside the jitted steps.

The loaders hand over frames as they are stored (uint8 ``[B, T, H, W, C]`` clips or ``[B, H, W, C]``
images) and, for training, each example's crop box and flip (``<modality>_box``: int32
``[B, 4]`` = top, left, height, width in stored pixels; ``<modality>_flip``: bool ``[B]``), drawn on
the host by :func:`sample_crop` as torchvision's ``RandomResizedCrop`` draws them. :func:`prepare`
turns such a batch into the model's float inputs on the device: the box is resized to the
configured size with PIL's bilinear filter (antialiased when it shrinks: a triangle kernel
stretched by the scale, the pixels outside the box left out, weights renormalised), as a few
weighted gathers per axis; flipped; scaled to [0, 1] (uint8) and ImageNet-normalised
(3 channels, when asked). Without a box (evaluation) the whole frame is resized. This is the
computation the host path (:func:`dyngap_jax.data.loader.host_crop_resize`, PIL) did example by
example; the two agree to PIL's 8-bit rounding (tests/test_augment.py).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)

BOX, FLIP = "_box", "_flip"


@dataclasses.dataclass(frozen=True)
class FrameAugment:
    """Frames settings for one modality: output size, ImageNet normalisation, training augmentation."""

    size: tuple[int, int] | None = None  # (height, width); None keeps the stored size
    normalize: bool = True
    select: tuple[int, ...] | None = None  # which of a clip's stored frames to keep (None: all), on the host
    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def sample_crop(rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params`` draws it.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; if none
    fits, the central crop with the aspect ratio clamped to ``ratio`` (torchvision's fallback).
    """
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_taps(start, length, in_size: int, out_size: int) -> tuple[jax.Array, jax.Array]:
    """PIL's bilinear resize of pixels ``[start, start + length)`` to ``out_size``, as taps per output pixel.

    Output pixel ``o`` is centred at ``start + (o + 0.5) * length / out_size`` in input pixels; the
    triangle kernel is stretched by ``s = max(length / out_size, 1)`` (antialiasing when shrinking),
    pixels outside the window get no weight, and each output's weights are normalised to sum to 1.
    The kernel covers fewer than ``2 s + 1`` pixels, so each output reads ``K = ceil(2 in_size /
    out_size) + 1`` (static) of them: returns ``(index, weight)``, both ``[..., out_size, K]``.
    ``start`` and ``length`` may be traced arrays of any batch shape.
    """
    taps = int(np.ceil(2 * max(in_size / out_size, 1.0))) + 1
    start = jnp.asarray(start, jnp.float32)[..., None, None]
    length = jnp.asarray(length, jnp.float32)[..., None, None]
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    center = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale  # [..., out, 1]
    index = jnp.floor(center - support) + jnp.arange(taps, dtype=jnp.float32)  # [..., out, K]
    w = jnp.maximum(0.0, 1.0 - jnp.abs(index + 0.5 - center) / support)
    w = jnp.where((index >= start) & (index < start + length), w, 0.0)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.clip(index, 0, in_size - 1).astype(jnp.int32), w


def _resample(x, index, weight, axis: int):
    """``out[..., o, ...] = sum_k weight[o, k] x[..., index[o, k], ...]`` along ``axis`` of one example's frames."""
    out = 0.0
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    for k in range(index.shape[1]):  # a handful of taps: gathers, no [out, in] matrix product
        out = out + jnp.take(x, index[:, k], axis=axis) * weight[:, k].reshape(shape)
    return out


def crop_resize(frames, size: tuple[int, int], box=None, flip=None) -> jax.Array:
    """Frames ``[B, T, H, W, C]`` -> float32 ``[B, T, size[0], size[1], C]`` (values as stored, not scaled).

    ``box``: ``[B, 4]`` (top, left, height, width) or None (the whole frame); ``flip``: ``[B]`` bool or
    None. The same box and flip apply to every frame of a clip.
    """
    b, _, h, w, _ = frames.shape
    if box is None:
        if (h, w) == tuple(size) and flip is None:
            return frames.astype(jnp.float32)
        box = jnp.broadcast_to(jnp.asarray([0, 0, h, w], jnp.int32), (b, 4))
    iy, wy = resize_taps(box[:, 0], box[:, 2], h, size[0])  # [B, out_h, K]
    ix, wx = resize_taps(box[:, 1], box[:, 3], w, size[1])
    if flip is not None:
        ix = jnp.where(flip[:, None, None], ix[:, ::-1], ix)
        wx = jnp.where(flip[:, None, None], wx[:, ::-1], wx)

    def one(x, iy, wy, ix, wx):  # one clip [T, H, W, C]
        return _resample(_resample(x.astype(jnp.float32), iy, wy, 1), ix, wx, 2)

    return jax.vmap(one)(frames, iy, wy, ix, wx)


def finish(x, stored_dtype, normalize: bool) -> jax.Array:
    """uint8 values to [0, 1]; ImageNet mean/std for 3-channel frames when ``normalize``."""
    if np.dtype(stored_dtype) == np.uint8:
        x = x / 255.0
    if normalize and x.shape[-1] == 3:
        x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return x


def prepare_frames(frames, spec: FrameAugment, box=None, flip=None) -> jax.Array:
    """One modality's stored frames (``[B, T, H, W, C]`` or ``[B, H, W, C]``) -> the model's float32 input."""
    single = frames.ndim == 4
    clip = frames[:, None] if single else frames
    size = tuple(spec.size) if spec.size else tuple(clip.shape[2:4])
    out = finish(crop_resize(clip, size, box, flip), frames.dtype, spec.normalize)
    return out[:, 0] if single else out


def prepare(batch: Mapping[str, jax.Array], specs: Mapping[str, FrameAugment]) -> dict[str, jax.Array]:
    """A loader batch -> the model's batch: every ``specs`` modality cropped, resized, flipped and
    normalised (boxes and flips taken from the batch when it has them); the box and flip entries dropped."""
    if not specs:
        return dict(batch)
    drop = {m + BOX for m in specs} | {m + FLIP for m in specs}
    out = {k: v for k, v in batch.items() if k not in drop}
    for m, spec in specs.items():
        if m in batch:
            out[m] = prepare_frames(batch[m], spec, batch.get(m + BOX), batch.get(m + FLIP))
    return out


def make_prepare(specs: Mapping[str, FrameAugment]):
    """``prepare(batch)`` for ``specs`` (identity when there are no frame modalities)."""
    specs = dict(specs)
    if not specs:
        return lambda batch: dict(batch)
    return lambda batch: prepare(batch, specs)
