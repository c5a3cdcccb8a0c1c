"""Import Hugging Face checkpoint folders (``config.json`` + safetensors) into our Flax modules.

``import_bert``, ``import_resnet`` and ``import_clip`` return ``(module, variables)``. Nothing
is fetched: point them at a folder on disk. Every tensor of the checkpoint must be used, except
the buffers and heads each importer lists as ignored; missing tensors, unexpected tensors and
shape mismatches are errors that name the keys.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from flax.core import unfreeze
from safetensors import safe_open

from dyngap_jax.models.bert import Bert, BertConfig
from dyngap_jax.models.clip import CLIPText, CLIPTowerConfig, CLIPVision
from dyngap_jax.models.resnet import ResNet

__all__ = ["CheckpointError", "read_checkpoint", "import_bert", "import_resnet", "import_clip"]


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model: the message names the file or keys."""


def read_checkpoint(folder: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``config.json`` and every tensor of ``model.safetensors`` (or its shards) in ``folder``."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing (a Hugging Face checkpoint folder has config.json)")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    else:
        other = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5"))]
        raise CheckpointError(
            f"{folder}: no model.safetensors (or model.safetensors.index.json)"
            + (f"; found {other}: convert them to safetensors first" if other else "")
        )
    state = {}
    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key))
    return config, state


class _StateDict:
    """Hands out checkpoint tensors by key and remembers which were used and which were missing."""

    def __init__(self, state: dict[str, np.ndarray], prefix: str, ignore: tuple[str, ...], source: str):
        self.source = source
        self.state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
        self.ignore = ignore
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.origin: dict[tuple, str] = {}

    def take(self, key: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.used.add(key)
        if key not in self.state:
            self.missing.append(key)
            return None
        x = self.state[key]
        return transform(x) if transform is not None else x

    def put(self, tree: dict, path: tuple[str, ...], key: str, transform=None) -> None:
        value = self.take(key, transform)
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
        self.origin[path] = key

    def finish(self) -> None:
        ignored = lambda k: any(re.fullmatch(pat, k) for pat in self.ignore)
        unexpected = sorted(k for k in self.state if k not in self.used and not ignored(k))
        problems = []
        if self.missing:
            problems.append(f"missing keys: {sorted(self.missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        if problems:
            raise CheckpointError(f"{self.source}: " + "; ".join(problems))


def _check_shapes(module, variables: dict, sd: _StateDict, *init_args, **init_kwargs) -> dict:
    """Compare the imported tree with the module's own (abstract) initialisation, naming any mismatch."""
    expected = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args, **init_kwargs))
    expected = unfreeze(expected)
    expected.pop("perturbations", None)  # Grad-CAM's placeholders (ResNet's feature map), not weights
    exp_flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    problems = []
    for path, leaf in got_flat.items():
        hf_key = sd.origin.get(path[1:], "?")
        if path not in exp_flat:
            problems.append(f"{hf_key} -> {'/'.join(path)} has no place in the model")
        elif tuple(leaf.shape) != tuple(exp_flat[path].shape):
            problems.append(f"{hf_key}: checkpoint shape {tuple(leaf.shape)} (as {'/'.join(path)}), model expects {tuple(exp_flat[path].shape)}")
    for path in exp_flat:
        if path not in got_flat:
            problems.append(f"model variable {'/'.join(path)} is not filled by the checkpoint")
    if problems:
        raise CheckpointError(f"{sd.source}: shape mismatch: " + "; ".join(problems))
    return jax.tree_util.tree_map(lambda x, e: np.asarray(x, dtype=e.dtype), variables, expected)


_T = lambda w: np.ascontiguousarray(w.T)  # torch Linear [out, in] -> flax Dense kernel [in, out]
_CONV = lambda w: np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


def _dense(sd: _StateDict, tree: dict, path: tuple[str, ...], hf: str, bias: bool = True) -> None:
    sd.put(tree, path + ("kernel",), f"{hf}.weight", _T)
    if bias:
        sd.put(tree, path + ("bias",), f"{hf}.bias")


def _layer_norm(sd: _StateDict, tree: dict, path: tuple[str, ...], hf: str) -> None:
    sd.put(tree, path + ("scale",), f"{hf}.weight")
    sd.put(tree, path + ("bias",), f"{hf}.bias")


def _prefix(state: dict, candidates: tuple[str, ...], probe: str) -> str:
    for p in candidates:
        if any(k.startswith(p + probe) for k in state):
            return p
    return ""


# --------------------------------------------------------------------------- BERT

BERT_IGNORED = (r"embeddings\.position_ids", r"cls\..*", r"classifier\..*", r"qa_outputs\..*")


def import_bert(folder: str, *, pooling: str = "cls", max_length: int | None = None, modality: str = "text",
                dtype=np.float32) -> tuple[Bert, dict[str, Any]]:
    """A ``BertModel`` checkpoint folder (keys optionally under ``bert.``) -> ``(Bert, variables)``."""
    config, state = read_checkpoint(folder)
    if config.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{folder}/config.json: model_type {config.get('model_type')!r} is not 'bert'")
    cfg = BertConfig.from_dict(config)
    module = Bert(cfg, pooling=pooling, max_length=max_length, modality=modality, dtype=dtype)
    sd = _StateDict(state, _prefix(state, ("bert.",), "embeddings."), BERT_IGNORED, folder)
    p: dict = {}
    sd.put(p, ("word_embeddings", "embedding"), "embeddings.word_embeddings.weight")
    sd.put(p, ("position_embeddings", "embedding"), "embeddings.position_embeddings.weight")
    sd.put(p, ("token_type_embeddings", "embedding"), "embeddings.token_type_embeddings.weight")
    _layer_norm(sd, p, ("embeddings_norm",), "embeddings.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        hf, f = f"encoder.layer.{i}", f"layer_{i}"
        for name in ("query", "key", "value"):
            _dense(sd, p, (f, "attention", name), f"{hf}.attention.self.{name}")
        _dense(sd, p, (f, "attention", "out"), f"{hf}.attention.output.dense")
        _layer_norm(sd, p, (f, "attention_norm"), f"{hf}.attention.output.LayerNorm")
        _dense(sd, p, (f, "intermediate"), f"{hf}.intermediate.dense")
        _dense(sd, p, (f, "output"), f"{hf}.output.dense")
        _layer_norm(sd, p, (f, "output_norm"), f"{hf}.output.LayerNorm")
    _dense(sd, p, ("pooler",), "pooler.dense")
    sd.finish()
    length = min(8, cfg.max_position_embeddings) if max_length is None else max_length
    variables = _check_shapes(module, {"params": p}, sd, np.zeros((1, length), np.int32))
    return module, variables


# --------------------------------------------------------------------------- ResNet

RESNET_IGNORED = (r".*\.num_batches_tracked", r"classifier\..*")


def _bn(sd: _StateDict, params: dict, stats: dict, path: tuple[str, ...], hf: str) -> None:
    sd.put(params, path + ("scale",), f"{hf}.weight")
    sd.put(params, path + ("bias",), f"{hf}.bias")
    sd.put(stats, path + ("mean",), f"{hf}.running_mean")
    sd.put(stats, path + ("var",), f"{hf}.running_var")


def _conv_layer(sd, params, stats, path, hf):
    sd.put(params, path + ("convolution", "kernel"), f"{hf}.convolution.weight", _CONV)
    _bn(sd, params, stats, path + ("normalization",), f"{hf}.normalization")


def import_resnet(folder: str, *, modality: str = "image", dtype=np.float32) -> tuple[ResNet, dict[str, Any]]:
    """A ``ResNetModel`` (or ``ResNetForImageClassification``, head dropped) folder -> ``(ResNet, variables)``."""
    config, state = read_checkpoint(folder)
    if config.get("model_type", "resnet") != "resnet":
        raise CheckpointError(f"{folder}/config.json: model_type {config.get('model_type')!r} is not 'resnet'")
    if config.get("hidden_act", "relu") != "relu":
        raise CheckpointError(f"{folder}/config.json: hidden_act {config['hidden_act']!r}; only 'relu' is supported")
    module = ResNet(
        depths=tuple(config["depths"]),
        hidden_sizes=tuple(config["hidden_sizes"]),
        layer_type=config.get("layer_type", "bottleneck"),
        embedding_size=config.get("embedding_size", 64),
        num_channels=config.get("num_channels", 3),
        downsample_in_first_stage=config.get("downsample_in_first_stage", False),
        downsample_in_bottleneck=config.get("downsample_in_bottleneck", False),
        modality=modality,
        dtype=dtype,
    )
    sd = _StateDict(state, _prefix(state, ("resnet.",), "embedder."), RESNET_IGNORED, folder)
    params: dict = {}
    stats: dict = {}
    _conv_layer(sd, params, stats, ("embedder",), "embedder.embedder")
    convs = 2 if module.layer_type == "basic" else 3
    in_width = module.embedding_size
    for i, (depth, width) in enumerate(zip(module.depths, module.hidden_sizes)):
        for j in range(depth):
            hf, f = f"encoder.stages.{i}.layers.{j}", f"stage{i}_layer{j}"
            stride = (2 if (i > 0 or module.downsample_in_first_stage) else 1) if j == 0 else 1
            if in_width != width or stride != 1:
                _conv_layer(sd, params, stats, (f, "shortcut"), f"{hf}.shortcut")
            for k in range(convs):
                _conv_layer(sd, params, stats, (f, f"layer_{k}"), f"{hf}.layer.{k}")
            in_width = width
    sd.finish()
    x = np.zeros((1, 32, 32, module.num_channels), np.float32)
    variables = _check_shapes(module, {"params": params, "batch_stats": stats}, sd, x)
    return module, variables


# --------------------------------------------------------------------------- CLIP

CLIP_IGNORED = (r".*\.position_ids", r"logit_scale")


def _clip_encoder(sd: _StateDict, p: dict, hf: str, layers: int) -> None:
    for i in range(layers):
        h, f = f"{hf}.encoder.layers.{i}", f"layer_{i}"
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
            _dense(sd, p, (f, "self_attn", ours), f"{h}.self_attn.{theirs}")
        _layer_norm(sd, p, (f, "layer_norm1"), f"{h}.layer_norm1")
        _layer_norm(sd, p, (f, "layer_norm2"), f"{h}.layer_norm2")
        _dense(sd, p, (f, "fc1"), f"{h}.mlp.fc1")
        _dense(sd, p, (f, "fc2"), f"{h}.mlp.fc2")


def import_clip(folder: str, tower: str, *, project: bool = True, max_length: int | None = None,
                modality: str | None = None, dtype=np.float32):
    """One tower of a ``CLIPModel`` folder (or a ``CLIPVisionModel`` / ``CLIPTextModel`` folder).

    ``tower``: ``"vision"`` or ``"text"``. ``project=True`` includes ``visual_projection`` /
    ``text_projection`` (the joint embedding space); the other tower's tensors are set aside.
    """
    if tower not in ("vision", "text"):
        raise ValueError(f"import_clip: `tower` must be 'vision' or 'text', got {tower!r}")
    config, state = read_checkpoint(folder)
    model_type = config.get("model_type")
    if model_type == "clip":
        tower_cfg = dict(config[f"{tower}_config"])
        projection_dim = config.get("projection_dim", 512) if project else None
    elif model_type == f"clip_{tower}_model":
        tower_cfg, projection_dim = config, None
        if project:
            raise CheckpointError(f"{folder}: a {model_type} checkpoint has no projection; pass project=False")
    else:
        raise CheckpointError(f"{folder}/config.json: model_type {model_type!r} is not 'clip' or 'clip_{tower}_model'")
    cfg = CLIPTowerConfig.from_dict(tower_cfg)
    other = "text" if tower == "vision" else "vision"
    ignored = CLIP_IGNORED + (rf"{other}_model\..*", rf"{'text' if other == 'text' else 'visual'}_projection\.weight")
    if not project:
        ignored += (rf"{'visual' if tower == 'vision' else 'text'}_projection\.weight",)
    sd = _StateDict(state, "", ignored, folder)
    p: dict = {}
    hf = f"{tower}_model"
    if tower == "vision":
        module = CLIPVision(cfg, projection_dim, dtype=dtype, modality=modality or "image")
        sd.put(p, ("patch_embedding", "kernel"), f"{hf}.embeddings.patch_embedding.weight", _CONV)
        sd.put(p, ("class_embedding",), f"{hf}.embeddings.class_embedding")
        sd.put(p, ("position_embedding", "embedding"), f"{hf}.embeddings.position_embedding.weight")
        _layer_norm(sd, p, ("pre_layrnorm",), f"{hf}.pre_layrnorm")
        _clip_encoder(sd, p, hf, cfg.num_hidden_layers)
        _layer_norm(sd, p, ("post_layernorm",), f"{hf}.post_layernorm")
        if projection_dim:
            sd.put(p, ("projection", "kernel"), "visual_projection.weight", _T)
        example = np.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), np.float32)
    else:
        module = CLIPText(cfg, projection_dim, max_length=max_length, dtype=dtype, modality=modality or "text")
        sd.put(p, ("token_embedding", "embedding"), f"{hf}.embeddings.token_embedding.weight")
        sd.put(p, ("position_embedding", "embedding"), f"{hf}.embeddings.position_embedding.weight")
        _clip_encoder(sd, p, hf, cfg.num_hidden_layers)
        _layer_norm(sd, p, ("final_layer_norm",), f"{hf}.final_layer_norm")
        if projection_dim:
            sd.put(p, ("projection", "kernel"), "text_projection.weight", _T)
        example = np.zeros((1, max_length or min(8, cfg.max_position_embeddings)), np.int32)
    sd.finish()
    variables = _check_shapes(module, {"params": p}, sd, example)
    return module, variables
