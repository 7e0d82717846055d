"""Shared fixtures. Tests run offline: no weights or data are downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit():
    """The registry's smallest HookedViT, eval mode, random weights."""
    from prisma_lightning.backbones import load_hooked_model

    return load_hooked_model("test/vit-tiny", pretrained=False)
