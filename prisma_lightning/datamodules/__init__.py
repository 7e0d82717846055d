"""LightningDataModules: cached activations, dSprites, induction datasets, ImageNet folders and video clips.

Every DataModule yields ``(images, labels)`` batches (images ``[B, C, H, W]``, video clips ``[B, T, C, H, W]``),
splits deterministically from ``seed``, and takes a ``transform`` callable (e.g. a backbone's ``preprocess()``).
Train loaders are stateful: a run resumed from a mid-epoch checkpoint sees exactly the batches of an
uninterrupted one.
Names are imported lazily, so importing this package does not import PyAV or PIL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActivationDataModule": "activations",
    "PrismaDataModule": "base",
    "GlobalBatchSampler": "base",
    "ResumableDataLoader": "base",
    "SampleKey": "base",
    "SeededSamples": "base",
    "seeded_rngs": "base",
    "FileDataset": "base",
    "UnreadableFileError": "base",
    "DSpritesDataModule": "dsprites",
    "DSpritesDataset": "dsprites",
    "DSpritesGrid": "dsprites",
    "write_dsprites_cache": "dsprites",
    "sprite_images": "dsprites",
    "InductionDataModule": "induction",
    "InductionDataset": "induction",
    "ImageNetDataModule": "imagenet",
    "ImageFileDataset": "imagenet",
    "VideoClipDataModule": "video",
    "VideoClipDataset": "video",
    "MovingSpritesDataModule": "video",
    "ClipToFloat": "video",
    "write_moving_sprites": "video",
    "write_video": "video",
    "TorchvisionDataModule": "torchvision_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
