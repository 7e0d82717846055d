"""LightningModules: SAE and transcoder training, activation caching, the feature atlas, the ViT classifier."""

from prisma_lightning.modules.activation_cache_module import ActivationCacheModule
from prisma_lightning.modules.atlas_module import AtlasBatch, AtlasModule
from prisma_lightning.modules.sae_module import SAEModule
from prisma_lightning.modules.transcoder_module import TranscoderModule
from prisma_lightning.modules.vit_classifier import ViTClassifierModule

__all__ = ["ActivationCacheModule", "AtlasBatch", "AtlasModule", "SAEModule", "TranscoderModule", "ViTClassifierModule"]
