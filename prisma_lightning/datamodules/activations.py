"""`ActivationDataModule`: shuffled batches of cached activations, memory-mapped, DDP-sharded, resumable.

A batch is a contiguous block of ``batch_size`` rows of one shard (rows were shuffled across images when the
shard was written), so reads are sequential; the order of blocks is a fresh seeded permutation every epoch.
``batch_size`` is global: under DDP every rank reads its own equal slice of each block. The DataLoader is
stateful: Lightning stores its position in checkpoints, so a run resumed from ``last.ckpt`` continues with
exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prisma_lightning.activations.shards import ActivationShards

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ActivationBlocks(IterableDataset):
    """Yields blocks of one split in a per-epoch seeded order; under DDP each rank gets its slice of every block.

    ``batch_size`` is the global batch: with ``W`` processes each rank reads rows ``[r*B/W, (r+1)*B/W)`` of the
    same block, so a DDP run sees exactly the batches of a one-process run with the same ``batch_size``.
    """

    def __init__(
        self, shards: ActivationShards, blocks: list[tuple[int, int, int]], shuffle: bool, seed: int, dtype: str
    ) -> None:
        self.shards, self.blocks, self.shuffle, self.seed = shards, blocks, shuffle, seed
        self.dtype = _DTYPES[dtype]
        self.epoch = 0
        self.skip = 0  # batches of this rank already consumed in this epoch (resume)

    def epoch_order(self) -> list[int]:
        """Block indices for the current epoch (the same on every rank), minus those already consumed."""
        order = list(range(len(self.blocks)))
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
            order = torch.randperm(len(order), generator=gen).tolist()
        order = order[self.skip :]
        worker = get_worker_info()
        if worker is not None:  # the DataLoader interleaves workers round-robin, keeping this order
            order = order[worker.id :: worker.num_workers]
        return order

    def rank_rows(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's slice of the rows ``[start, stop)`` of a global batch."""
        rank, world = _dist_info()
        per_rank = (stop - start) // world
        if per_rank == 0:
            raise ValueError(f"A batch of {stop - start} rows cannot be split over {world} processes.")
        return start + rank * per_rank, start + (rank + 1) * per_rank

    def __len__(self) -> int:
        return len(self.blocks)

    def read_block(self, shards: ActivationShards, i: int) -> torch.Tensor:
        shard, start, stop = self.blocks[i]
        return shards.read(shard, *self.rank_rows(start, stop)).to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in self.epoch_order():
            yield self.read_block(self.shards, i)


class ResumableLoader(DataLoader):
    """A DataLoader over :class:`ActivationBlocks` whose position survives checkpoints (Lightning calls
    ``state_dict`` / ``load_state_dict`` on stateful loaders).

    Every ``iter()`` starts the next epoch (a new block order), except the first one after ``load_state_dict``,
    which continues the saved epoch after its consumed batches. Lightning stops at ``len(loader)`` without
    exhausting the iterator, so epochs are counted at ``iter()``, not at exhaustion.
    """

    def __init__(self, dataset: ActivationBlocks, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch, self._consumed, self._next_epoch = 0, 0, 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
        else:
            epoch, skip = self._next_epoch, 0
        self._next_epoch = epoch + 1
        self._epoch, self._consumed = epoch, skip
        self.dataset.epoch, self.dataset.skip = epoch, skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self.dataset):  # the saved epoch was complete: continue with the next one
            epoch, consumed = epoch + 1, 0
        self._resume = (epoch, consumed)
        self._next_epoch = epoch


class ActivationDataModule(pl.LightningDataModule):
    """Batches of cached activations for ``SAEModule`` / ``TranscoderModule`` in cached mode.

    Args:
        path: a hook folder with ``index.json`` (``<cache root>/<hook_name>``).
        batch_size: rows (tokens) per global batch (split evenly over DDP processes).
        val_fraction: fraction of blocks held out for validation (the last ones, never shuffled in).
        shuffle: shuffle block order every epoch (training split).
        seed: base seed of the block order.
        num_workers: DataLoader worker processes.
        dtype: dtype of the yielded batches (shards may be stored in float16).
        path_out: for transcoders, the folder of the output hook (same images, same order).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 4096,
        val_fraction: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        dtype: str = "float32",
        path_out: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        self.path, self.path_out = path, path_out
        self.batch_size, self.val_fraction, self.shuffle = batch_size, val_fraction, shuffle
        self.seed, self.num_workers, self.dtype = seed, num_workers, dtype
        self.shards: ActivationShards | None = None

    @property
    def d_in(self) -> int:
        self.setup()
        return self.shards.d

    @property
    def meta(self) -> dict[str, Any]:
        """The cache's ``index.json`` (model, hook, tokens, ...)."""
        self.setup()
        return self.shards.index

    def setup(self, stage: str | None = None) -> None:
        if self.shards is not None:
            return
        if not Path(self.path).is_dir():
            raise FileNotFoundError(
                f"Activation folder {self.path} does not exist; write it first with "
                "`prisma predict --config configs/cache/<file>.yaml`."
            )
        self.shards = ActivationShards(self.path)
        blocks = self.shards.blocks(self.batch_size)
        if not blocks:
            raise ValueError(
                f"{self.path} holds {self.shards.n_rows} rows, fewer than one batch of {self.batch_size} per shard."
            )
        n_val = int(round(len(blocks) * self.val_fraction))
        self._train_blocks = blocks[: len(blocks) - n_val]
        self._val_blocks = blocks[len(blocks) - n_val :]
        if self.path_out is not None:
            out = ActivationShards(self.path_out)
            if [s["rows"] for s in out.shards] != [s["rows"] for s in self.shards.shards]:
                raise ValueError(f"{self.path_out} and {self.path} do not hold the same rows per shard.")
            self.shards_out = out

    def _loader(self, blocks: list[tuple[int, int, int]], shuffle: bool) -> ResumableLoader:
        self.setup()
        dataset = ActivationBlocks(self.shards, blocks, shuffle, self.seed, self.dtype)
        if self.path_out is not None:
            dataset = PairedActivationBlocks(dataset, self.shards_out)
        return ResumableLoader(dataset, num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self) -> ResumableLoader:
        return self._loader(self._train_blocks, self.shuffle)

    def val_dataloader(self) -> ResumableLoader | list:
        self.setup()
        return self._loader(self._val_blocks, False) if self._val_blocks else []

    def predict_dataloader(self) -> ResumableLoader:
        return self._loader(self._train_blocks, False)


class PairedActivationBlocks(ActivationBlocks):
    """(input rows, output rows) from two shard folders with identical layouts (transcoder training)."""

    def __init__(self, inner: ActivationBlocks, shards_out: ActivationShards) -> None:
        super().__init__(inner.shards, inner.blocks, inner.shuffle, inner.seed, "float32")
        self.dtype, self.shards_out = inner.dtype, shards_out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for i in self.epoch_order():
            yield self.read_block(self.shards, i), self.read_block(self.shards_out, i)
