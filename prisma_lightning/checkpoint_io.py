"""`AtomicCheckpointIO`: Lightning checkpoints written to a temporary file beside the target, then renamed.

Lightning's default writer stages the file in the system temp folder and moves it into place, which is a copy
(not atomic) when that folder is on another filesystem: a crash mid-copy leaves a truncated ``last.ckpt``.
Here the temporary file sits in the checkpoint folder, is fsynced, and ``os.replace`` swaps it in one step.
The ``prisma`` CLI installs it by default; pass ``plugins=[AtomicCheckpointIO()]`` to a Trainer you build.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prisma_lightning.utils import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote paths fall back to Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
