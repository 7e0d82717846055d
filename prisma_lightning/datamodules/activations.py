"""`ActivationDataModule`: shuffled batches of cached activations, memory-mapped, DDP-sharded, resumable.

The rows of a hook folder are read as one sequence over its shards (rows were shuffled across images when each
shard was written). A batch is a contiguous block of ``batch_size`` rows of that sequence -- a block may span two
shards, and the last block holds the remainder, so **every row is used every epoch** -- and the order of the blocks
is a fresh seeded permutation every epoch, so reads stay sequential. ``batch_size`` is global: under DDP every rank
reads its own equal slice of each block.

Several hooks of one caching run (``hooks=[...]``, ``path`` = the cache root) are read in lockstep: the same blocks of
the same images in the same order, yielded as ``{hook: rows}`` -- what a multi-SAE run over several hooks needs. The
folders must hold the same row layout (the same shards, written by one ``prisma predict``), which is checked.
``path_out`` is the two-hook case of transcoders and yields ``(x, y)`` pairs.

The DataLoader is stateful: Lightning stores its position in checkpoints, so a run resumed from ``last.ckpt``
continues with exactly the next batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prisma_lightning.activations.shards import ActivationShards, hook_folder

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RowSequence:
    """The rows of a shard folder as one sequence: ``read(start, stop)`` reads across shard boundaries."""

    def __init__(self, shards: ActivationShards) -> None:
        self.shards = shards
        self.ends: list[int] = []
        total = 0
        for info in shards.shards:
            total += int(info["rows"])
            self.ends.append(total)

    @property
    def n_rows(self) -> int:
        return self.ends[-1] if self.ends else 0

    def read(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        i = bisect.bisect_right(self.ends, start)
        while start < stop:
            first = self.ends[i - 1] if i else 0
            end = min(stop, self.ends[i])
            parts.append(self.shards.read(i, start - first, end - first))
            start, i = end, i + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class ActivationBlocks(IterableDataset):
    """Yields blocks of one split in a per-epoch seeded order; under DDP each rank gets its slice of every block.

    ``blocks`` are ``(start, stop)`` global row ranges. ``batch_size`` is the global batch: with ``W`` processes each
    rank reads an equal ``1/W`` of each block, so a DDP run sees exactly the batches of a one-process run.
    """

    def __init__(
        self, sequences: dict[str, RowSequence], blocks: list[tuple[int, int]], shuffle: bool, seed: int, dtype: str,
        output: str = "tensor",
    ) -> None:  # fmt: skip
        self.sequences, self.blocks, self.shuffle, self.seed = sequences, blocks, shuffle, seed
        self.dtype = _DTYPES[dtype]
        self.output = output  # "tensor" (one hook), "pair" (x, y) or "dict" ({hook: rows})
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

    def read_block(self, i: int) -> Any:
        start, stop = self.rank_rows(*self.blocks[i])
        rows = {h: seq.read(start, stop).to(self.dtype) for h, seq in self.sequences.items()}
        if self.output == "tensor":
            return next(iter(rows.values()))
        if self.output == "pair":
            return tuple(rows.values())
        return rows

    def __iter__(self) -> Iterator[Any]:
        for i in self.epoch_order():
            yield self.read_block(i)


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

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
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
        path: a hook folder with ``index.json`` (``<cache root>/<hook_name>``); with ``hooks``, the cache root.
        batch_size: rows (tokens) per global batch (split evenly over DDP processes).
        val_fraction: fraction of the rows held out for validation (the last blocks, never shuffled in).
        shuffle: shuffle the block order every epoch (training split).
        seed: base seed of the block order.
        num_workers: DataLoader worker processes.
        dtype: dtype of the yielded batches (shards may be stored in float16).
        path_out: for transcoders, the folder of the output hook (same images, same order): batches are ``(x, y)``.
        hooks: several hooks of one cache (``<path>/<hook>`` each), read in lockstep: batches are ``{hook: rows}``.
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
        hooks: list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}.")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if hooks is not None and (not hooks or path_out is not None):
            raise ValueError("hooks must name at least one hook folder, and cannot be combined with path_out.")
        self.path, self.path_out, self.hooks = path, path_out, list(hooks) if hooks else None
        self.batch_size, self.val_fraction, self.shuffle = batch_size, val_fraction, shuffle
        self.seed, self.num_workers, self.dtype = seed, num_workers, dtype
        self.sequences: dict[str, RowSequence] | None = None

    @property
    def shards(self) -> ActivationShards:
        """The (first) hook folder's shards."""
        self.setup()
        return next(iter(self.sequences.values())).shards

    @property
    def d_in(self) -> int:
        return self.shards.d

    @property
    def meta(self) -> dict[str, Any]:
        """The cache's ``index.json`` (model, hook, tokens, ...)."""
        return self.shards.index

    def _folders(self) -> dict[str, Path]:
        if self.hooks:
            return {h: hook_folder(self.path, h) for h in self.hooks}
        folders = {"x": Path(self.path)}
        if self.path_out is not None:
            folders["y"] = Path(self.path_out)
        return folders

    def setup(self, stage: str | None = None) -> None:
        if self.sequences is not None:
            return
        sequences: dict[str, RowSequence] = {}
        for key, folder in self._folders().items():
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"Activation folder {folder} does not exist; write it first with "
                    "`prisma predict --config configs/cache/<file>.yaml`."
                )
            sequences[key] = RowSequence(ActivationShards(folder))
        first_key, first = next(iter(sequences.items()))
        layout = [s["rows"] for s in first.shards.shards]
        for key, seq in sequences.items():
            if [s["rows"] for s in seq.shards.shards] != layout:
                raise ValueError(
                    f"{self._folders()[key]} and {self._folders()[first_key]} do not hold the same rows per shard; "
                    "read together only hook folders written by the same caching run."
                )
            for field in ("tokens_per_image", "n_images", "shuffle_seed"):
                a, b = seq.shards.index.get(field), first.shards.index.get(field)
                if a is not None and b is not None and a != b:
                    raise ValueError(
                        f"{self._folders()[key]} has {field}={a!r} but {self._folders()[first_key]} has {b!r}: their "
                        "rows are not the same tokens in the same order."
                    )
        n_rows = first.n_rows
        if n_rows < self.batch_size:
            raise ValueError(
                f"{self.path} holds {n_rows} rows, fewer than one batch of {self.batch_size}; lower batch_size."
            )
        blocks = [(s, min(s + self.batch_size, n_rows)) for s in range(0, n_rows, self.batch_size)]
        n_val = int(round(len(blocks) * self.val_fraction))
        self._train_blocks = blocks[: len(blocks) - n_val]
        self._val_blocks = blocks[len(blocks) - n_val :]
        self.sequences = sequences

    def _loader(self, blocks: list[tuple[int, int]], shuffle: bool) -> ResumableLoader:
        self.setup()
        output = "dict" if self.hooks else "pair" if self.path_out is not None else "tensor"
        sequences = self.sequences if self.hooks else dict(self.sequences)
        dataset = ActivationBlocks(sequences, blocks, shuffle, self.seed, self.dtype, output)
        return ResumableLoader(dataset, num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        return self._loader(self._train_blocks, self.shuffle)

    def val_dataloader(self) -> ResumableLoader | list:
        self.setup()
        return self._loader(self._val_blocks, False) if self._val_blocks else []

    def predict_dataloader(self) -> ResumableLoader:
        self.setup()
        return self._loader(self._train_blocks, False)
