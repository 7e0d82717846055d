"""`TorchvisionDataModule`: MNIST and CIFAR-10 from a local torchvision root, for training small ViTs.

The official training set is split (seeded) into train and validation; the official test set is the test split.
Images become float tensors ``[C, H, W]``, optionally resized, repeated to 3 channels (MNIST) and normalised with
the dataset's channel statistics. Nothing is downloaded unless ``download=True``; a missing dataset raises
``FileNotFoundError`` naming the folder that was searched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from prisma_lightning.datamodules.base import (
    PrismaDataModule,
    check_choice,
    check_fractions,
    check_positive,
    seeded_split,
    transform_is_random,
)

Name = Literal["MNIST", "CIFAR10"]

_INFO: dict[str, dict[str, Any]] = {
    # native size, channels, mean, std, where torchvision keeps the files under root
    "MNIST": {"size": 28, "channels": 1, "mean": (0.1307,), "std": (0.3081,), "folder": "MNIST/raw"},
    "CIFAR10": {
        "size": 32,
        "channels": 3,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "folder": "cifar-10-batches-py",
    },
}
CLASS_NAMES = {
    "MNIST": [str(i) for i in range(10)],
    "CIFAR10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


class RepeatChannels:
    """``[1, H, W]`` -> ``[channels, H, W]`` (a picklable transform, so DataLoader workers can receive it)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.expand(self.channels, -1, -1).contiguous() if image.shape[0] != self.channels else image


class TransformedSubset(Dataset):
    """``(transform(image), label)`` for ``indices`` of a torchvision dataset that has no transform of its own."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], Any] | None) -> None:
        self.base, self.indices, self.transform = base, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def is_random(self) -> bool:
        """Whether reading a sample draws random numbers (only a random transform does)."""
        return transform_is_random(self.transform)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[int(self.indices[i])]
        return (self.transform(image) if self.transform is not None else image), int(label)


class TorchvisionDataModule(PrismaDataModule):
    """MNIST or CIFAR-10 read by ``torchvision.datasets`` from ``root``.

    Args:
        name: ``MNIST`` (28x28 grayscale digits) or ``CIFAR10`` (32x32 colour images); 10 classes each.
        root: Folder torchvision reads (and, with ``download``, writes) the dataset in: ``<root>/MNIST/raw`` or
            ``<root>/cifar-10-batches-py``.
        download: Download the dataset into ``root`` when it is missing (needs network).
        val_fraction: Fraction of the official training set held out for validation.
        subset_size: Use a seeded random subset of this many training-set images (before the validation split).
        image_size: Side of the returned images; None keeps the native size (28 or 32).
        channels: 1 or 3 (MNIST repeated to RGB); None keeps the native channels.
        normalize: Subtract the dataset's channel mean and divide by its standard deviation.
        augment: Random crop with padding (and horizontal flips for CIFAR-10) on training images.
        transform: Replaces the built-in transform (PIL image -> tensor) for every split when given.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the subset, the validation split and the shuffle order.
    """

    def __init__(
        self,
        name: Name = "MNIST",
        root: str = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        subset_size: int | None = None,
        image_size: int | None = None,
        channels: Literal[1, 3] | None = None,
        normalize: bool = True,
        augment: bool = False,
        transform: Callable[[Any], Any] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        check_choice("name", name, tuple(_INFO))
        check_fractions(val_fraction, 0.0)
        if channels is not None:
            check_choice("channels", channels, (1, 3))
        if image_size is not None:
            check_positive("image_size", image_size)
        if subset_size is not None:
            check_positive("subset_size", subset_size)
        self.save_hyperparameters(ignore=["transform"])
        self.name, self.root, self.download = name, Path(root).expanduser(), download
        self.val_fraction, self.subset_size = val_fraction, subset_size
        self._image_size, self._channels = image_size, channels
        self.normalize, self.augment, self.transform = normalize, augment, transform

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[self.name])

    @property
    def image_size(self) -> int:
        return self._image_size or _INFO[self.name]["size"]

    @property
    def channels(self) -> int:
        return self._channels or _INFO[self.name]["channels"]

    # ------------------------------------------------------------------ transforms
    def build_transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        """PIL image -> float ``[C, H, W]``: to tensor, resize, channel repeat, (augment), normalise."""
        from torchvision.transforms import v2

        info = _INFO[self.name]
        steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if self.image_size != info["size"]:
            steps.append(v2.Resize([self.image_size, self.image_size], antialias=True))
        if train and self.augment:
            steps.append(v2.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)))
            if self.name == "CIFAR10":
                steps.append(v2.RandomHorizontalFlip())
        mean, std = info["mean"], info["std"]
        if self.channels != info["channels"]:
            steps.append(RepeatChannels(self.channels))
            mean, std = mean * self.channels, std * self.channels
        if self.normalize:
            steps.append(v2.Normalize(mean=list(mean), std=list(std)))
        transform = v2.Compose(steps)
        transform.is_random = train and self.augment  # the training loader seeds only random transforms
        return transform

    # ------------------------------------------------------------------ data
    def _dataset(self, train: bool, download: bool) -> Dataset:
        import torchvision

        cls = getattr(torchvision.datasets, self.name)
        try:
            return cls(str(self.root), train=train, download=download)
        except RuntimeError as err:
            if "not found" not in str(err).lower():
                raise
            raise FileNotFoundError(
                f"{self.name} was not found under root={str(self.root)!r} (torchvision looks for "
                f"{self.root / _INFO[self.name]['folder']}). Pass download=true (--data.init_args.download=true) "
                f"on a machine with network to fetch it into that root, or set root to a folder that already "
                f"holds {self.name}."
            ) from err

    def prepare_data(self) -> None:
        """Download both splits into ``root`` (rank 0 only) when ``download`` is set."""
        if self.download:
            for train in (True, False):
                self._dataset(train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_base = self._dataset(True, download=False)
        test_base = self._dataset(False, download=False)
        train_idx, val_idx, _ = seeded_split(len(train_base), self.val_fraction, 0.0, self.seed, self.subset_size)
        train_tf = self.transform or self.build_transform(train=True)
        eval_tf = self.transform or self.build_transform(train=False)
        self.train_set = TransformedSubset(train_base, train_idx, train_tf)
        self.val_set = TransformedSubset(train_base, val_idx, eval_tf)
        self.test_set = TransformedSubset(test_base, np.arange(len(test_base)), eval_tf)
