"""Hooked vision transformers: HookedViT, its config, conversions, the model registry and the backbone Protocol."""

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.convert import convert_model, supported_sources
from prisma_lightning.backbones.factored_matrix import FactoredMatrix
from prisma_lightning.backbones.hooked_vit import VIT_PRISMA_ALIASES, HookedViT
from prisma_lightning.backbones.protocol import BackboneConfig, HookedBackbone
from prisma_lightning.backbones.registry import TEST_CONFIGS, list_models, load_hooked_model, register_model
from prisma_lightning.backbones.transforms import PreprocessConfig, build_transform
from prisma_lightning.backbones.zero_shot import ZeroShotClassifier, clip_templates, imagenet_class_names

__all__ = [
    "BackboneConfig",
    "FactoredMatrix",
    "HookedBackbone",
    "HookedViT",
    "HookedViTConfig",
    "PreprocessConfig",
    "ZeroShotClassifier",
    "build_transform",
    "clip_templates",
    "imagenet_class_names",
    "TEST_CONFIGS",
    "VIT_PRISMA_ALIASES",
    "convert_model",
    "list_models",
    "load_hooked_model",
    "register_model",
    "supported_sources",
]
