"""Pieces every prisma-lightning DataModule shares: loader options, seeded splits, and robust file datasets.

``PrismaDataModule`` holds the DataLoader options (batch size, workers, pinning, seed) and builds the four
loaders (predict = the validation split). ``FileDataset`` is the base of the ImageNet and video datasets: a
file that cannot be decoded is skipped (the next readable sample is returned instead), counted, and reported
with a single warning; with ``on_bad='raise'`` it raises :class:`UnreadableFileError` naming the file. The
record of bad files lives in shared memory, so the count is right across DataLoader worker processes and
epochs.
"""

from __future__ import annotations

import abc
import multiprocessing
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

OnBad = Literal["skip", "raise"]


class UnreadableFileError(RuntimeError):
    """A data file could not be decoded (and ``on_bad_image`` / ``on_bad_video`` is ``'raise'``)."""


# ---------------------------------------------------------------------------------------------- validation
def check_positive(name: str, value: int, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless both fractions are in [0, 1) and leave something to train on."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 so that training data remains, got "
            f"{val_fraction} + {test_fraction}; lower one of them."
        )


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


# ---------------------------------------------------------------------------------------------- splits
def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for ``n`` items; val and test are rounded, train gets the rest."""
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    return n - n_val - n_test, n_val, n_test


def seeded_split(
    n: int, val_fraction: float, test_fraction: float, seed: int, subset_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / val / test index arrays over ``range(n)``, the same for the same ``seed``.

    ``subset_size`` first draws that many indices without replacement (a seeded random subset of the data).
    """
    rng = np.random.default_rng(seed)
    if subset_size is not None:
        if subset_size > n:
            raise ValueError(f"subset_size={subset_size} is larger than the dataset ({n} items); lower it.")
        order = rng.choice(n, size=subset_size, replace=False)
    else:
        order = rng.permutation(n)
    n_train, n_val, _ = split_counts(len(order), val_fraction, test_fraction)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def seeded_limit(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` of ``n`` items (all of them when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# ---------------------------------------------------------------------------------------------- DataModule
class PrismaDataModule(LightningDataModule):
    """LightningDataModule with the loader options shared by all prisma-lightning datasets.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in ``setup``. The predict
    loader serves the validation split.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs (needs ``num_workers > 0``).
        seed: Seed of the splits, subsets and the training shuffle order.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive("batch_size", batch_size)
        check_positive("num_workers", num_workers, minimum=0)
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0; set num_workers or drop the flag.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    accepts_backbone_transforms: bool = False
    """Whether a module may replace this data module's transforms with its backbone's ``preprocess()``."""

    def use_transforms(self, train: Any, val: Any) -> None:
        """Replace the per-sample transforms (e.g. by a backbone's ``preprocess()``), also on built datasets.

        Called by ``SAEModule`` / ``ActivationCacheModule`` for data modules that set
        ``accepts_backbone_transforms`` and were given no transform of their own.
        """
        for attr, value in (("train_transform", train), ("val_transform", val), ("transform", val)):
            if hasattr(self, attr):
                setattr(self, attr, value)
        for dataset, value in ((self.train_set, train), (self.val_set, val), (self.test_set, val)):
            if dataset is not None and hasattr(dataset, "transform"):
                dataset.transform = value

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"The {split} split of {type(self).__name__} is not set up; call `setup()` first "
                "(the Trainer does this for you)."
            )
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=GlobalBatchSampler(dataset, self.batch_size, seed=self.seed, shuffle=shuffle),
            num_workers=self.num_workers,
            pin_memory=pin,
            persistent_workers=self.persistent_workers,
            # A seeded generator makes each worker's base seed reproducible.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split, in order."""
        return self._loader(self.val_set, "validation", shuffle=False)


# ---------------------------------------------------------------------------------------------- sampling
class GlobalBatchSampler(DistributedSampler):
    """A seeded permutation per epoch, split so that DDP processes together see one process's batches.

    With ``W`` processes and a per-process ``batch_size`` B, global batch ``t`` is positions ``[tWB, (t+1)WB)`` of
    the epoch's permutation (``seed + epoch``) and rank ``r`` gets its ``r``-th slice of B. A run on ``W``
    processes with batch B therefore trains on exactly the batches of a one-process run with batch ``W * B``.
    Under DDP the last incomplete global batch is dropped so every rank takes the same number of steps.
    Lightning calls ``set_epoch`` and, since this is a ``DistributedSampler``, does not replace it.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        rank = torch.distributed.get_rank() if dist else 0
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self):
        order = self._order()
        if self.num_replicas == 1:
            return iter(order)
        global_batch = self.batch_size * self.num_replicas
        mine: list[int] = []
        for start in range(0, len(order) // global_batch * global_batch, global_batch):
            first = start + self.rank * self.batch_size
            mine += order[first : first + self.batch_size]
        return iter(mine)

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.num_replicas == 1:
            return n
        return n // (self.batch_size * self.num_replicas) * self.batch_size


# ---------------------------------------------------------------------------------------------- bad files
class _BadFileFlags:
    """One byte per file (1 = unreadable) plus a 'warned' byte, in memory shared with DataLoader workers.

    A ``RawArray`` travels to forked and spawned workers alike; pickled any other way (a deepcopy) it becomes a
    fresh array holding a copy of the flags.
    """

    def __init__(self, n: int) -> None:
        self._n = n
        self._array = multiprocessing.RawArray("b", n + 1)

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing.context import get_spawning_popen

        if get_spawning_popen() is not None:  # being sent to a new worker process: share the memory
            return {"n": self._n, "array": self._array}
        return {"n": self._n, "copy": bytes(self.view())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._n = state["n"]
        if "array" in state:
            self._array = state["array"]
        else:
            self._array = multiprocessing.RawArray("b", self._n + 1)
            self._array[:] = list(state["copy"])

    def view(self) -> np.ndarray:
        return np.frombuffer(self._array, dtype=np.int8)

    def is_bad(self, i: int) -> bool:
        return bool(self._array[i])

    def mark(self, i: int) -> bool:
        """Flag file ``i``; True when this is the first bad file seen by any process (time to warn).

        Lock-free: two workers failing at the very same instant could both warn, which is harmless.
        """
        self._array[i] = 1
        if self._array[self._n]:
            return False
        self._array[self._n] = 1
        return True


class FileDataset(Dataset, abc.ABC):
    """Map-style dataset over files, some of which may be unreadable.

    Subclasses implement ``decode(index)`` (may raise one of ``decode_errors``) and ``finish(raw, index)`` (the
    transform; its errors are never swallowed). With ``on_bad='skip'`` a sample whose file fails is replaced by
    the next readable sample (cyclically), the file is recorded in ``bad_files`` and one warning is issued per
    run; with ``on_bad='raise'`` :class:`UnreadableFileError` names the file.

    Args:
        files: The file of each file index.
        on_bad: ``'skip'`` or ``'raise'``, see above.
        kind: Word used in messages (``'image'``, ``'video'``).
        option: Name of the user-facing option, quoted in messages.
    """

    decode_errors: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, SyntaxError)

    def __init__(self, files: Sequence[str], on_bad: OnBad = "skip", kind: str = "file", option: str = "on_bad"):
        check_choice(option, on_bad, ("skip", "raise"))
        self.files = list(files)
        self.on_bad = on_bad
        self.kind = kind
        self.option = option
        self._bad = _BadFileFlags(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def file_index(self, index: int) -> int:
        """The file behind sample ``index`` (identity unless a file yields several samples)."""
        return index

    @abc.abstractmethod
    def decode(self, index: int) -> Any:
        """Read and decode one file (may raise the errors listed in ``decode_errors``)."""

    @abc.abstractmethod
    def finish(self, raw: Any, index: int) -> Any:
        """Turn a decoded file into the sample (transform, label)."""

    @property
    def n_bad(self) -> int:
        """How many files were found unreadable so far (over all worker processes)."""
        return int(self._bad.view()[: len(self.files)].sum())

    @property
    def bad_files(self) -> list[str]:
        """The files found unreadable so far."""
        flags = self._bad.view()[: len(self.files)]
        return [self.files[i] for i in np.flatnonzero(flags)]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for a dataset of {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            f = self.file_index(i)
            if self._bad.is_bad(f):
                continue
            try:
                raw = self.decode(i)
            except self.decode_errors as err:
                if self.on_bad == "raise":
                    raise UnreadableFileError(
                        f"Cannot read {self.kind} {self.files[f]}: {type(err).__name__}: {err}. Replace or delete "
                        f"the file, or pass {self.option}='skip' to skip unreadable {self.kind}s."
                    ) from err
                if self._bad.mark(f):
                    warnings.warn(
                        f"Skipping unreadable {self.kind} {self.files[f]} ({type(err).__name__}: {err}). Further "
                        f"unreadable {self.kind}s are skipped without a warning; their count is the dataset's "
                        f"`n_bad` (pass {self.option}='raise' to stop at the first one).",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            return self.finish(raw, i)
        raise UnreadableFileError(
            f"All {len(self.files)} {self.kind} files of this dataset are unreadable (first: {self.files[0]})."
        )
