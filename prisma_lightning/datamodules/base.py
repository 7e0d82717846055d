"""Pieces every prisma-lightning DataModule shares: loader options, seeded splits, and robust file datasets.

``PrismaDataModule`` holds the DataLoader options (batch size, workers, pinning, seed) and builds the four
loaders (predict = the validation split). Its train loader is resumable mid-epoch, bitwise: a
:class:`ResumableDataLoader` over a :class:`GlobalBatchSampler` (a seeded permutation per epoch, split across DDP
ranks) whose position Lightning keeps in checkpoints, reading through :class:`SeededSamples`, which runs each
sample's random draws (augmentations, random clips) under a seed that depends only on (seed, epoch, index).
``FileDataset`` is the base of the ImageNet and video datasets: a
file that cannot be decoded is skipped (the next readable sample is returned instead), counted, and reported
with a single warning; with ``on_bad='raise'`` it raises :class:`UnreadableFileError` naming the file. The
record of bad files lives in shared memory, so the count is right across DataLoader worker processes and
epochs.
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

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
    loader serves the validation split. The train loader is a :class:`ResumableDataLoader`: Lightning stores its
    position in every checkpoint, and a run resumed mid-epoch sees exactly the batches of an uninterrupted run.

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs (needs ``num_workers > 0``).
        seed: Seed of the splits, subsets, the training shuffle order and the training samples' randomness
            (random augmentations, random clip starts).
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
        """The loader of one split: a :class:`ResumableDataLoader` for ``train``, a plain DataLoader otherwise."""
        if dataset is None:
            raise RuntimeError(
                f"The {split} split of {type(self).__name__} is not set up; call `setup()` first "
                "(the Trainer does this for you)."
            )
        options: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }
        if split == "train":
            sampler = GlobalBatchSampler(dataset, self.batch_size, seed=self.seed, shuffle=shuffle, sample_seeds=True)
            return ResumableDataLoader(SeededSamples(dataset), sampler=sampler, **options)
        sampler = GlobalBatchSampler(dataset, self.batch_size, seed=self.seed, shuffle=shuffle)
        # A seeded generator makes each worker's base seed reproducible (and leaves the global RNG alone).
        return DataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(self.seed), **options)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The validation split, in order."""
        return self._loader(self.val_set, "validation", shuffle=False)


# ---------------------------------------------------------------------------------------------- seeds
_MASK64 = (1 << 64) - 1


def mix_seeds(seed: int, *values: np.ndarray | int) -> np.ndarray:
    """63-bit seeds that depend on ``seed`` and each of ``values`` (broadcast; splitmix64 mixing), e.g.
    ``mix_seeds(seed, epoch, indices)`` -> one seed per index. Returns a uint64 array (0-d for scalars)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, as the mixing intends
        h = _splitmix64(np.asarray(int(seed) & _MASK64, dtype=np.uint64))
        for value in values:
            v = np.asarray(value, dtype=np.int64).astype(np.uint64)
            h = _splitmix64(h ^ _splitmix64(v))
    return h >> np.uint64(1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@contextlib.contextmanager
def seeded_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed torch's CPU generator, Python's ``random`` and numpy's global RNG with ``seed`` for the block.

    With ``restore`` their previous states come back afterwards (numpy's costs ~0.3 ms; a DataLoader worker,
    whose every sample is seeded, can skip it). CUDA generators are not touched.
    """
    saved = (torch.default_generator.get_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.default_generator.manual_seed(int(seed))
    random.seed(int(seed))
    np.random.seed(int(seed) & 0xFFFFFFFF)
    try:
        yield
    finally:
        if saved is not None:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class SampleKey(NamedTuple):
    """What the training sampler yields: a dataset index and the seed of that sample's randomness."""

    index: int
    """Index into the dataset."""
    seed: int
    """``mix_seeds(seed, epoch, index)``: seeds every RNG while the sample is read."""


def transform_is_random(transform: Any) -> bool:
    """Whether a per-sample transform may draw random numbers: any transform unless it sets ``is_random = False``."""
    return transform is not None and bool(getattr(transform, "is_random", True))


class SeededSamples(Dataset):
    """The training loader's view of a dataset: ``SampleKey(index, seed)`` -> ``dataset[index]`` read with every
    RNG seeded by ``seed``, so random augmentations and random clips depend only on (seed, epoch, index).

    A plain int index reads the sample without seeding. A dataset whose ``is_random`` attribute is False is read
    without seeding (no cost); one with ``getitems_seeded(indices, seeds)`` reads a whole batch at once.

    Args:
        dataset: The map-style dataset to read.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (labels, n_bad, ...)
        if name == "dataset":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: SampleKey | int) -> Any:
        if not isinstance(key, tuple) or not getattr(self.dataset, "is_random", True):
            return self.dataset[key[0] if isinstance(key, tuple) else key]
        with seeded_rngs(key[1], restore=get_worker_info() is None):
            return self.dataset[key[0]]

    def __getitems__(self, keys: Sequence[SampleKey | int]) -> list[Any]:
        batched = getattr(self.dataset, "getitems_seeded", None)
        if batched is not None and all(isinstance(k, tuple) for k in keys):
            return batched([k[0] for k in keys], [k[1] for k in keys])
        return [self[k] for k in keys]


# ---------------------------------------------------------------------------------------------- sampling
class GlobalBatchSampler(DistributedSampler):
    """A seeded permutation per epoch, split so that DDP processes together see one process's batches.

    With ``W`` processes and a per-process ``batch_size`` B, global batch ``t`` is positions ``[tWB, (t+1)WB)`` of
    the epoch's permutation (``seed + epoch``) and rank ``r`` gets its ``r``-th slice of B. A run on ``W``
    processes with batch B therefore trains on exactly the batches of a one-process run with batch ``W * B``.
    Under DDP the last incomplete global batch is dropped so every rank takes the same number of steps.
    Lightning calls ``set_epoch`` and, since this is a ``DistributedSampler``, does not replace it.

    ``resume(epoch, position)`` makes the next iteration of that epoch start at ``position`` of its permutation
    (the samples all ranks together consumed), skipping the earlier indices without reading them.

    Args:
        dataset: The dataset (only its length is used).
        batch_size: Samples per batch of this process.
        seed: Seed of the permutations (and of the sample seeds).
        shuffle: Permute each epoch (False: dataset order).
        sample_seeds: Yield ``SampleKey(index, mix_seeds(seed, epoch, index))`` instead of plain indices, for
            :class:`SeededSamples`.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, sample_seeds: bool = False
    ) -> None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        rank = torch.distributed.get_rank() if dist else 0
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.sample_seeds = sample_seeds
        self._resume: tuple[int, int] | None = None
        self.epoch_was_set = False
        """Whether ``set_epoch`` was called since a :class:`ResumableDataLoader` last started an iteration."""
        self.iter_epoch, self.iter_start = 0, 0
        """Epoch and start position of the latest iteration."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.epoch_was_set = True

    @property
    def global_batch(self) -> int:
        """Samples per step over all processes."""
        return self.batch_size * self.num_replicas

    def epoch_end(self, start: int = 0) -> int:
        """Position in the permutation where an iteration that starts at ``start`` ends."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.num_replicas == 1:
            return max(n, start)
        return start + max(0, n - start) // self.global_batch * self.global_batch

    def start_position(self) -> int:
        """Where the next iteration will start: the resume position if it is for the current epoch, else 0."""
        if self._resume is not None and self._resume[0] == self.epoch:
            return self._resume[1]
        return 0

    def resume(self, epoch: int, position: int) -> None:
        """Continue ``epoch`` at ``position`` of its permutation on the next iteration (and set the epoch)."""
        self.set_epoch(epoch)
        self._resume = (epoch, position)

    def _order(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self) -> Iterator[int] | Iterator[SampleKey]:
        start = self.start_position()
        self._resume = None
        self.iter_epoch, self.iter_start = self.epoch, start
        order = self._order()[start:]
        if self.num_replicas == 1:
            mine = order
        else:
            global_batch = self.global_batch
            mine = []
            for first in range(0, len(order) // global_batch * global_batch, global_batch):
                first += self.rank * self.batch_size
                mine += order[first : first + self.batch_size]
        if not self.sample_seeds:
            return iter(mine)
        seeds = mix_seeds(self.seed, self.epoch, np.asarray(mine, dtype=np.int64)).tolist()
        return iter(list(map(SampleKey, mine, seeds)))

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.num_replicas == 1:
            return n
        return n // (self.batch_size * self.num_replicas) * self.batch_size


# ---------------------------------------------------------------------------------------------- resumable loader
class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`GlobalBatchSampler` whose position survives checkpoints.

    Lightning treats a train loader with ``state_dict`` / ``load_state_dict`` as stateful: the fit loop saves
    ``state_dict()`` in every checkpoint and, when resuming, calls ``load_state_dict`` before its first
    ``iter()``. The state is the epoch and the position in that epoch's permutation (samples consumed by all
    ranks together, counted from the batches this loader has handed out, not from what its workers prefetched),
    so every DDP rank resumes at the same global position. Resuming skips the consumed indices in the sampler,
    without reading them, continues the epoch's permutation, and the following epochs are those of an
    uninterrupted run. A checkpoint taken after an epoch's last batch resumes at the start of the next epoch.

    The epoch of an iteration is the sampler's: Lightning sets it (``set_epoch``) before each epoch. A loop that
    does not (one that just iterates again, like the online SAE's activation stream) gets the next epoch on each
    new ``iter()``, as if it had called ``set_epoch(previous + 1)``.

    Each ``iter()`` seeds ``generator`` with ``mix_seeds(seed, epoch)``, so the workers' base seeds depend only
    on (seed, epoch) (with ``persistent_workers`` the workers keep the seeds of the epoch they started in).
    Per-sample randomness does not depend on them: the sampler yields per-sample seeds (:class:`SeededSamples`).

    Args:
        dataset: The dataset, usually :class:`SeededSamples`.
        sampler: A :class:`GlobalBatchSampler` over it.
        **kwargs: Further DataLoader arguments (``batch_size``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: GlobalBatchSampler, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._counter = _BatchCounter()  # of the latest iterator (no reference to it: its workers stop when dropped)
        self._iterated = False

    @property
    def _yielded(self) -> int:
        """Batches handed out by the latest iterator."""
        return self._counter.batches

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if isinstance(sampler, GlobalBatchSampler):
            if self._iterated and not sampler.epoch_was_set:  # iterated again without set_epoch: the next epoch
                sampler.set_epoch(sampler.epoch + 1)
            sampler.epoch_was_set, self._iterated = False, True
            if self.generator is not None:
                self.generator.manual_seed(int(mix_seeds(sampler.seed, sampler.epoch)))
        self._counter = _BatchCounter()
        return _CountingIterator(super().__iter__(), self._counter)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "seed", "dataset_size"}``: where the next batch starts."""
        sampler = self.sampler
        if not isinstance(sampler, GlobalBatchSampler):  # replaced by Lightning (e.g. overfit_batches)
            return {}
        if self._yielded == 0:  # nothing read from the current iteration (or none started): what it will do
            epoch, position = sampler.epoch, sampler.start_position()
        else:  # the sampler has run for this iteration (before its first batch was handed out)
            epoch = sampler.iter_epoch
            consumed = sampler.iter_start + self._yielded * sampler.global_batch
            position = min(consumed, sampler.epoch_end(sampler.iter_start))
        if sampler.epoch_end(position) <= position:  # the epoch is complete: the next one starts from scratch
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": sampler.seed, "dataset_size": len(sampler.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` (from :meth:`state_dict`) left off, on this process's next ``iter()``."""
        sampler = self.sampler
        if not state or not isinstance(sampler, GlobalBatchSampler):
            return
        n = len(sampler.dataset)
        if state.get("dataset_size", n) != n or state.get("seed", sampler.seed) != sampler.seed:
            warnings.warn(
                f"Resuming a data loader saved with seed {state.get('seed')} over {state.get('dataset_size')} "
                f"samples, now seed {sampler.seed} over {n} samples: the resumed epoch is not the saved one. Resume "
                "with the data settings of the checkpoint's run for an exact continuation.",
                RuntimeWarning,
                stacklevel=2,
            )
        epoch, position = int(state["epoch"]), min(int(state["position"]), n)
        if sampler.epoch_end(position) <= position:
            epoch, position = epoch + 1, 0
        sampler.resume(epoch, position)
        self._counter = _BatchCounter()


class _BatchCounter:
    batches = 0


class _CountingIterator:
    """A DataLoader iterator that counts the batches it hands out (for :class:`ResumableDataLoader`'s state)."""

    def __init__(self, inner: Iterator[Any], counter: _BatchCounter) -> None:
        self._inner, self._counter = inner, counter

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._inner)
        self._counter.batches += 1
        return batch

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]


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
