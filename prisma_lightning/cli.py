"""`prisma` console script: LightningCLI for every prisma-lightning experiment.

``prisma fit|validate|test|predict --config configs/<experiment>.yaml``. Any LightningModule and
LightningDataModule can be named by ``class_path`` (subclass mode), so user subclasses work too.
"""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``prisma`` script and of ``python -m prisma_lightning``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    PrismaCLI(args=args)


if __name__ == "__main__":
    main()
