"""`ActivationWriter`: writes what ``ActivationCacheModule.predict_step`` returns as activation shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from prisma_lightning.activations import ShardWriter, hook_folder


class ActivationWriter(pl.Callback):
    """One :class:`ShardWriter` per hook under ``root/<hook_name>/``; resumable and atomic per shard.

    Args:
        root: folder that receives one sub-folder per hook.
        dtype: storage dtype (``float32``, ``float16``; ``bfloat16`` needs ``file_format='safetensors'``).
        images_per_shard: images per shard file.
        file_format: ``npy`` (memory-mapped reads) or ``safetensors``.
        shuffle: shuffle rows within each shard (seeded), so contiguous reads mix images.
        seed: shuffle seed.
    """

    def __init__(
        self,
        root: str,
        dtype: str = "float32",
        images_per_shard: int = 1024,
        file_format: str = "npy",
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.dtype, self.images_per_shard, self.file_format = dtype, images_per_shard, file_format
        self.shuffle, self.seed = shuffle, seed
        self.writers: dict[str, ShardWriter] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                "ActivationWriter writes one ordered shard set; run caching on a single device "
                "(--trainer.devices 1) and train on the shards with DDP."
            )
        backbone = pl_module.backbone
        meta = {"model": backbone.cfg.model_name, "tokens": pl_module.tokens}
        self.writers = {}
        for hook in pl_module.hook_names:
            d = backbone.hook_width(hook)
            self.writers[hook] = ShardWriter(
                hook_folder(self.root, hook), d=d, tokens_per_image=pl_module.tokens_per_image,
                meta={**meta, "hook": hook}, dtype=self.dtype, images_per_shard=self.images_per_shard,
                file_format=self.file_format, shuffle=self.shuffle, seed=self.seed,
            )  # fmt: skip
        done = {w.images_done for w in self.writers.values()}
        if len(done) > 1:
            raise ValueError(f"The hook folders under {self.root} hold different image counts {sorted(done)}.")
        pl_module.skip_images = done.pop()

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if outputs is None:
            return
        for hook, rows in outputs["activations"].items():
            self.writers[hook].add(rows, outputs["n_images"])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for writer in self.writers.values():
            writer.close()
