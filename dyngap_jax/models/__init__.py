"""Encoders (ResNet, video, MLP, BERT, CLIP towers), fusion heads, ``MultimodalClassifier``, HF importers, registry."""
from dyngap_jax.models.bert import Bert, BertConfig
from dyngap_jax.models.common import BatchNorm, with_dtype
from dyngap_jax.models.clip import CLIPText, CLIPTowerConfig, CLIPVision
from dyngap_jax.models.fusion import FUSIONS, ConcatFusion, FiLMFusion, GatedFusion, SumFusion, WeightedFusion
from dyngap_jax.models.hf_import import CheckpointError, import_bert, import_clip, import_resnet, read_checkpoint
from dyngap_jax.models.mlp import MLPEncoder
from dyngap_jax.models.multimodal import MultimodalClassifier
from dyngap_jax.models.registry import (
    ENCODERS,
    build_encoder,
    build_fusion,
    build_model,
    init_variables,
    parameter_info,
    parameter_order,
    register_encoder,
)
from dyngap_jax.models.resnet import ResNet, resnet18, resnet34, resnet50
from dyngap_jax.models.video import VideoEncoder

__all__ = [
    "BatchNorm", "Bert", "BertConfig", "CLIPText", "CLIPTowerConfig", "CLIPVision", "CheckpointError", "ConcatFusion",
    "ENCODERS", "FUSIONS", "FiLMFusion", "GatedFusion", "MLPEncoder", "MultimodalClassifier", "ResNet",
    "SumFusion", "VideoEncoder", "WeightedFusion", "build_encoder", "build_fusion", "build_model",
    "import_bert", "import_clip", "import_resnet", "init_variables", "parameter_info", "parameter_order", "read_checkpoint", "register_encoder",
    "resnet18", "resnet34", "resnet50", "with_dtype",
]
