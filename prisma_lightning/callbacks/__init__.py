"""Lightning callbacks (activation writing; evaluation, resampling, density plots and uploads follow)."""

from prisma_lightning.callbacks.activation_writer import ActivationWriter

__all__ = ["ActivationWriter"]
