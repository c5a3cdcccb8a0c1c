"""Build encoders, fusion heads and whole models by name from config dicts (ml_collections or plain).

A model config::

    num_classes: 6
    modalities: ["audio", "video"]          # order = fusion layout and L_MM pair order
    projection_dim: None                    # a common feature width, if encoders differ
    encoders:
      audio: {name: "resnet18", num_channels: 1}
      video: {name: "video_resnet18", num_frames: 3}
      text:  {name: "bert", checkpoint: "/path/to/hf/folder", pooling: "cls"}
    fusion: {name: "concat"}

Encoders with a ``checkpoint`` are imported from that Hugging Face folder (nothing is fetched);
:func:`build_model` returns their variables beside the model, and :func:`init_variables` puts
them into a freshly initialised variable tree.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from flax.core import unfreeze

from dyngap_jax.models import hf_import
from dyngap_jax.models.bert import Bert, BertConfig
from dyngap_jax.models.clip import CLIPText, CLIPTowerConfig, CLIPVision
from dyngap_jax.models.fusion import FUSIONS
from dyngap_jax.models.mlp import MLPEncoder
from dyngap_jax.models.multimodal import MultimodalClassifier
from dyngap_jax.models.resnet import resnet18, resnet34, resnet50
from dyngap_jax.models.video import VideoEncoder

ENCODERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {}


def register_encoder(name: str):
    """Decorator: ``fn(modality, **kwargs) -> (module, pretrained_variables_or_None)``."""

    def wrap(fn):
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        ENCODERS[name] = fn
        return fn

    return wrap


def _resnet(factory):
    def build(modality, checkpoint=None, **kw):
        if checkpoint:
            if kw:
                raise ValueError(f"encoder for {modality!r}: with a `checkpoint` the architecture comes from it; drop {sorted(kw)}")
            return hf_import.import_resnet(checkpoint, modality=modality)
        return factory(modality=modality, **kw), None

    return build


for _name, _factory in (("resnet18", resnet18), ("resnet34", resnet34), ("resnet50", resnet50)):
    register_encoder(_name)(_resnet(_factory))


def _video(factory):
    def build(modality, num_frames=None, temporal="mean", num_channels=3, checkpoint=None, **resnet_kw):
        """``resnet_kw``: the backbone's ``depths``, ``hidden_sizes``, ``embedding_size`` (not with a checkpoint)."""
        if checkpoint:
            if resnet_kw:
                raise ValueError(f"encoder for {modality!r}: with a `checkpoint` the architecture comes from it; "
                                 f"drop {sorted(resnet_kw)}")
            backbone, variables = hf_import.import_resnet(checkpoint, modality=modality)
            variables = {collection: {"backbone": tree} for collection, tree in variables.items()}
        else:
            backbone, variables = factory(num_channels=num_channels, modality=modality, **resnet_kw), None
        return VideoEncoder(backbone, num_frames=num_frames, temporal=temporal, modality=modality), variables

    return build


for _name, _factory in (("video_resnet18", resnet18), ("video_resnet34", resnet34), ("video_resnet50", resnet50)):
    register_encoder(_name)(_video(_factory))


@register_encoder("mlp")
def _mlp(modality, **kw):
    return MLPEncoder(modality=modality, **{k: tuple(v) if k == "hidden" else v for k, v in kw.items()}), None


@register_encoder("bert")
def _bert(modality, checkpoint=None, pooling="cls", max_length=None, **config):
    if checkpoint:
        if config:
            raise ValueError(f"encoder for {modality!r}: with a `checkpoint` the BERT config comes from it; drop {sorted(config)}")
        return hf_import.import_bert(checkpoint, pooling=pooling, max_length=max_length, modality=modality)
    return Bert(BertConfig(**config), pooling=pooling, max_length=max_length, modality=modality), None


@register_encoder("clip_vision")
def _clip_vision(modality, checkpoint=None, project=True, projection_dim=None, **config):
    if checkpoint:
        return hf_import.import_clip(checkpoint, "vision", project=project, modality=modality)
    return CLIPVision(CLIPTowerConfig(**config), projection_dim, modality=modality), None


@register_encoder("clip_text")
def _clip_text(modality, checkpoint=None, project=True, projection_dim=None, max_length=None, **config):
    if checkpoint:
        return hf_import.import_clip(checkpoint, "text", project=project, max_length=max_length, modality=modality)
    return CLIPText(CLIPTowerConfig(**config), projection_dim, max_length=max_length, modality=modality), None


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def build_encoder(spec: Mapping, modality: str):
    spec = _as_dict(spec)
    name = spec.pop("name", None)
    if name not in ENCODERS:
        raise ValueError(f"model.encoders.{modality}.name: unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    try:
        return ENCODERS[name](modality, **spec)
    except (TypeError, ValueError) as e:
        if str(e).startswith("model."):
            raise
        raise ValueError(f"model.encoders.{modality}: {e}") from None


def build_fusion(spec: Mapping, num_classes: int, modalities):
    spec = _as_dict(spec)
    name = spec.pop("name", None)
    if name not in FUSIONS:
        raise ValueError(f"model.fusion.name: unknown fusion {name!r}; known: {sorted(FUSIONS)}")
    try:
        return FUSIONS[name](num_classes=num_classes, modalities=tuple(modalities), **spec)
    except TypeError as e:
        raise ValueError(f"model.fusion: {e}") from None


def build_model(cfg) -> tuple[MultimodalClassifier, dict[str, Any]]:
    """``(model, pretrained)``: ``pretrained[modality]`` are imported encoder variables."""
    cfg = _as_dict(cfg)
    for field in ("num_classes", "modalities", "encoders", "fusion"):
        if field not in cfg:
            raise ValueError(f"model config: missing field `model.{field}`")
    modalities = tuple(cfg["modalities"])
    encoders_cfg = _as_dict(cfg["encoders"])
    missing = [m for m in modalities if m not in encoders_cfg]
    extra = [m for m in encoders_cfg if m not in modalities]
    if missing or extra:
        raise ValueError(f"model.encoders: modalities without an encoder {missing}, encoders not in model.modalities {extra}")
    encoders, pretrained = {}, {}
    for m in modalities:
        encoders[m], variables = build_encoder(encoders_cfg[m], m)
        if variables is not None:
            pretrained[m] = variables
    projection_dim = cfg.get("projection_dim")
    widths = {m: getattr(e, "features", None) for m, e in encoders.items()}
    if not projection_dim and len(modalities) > 1 and len(set(widths.values())) > 1:
        raise ValueError(
            f"model.projection_dim: encoders give features of different widths {widths}; "
            "L_MM compares features across modalities, so set a common projection_dim"
        )
    fusion = build_fusion(cfg["fusion"], cfg["num_classes"], modalities)
    return MultimodalClassifier(modalities, encoders, fusion, projection_dim), pretrained


def parameter_info(model: MultimodalClassifier, batch: Mapping) -> tuple[list[str], int, dict[str, int]]:
    """``(order, count, feature_dims)``: the parameters' paths (``'/'``-joined keys) in the order the model creates
    them, their total number of entries, and each modality's feature width (what the fusion head takes).

    For modules written in forward order (all of ours) the order is the one PyTorch registers the
    same model's parameters in: what "the first tensor" means in the authors' code
    (``model.parameters()``), where ``jax.tree_util`` would sort the keys instead. Read off an
    abstract initialisation (nothing is computed).
    """
    order: list[str] = []

    def walk(tree, prefix):
        for k, v in tree.items():  # insertion order: the order of creation, before any pytree flattening
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}/")
            else:
                order.append(f"{prefix}{k}")

    def init(key, batch):
        out, variables = model.init_with_output(key, batch, train=False)
        walk(variables["params"], "")
        return variables["params"], out["features"]

    shapes, features = jax.eval_shape(init, jax.random.PRNGKey(0), dict(batch))
    return (order, sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)),
            {m: int(f.shape[-1]) for m, f in features.items()})


def parameter_order(model: MultimodalClassifier, batch: Mapping) -> list[str]:
    """The parameters' paths in the order the model creates them (:func:`parameter_info`)."""
    return parameter_info(model, batch)[0]


def init_variables(model: MultimodalClassifier, key: jax.Array, batch: Mapping, pretrained: Mapping | None = None):
    """Initialise ``model`` on an example ``batch`` and put the ``pretrained`` encoder variables in place."""
    # compiled once rather than run op by op (hundreds of small compilations for a ResNet)
    variables = unfreeze(jax.jit(functools.partial(model.init, train=False))(key, dict(batch)))
    # Grad-CAM's zero perturbations (``ResNet`` marks its last feature map) are not model state
    variables.pop("perturbations", None)
    for m, enc_vars in (pretrained or {}).items():
        for collection, tree in enc_vars.items():
            slot = variables.get(collection, {}).get(f"encoders_{m}")
            if slot is None:
                raise ValueError(f"pretrained variables for {m!r}: the model has no {collection}/encoders_{m}")
            want = jax.tree_util.tree_map(lambda x: x.shape, slot)
            got = jax.tree_util.tree_map(lambda x: x.shape, tree)
            if want != got:
                raise ValueError(f"pretrained variables for {m!r} ({collection}) do not match the model's shapes")
            variables[collection][f"encoders_{m}"] = jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), tree, slot)
    return variables
