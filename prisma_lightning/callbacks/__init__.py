"""Lightning callbacks: activation writing, SAE evaluation, dead-feature resampling, density plots, Hub uploads,
the feature atlas."""

from prisma_lightning.callbacks.activation_writer import ActivationWriter
from prisma_lightning.callbacks.atlas_writer import AtlasWriter
from prisma_lightning.callbacks.density import FeatureDensityLogger
from prisma_lightning.callbacks.evaluator import LinearProbe, SAEEvaluator, format_table
from prisma_lightning.callbacks.hub_uploader import HubUploader
from prisma_lightning.callbacks.resampler import DeadFeatureResampler

__all__ = [
    "ActivationWriter",
    "AtlasWriter",
    "DeadFeatureResampler",
    "FeatureDensityLogger",
    "HubUploader",
    "LinearProbe",
    "SAEEvaluator",
    "format_table",
]
