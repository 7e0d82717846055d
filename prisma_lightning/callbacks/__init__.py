"""Lightning callbacks (activation writing; evaluation, resampling, density plots and uploads follow)."""

from prisma_lightning.callbacks.activation_writer import ActivationWriter
from prisma_lightning.callbacks.evaluator import LinearProbe, SAEEvaluator, format_table

__all__ = ["ActivationWriter", "LinearProbe", "SAEEvaluator", "format_table"]
