"""ResNet-18/34/50 (Flax Linen, NHWC) laid out like Hugging Face's ``ResNetModel`` so its checkpoints import 1:1.

The stem is a 7x7 stride-2 convolution, BatchNorm, ReLU and a 3x3 stride-2 max-pool; four
stages of basic (18/34) or bottleneck (50) blocks; global average pooling. ``num_channels``
sets the input channels (1 for audio spectrograms, as the paper adapts ResNet18).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dyngap_jax.models.common import BatchNorm, check_input


class ConvLayer(nn.Module):
    """Convolution (no bias), BatchNorm, optional ReLU (HF ``ResNetConvLayer``)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    activation: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        k, p = self.kernel_size, self.kernel_size // 2
        x = nn.Conv(self.features, (k, k), (self.stride, self.stride), padding=[(p, p), (p, p)], use_bias=False,
                    dtype=self.dtype, name="convolution")(x)
        # PyTorch BatchNorm2d: momentum 0.1 on the new batch == flax momentum 0.9 on the old average
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                      name="normalization")(x)
        return nn.relu(x) if self.activation else x


def _shortcut(x, features: int, stride: int, dtype, train: bool):
    """The residual branch: identity, or HF's ResNetShortCut (1x1 strided conv + BatchNorm) when the shape changes.

    Called inside a block's compact ``__call__``, so the layer is that block's ``shortcut``.
    """
    if x.shape[-1] == features and stride == 1:
        return x
    return ConvLayer(features, 1, stride, activation=False, dtype=dtype, name="shortcut")(x, train)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        residual = _shortcut(x, self.features, self.stride, self.dtype, train)
        y = ConvLayer(self.features, 3, self.stride, dtype=self.dtype, name="layer_0")(x, train)
        y = ConvLayer(self.features, 3, 1, activation=False, dtype=self.dtype, name="layer_1")(y, train)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    features: int
    stride: int = 1
    reduction: int = 4
    downsample_in_bottleneck: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        residual = _shortcut(x, self.features, self.stride, self.dtype, train)
        mid = self.features // self.reduction
        s1, s2 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
        y = ConvLayer(mid, 1, s1, dtype=self.dtype, name="layer_0")(x, train)
        y = ConvLayer(mid, 3, s2, dtype=self.dtype, name="layer_1")(y, train)
        y = ConvLayer(self.features, 1, 1, activation=False, dtype=self.dtype, name="layer_2")(y, train)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """``x [B, H, W, num_channels]`` -> pooled features ``[B, hidden_sizes[-1]]``.

    With ``return_map=True`` returns ``(features, last_feature_map)``. The last feature map is
    also marked for Grad-CAM (:func:`dyngap_jax.gradcam.grad_cam`): sown into ``intermediates``
    and open to a ``perturbations`` variable (both no-ops unless those collections are asked for).
    """

    depths: Sequence[int] = (2, 2, 2, 2)
    hidden_sizes: Sequence[int] = (64, 128, 256, 512)
    layer_type: str = "basic"
    embedding_size: int = 64
    num_channels: int = 3
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    dtype: jnp.dtype = jnp.float32
    modality: str = "image"

    @property
    def input_shape(self):
        return (None, None, self.num_channels)

    @property
    def features(self) -> int:
        return self.hidden_sizes[-1]

    @nn.compact
    def __call__(self, x, train: bool = False, return_map: bool = False):
        check_input(x, self.input_shape, self.modality)
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet: `layer_type` must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        x = ConvLayer(self.embedding_size, 7, 2, dtype=self.dtype, name="embedder")(x, train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (depth, width) in enumerate(zip(self.depths, self.hidden_sizes)):
            for j in range(depth):
                stride = (2 if (i > 0 or self.downsample_in_first_stage) else 1) if j == 0 else 1
                name = f"stage{i}_layer{j}"
                if self.layer_type == "basic":
                    x = BasicBlock(width, stride, self.dtype, name=name)(x, train)
                else:
                    x = BottleneckBlock(width, stride, downsample_in_bottleneck=self.downsample_in_bottleneck,
                                        dtype=self.dtype, name=name)(x, train)
        x = self.perturb("feature_map", x)
        self.sow("intermediates", "feature_map", x)
        pooled = jnp.mean(x, axis=(1, 2))
        return (pooled, x) if return_map else pooled


def resnet(num_channels: int = 3, *, depths: Sequence[int], hidden_sizes: Sequence[int], layer_type: str = "basic",
           embedding_size: int = 64, **kw) -> ResNet:
    """A ResNet with its stages' ``depths`` (blocks) and ``hidden_sizes`` (widths) checked: one of each a stage,
    positive integers (a config may narrow or shorten a ResNet-18: ``hidden_sizes=[16, 32, 64, 128]``)."""
    depths, hidden_sizes = tuple(depths), tuple(hidden_sizes)
    ok = lambda xs: xs and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in xs)
    if not ok(depths) or not ok(hidden_sizes) or len(depths) != len(hidden_sizes):
        raise ValueError(f"`depths` {list(depths)} and `hidden_sizes` {list(hidden_sizes)} must be positive integers, "
                         "one of each a stage")
    if not (isinstance(embedding_size, int) and embedding_size > 0):
        raise ValueError(f"`embedding_size` must be a positive integer, got {embedding_size!r}")
    return ResNet(depths=depths, hidden_sizes=hidden_sizes, layer_type=layer_type, embedding_size=embedding_size,
                  num_channels=num_channels, **kw)


def resnet18(num_channels: int = 3, depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 256, 512), **kw) -> ResNet:
    return resnet(num_channels, depths=depths, hidden_sizes=hidden_sizes, layer_type="basic", **kw)


def resnet34(num_channels: int = 3, depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 256, 512), **kw) -> ResNet:
    return resnet(num_channels, depths=depths, hidden_sizes=hidden_sizes, layer_type="basic", **kw)


def resnet50(num_channels: int = 3, depths=(3, 4, 6, 3), hidden_sizes=(256, 512, 1024, 2048), **kw) -> ResNet:
    return resnet(num_channels, depths=depths, hidden_sizes=hidden_sizes, layer_type="bottleneck", **kw)
