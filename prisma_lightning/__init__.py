"""prisma-lightning: PyTorch Lightning modules for mechanistic interpretability of vision transformers.

Public names are imported lazily so ``import prisma_lightning`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HookPoint": "prisma_lightning.hooks",
    "HookedModule": "prisma_lightning.hooks",
    "ActivationCache": "prisma_lightning.hooks",
    "HookedViT": "prisma_lightning.backbones",
    "HookedViTConfig": "prisma_lightning.backbones",
    "FactoredMatrix": "prisma_lightning.backbones",
    "convert_model": "prisma_lightning.backbones",
    "load_hooked_model": "prisma_lightning.backbones",
    "list_models": "prisma_lightning.backbones",
    "ZeroShotClassifier": "prisma_lightning.backbones",
    "SAEConfig": "prisma_lightning.sae",
    "SparseAutoencoder": "prisma_lightning.sae",
    "Transcoder": "prisma_lightning.sae",
    "TranscoderConfig": "prisma_lightning.sae",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prisma_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
