"""`prisma` console script: LightningCLI for every prisma-lightning experiment.

``prisma fit|validate|test|predict --config configs/<experiment>.yaml``. Any LightningModule and
LightningDataModule can be named by ``class_path`` (subclass mode), so user subclasses work too.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from prisma_lightning.checkpoint_io import AtomicCheckpointIO


class PrismaCLI(LightningCLI):
    """LightningCLI with prisma-lightning's defaults (subclass mode, overwriting the saved config)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "prisma-lightning: interpretability of vision transformers.")
        super().__init__(*args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())  # crash-safe checkpoints by default
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        check_checkpoint(self._ckpt_path("fit"), self.trainer)

    def before_validate(self) -> None:
        check_checkpoint(self._ckpt_path("validate"), self.trainer)

    def _ckpt_path(self, subcommand: str) -> str | None:
        config = self.config.get(subcommand, {}) if self.subcommand else self.config
        return config.get("ckpt_path") if hasattr(config, "get") else None


def check_checkpoint(ckpt_path: str | None, trainer: Any) -> None:
    """Fail with a clear message when the checkpoint to resume from is missing, truncated or corrupt.

    ``ckpt_path="last"`` is looked up like Lightning does (``last*.ckpt`` in the checkpoint directory); a run
    without one starts from scratch, as Lightning does.
    """
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        candidates = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if dirpath else []
        if not candidates:
            return
        path = candidates[-1]
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {path} does not exist; pass an existing file or --ckpt_path last.")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"Checkpoint {path} is truncated or corrupt ({err}); delete it and resume from an earlier checkpoint."
        ) from err
    if bad is not None:
        raise ValueError(f"Checkpoint {path} is corrupt (member {bad!r} fails its CRC check); delete it.")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``prisma`` script and of ``python -m prisma_lightning``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    PrismaCLI(args=args)


if __name__ == "__main__":
    main()
