"""ImageNet (or any image-folder dataset) for fitting, validating and predicting on real images.

Layouts under ``root``:

* ``train/<synset>/*.JPEG`` and ``val/<synset>/*.JPEG`` (torchvision ``ImageFolder`` layout);
* the flat Kaggle layout for validation: ``val/`` holds the JPEGs themselves and ``LOC_val_solution.csv``
  (``ImageId,PredictionString``; the first token of the prediction string is the synset) gives the labels. It is
  looked for in ``root`` and up to three folders above it (Kaggle keeps it beside ``ILSVRC/``), or given as
  ``val_solution``.

Classes are the synsets in sorted order: those of ``LOC_synset_mapping.txt`` (lines ``n01440764 tench, Tinca
tinca``; found like the csv, or given as ``synset_mapping``) when present, else the training folder names (else
the validation folders / the csv's synsets). ``class_names`` is the first name of each mapping line, or the
folder names. The test split is the validation split (ImageNet's test labels are not public), as is predict.

Every image becomes RGB: mode L / P / CMYK are converted, RGBA / LA / transparent palettes are composited over
white, 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled to 8 bits (``v * 255 / 65535``, rounded) and
float images (``F``) are read as [0, 1] (or [0, 255] when their maximum exceeds 1). A file that cannot be
decoded is skipped (the next image is served in its place), counted in ``n_bad_images`` and reported by a
single warning; ``on_bad_image='raise'`` raises instead, naming the file.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from prisma_lightning.datamodules.base import (
    FileDataset,
    OnBad,
    PrismaDataModule,
    check_choice,
    check_positive,
    seeded_limit,
    transform_is_random,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_image_transform(resize: int = 256, crop: int = 224) -> Callable[[Any], Any]:
    """Resize the shorter side to ``resize``, centre-crop ``crop``, float [0, 1], ImageNet normalisation."""
    import torch
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(crop),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    transform.is_random = False  # the training loader need not seed it
    return transform


def to_rgb(img: Any) -> Any:
    """Convert a PIL image of any mode to an 8-bit RGB PIL image (see the module docstring for the rules)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        else:  # I;16 / I;16B / I;16L / I: 16-bit samples (a 16-bit PNG), scaled rather than clipped
            arr = arr * (255.0 / 65535.0)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str) -> Any:
    """Decode an image file fully (so truncation is detected here) and convert it to RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _find_upwards(start: Path, name: str, levels: int = 3) -> Path | None:
    for folder in [start, *list(start.parents)[:levels]]:
        if (folder / name).is_file():
            return folder / name
    return None


def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` -> {synset: first class name}."""
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            synset, _, names = line.partition(" ")
            if not names:
                raise ValueError(f"{path}:{line_no}: expected '<synset> <name>, <name>...', got {line!r}.")
            mapping[synset] = names.split(",")[0].strip()
    return mapping


def read_val_solution(path: str | os.PathLike) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> {image id: synset} (the first token of ``PredictionString``)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns ImageId,PredictionString, got {reader.fieldnames}.")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader if row["PredictionString"]}


def scan_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], list[int]]:
    """(files, labels) of an ImageFolder tree; every class folder must hold at least one image."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders; expected <class>/<image> files (ImageFolder).")
    if class_to_idx is not None:
        unknown = [c for c in classes if c not in class_to_idx]
        if unknown:
            raise ValueError(
                f"{folder} has class folders {unknown[:5]} that are not among the {len(class_to_idx)} known classes "
                "(from the synset mapping or the training folders); remove them or fix the mapping."
            )
    else:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in classes:
        names = sorted(e.name for e in os.scandir(folder / c) if e.is_file() and _is_image(e.name))
        if not names:
            raise ValueError(
                f"Class folder {folder / c} contains no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                "add its images or remove the folder."
            )
        files += [str(folder / c / n) for n in names]
        labels += [class_to_idx[c]] * len(names)
    return files, labels


class ImageFileDataset(FileDataset):
    """(transform(RGB PIL image), label) over image files; unreadable files are skipped or raise (``on_bad``)."""

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        transform: Callable[[Any], Any] | None = None,
        on_bad: OnBad = "skip",
    ) -> None:
        super().__init__(files, on_bad, kind="image", option="on_bad_image")
        from PIL import Image

        self.decode_errors = (*FileDataset.decode_errors, Image.DecompressionBombError)
        self.labels, self.transform = list(labels), transform

    @property
    def is_random(self) -> bool:
        """Whether reading a sample draws random numbers (only a random transform does)."""
        return transform_is_random(self.transform)

    def decode(self, index: int) -> Any:
        return load_rgb(self.files[index])

    def finish(self, raw: Any, index: int) -> tuple[Any, int]:
        return (self.transform(raw) if self.transform is not None else raw), self.labels[index]


class ImageNetDataModule(PrismaDataModule):
    """ImageNet-style image folders (see the module docstring for the layouts, labels and image conversion).

    Args:
        root: Folder holding ``train_dir`` and ``val_dir``.
        train_dir: Training images, one subfolder per class (needed for fitting only).
        val_dir: Validation images: one subfolder per class, or the flat Kaggle layout (JPEGs + csv).
        val_solution: ``LOC_val_solution.csv`` for a flat ``val_dir``; None looks for it in ``root`` and above.
        synset_mapping: ``LOC_synset_mapping.txt``; None looks for it in ``root`` and above (optional).
        train_transform: Callable on each training image (an RGB PIL image); None: resize 256, centre crop 224,
            float tensor, ImageNet normalisation. Pass ``backbone.preprocess(train=True)`` for augmentation (the
            training loader seeds its random draws per image from ``seed``, the epoch and the image index).
        val_transform: Callable on each validation image; None: the same default as for training.
        limit_train: Use a seeded random subset of this many training images (None: all).
        limit_val: Use a seeded random subset of this many validation images (None: all).
        on_bad_image: ``skip`` unreadable images (counted in ``n_bad_images``, one warning) or ``raise``.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the ``limit_*`` subsets and of the shuffle order.
    """

    accepts_backbone_transforms = True

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        val_solution: str | None = None,
        synset_mapping: str | None = None,
        train_transform: Callable[[Any], Any] | None = None,
        val_transform: Callable[[Any], Any] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        on_bad_image: OnBad = "skip",
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        check_choice("on_bad_image", on_bad_image, ("skip", "raise"))
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val)):
            if value is not None:
                check_positive(name, value)
        self.save_hyperparameters(ignore=["train_transform", "val_transform"])
        self.root = Path(root).expanduser()
        self.train_path, self.val_path = self.root / train_dir, self.root / val_dir
        self.val_solution, self.synset_mapping = val_solution, synset_mapping
        self.train_transform = train_transform if train_transform is not None else default_image_transform()
        self.val_transform = val_transform if val_transform is not None else default_image_transform()
        self.limit_train, self.limit_val, self.on_bad_image = limit_train, limit_val, on_bad_image
        self._classes: tuple[list[str], list[str]] | None = None

    # ------------------------------------------------------------------ classes
    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"ImageNet root {self.root} does not exist; expected a folder with {self.train_path.name}/ and "
                f"{self.val_path.name}/ (one subfolder per class, or flat JPEGs + LOC_val_solution.csv)."
            )

    def _mapping_file(self) -> Path | None:
        if self.synset_mapping is not None:
            path = Path(self.synset_mapping).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"synset_mapping {path} does not exist.")
            return path
        return _find_upwards(self.root, "LOC_synset_mapping.txt")

    def _solution_file(self) -> Path:
        if self.val_solution is not None:
            path = Path(self.val_solution).expanduser()
        else:
            path = _find_upwards(self.root, "LOC_val_solution.csv") or self.root / "LOC_val_solution.csv"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.val_path} holds images but no class subfolders, so it needs the label file "
                f"LOC_val_solution.csv; none was found at {path} (nor in {self.root} and the three folders above). "
                "Pass val_solution=<path to LOC_val_solution.csv>."
            )
        return path

    def _val_is_flat(self) -> bool:
        return not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(self.val_path))

    def _resolve_classes(self) -> tuple[list[str], list[str]]:
        """(synsets in label order, class names)."""
        if self._classes is None:
            self._check_root()
            mapping_file = self._mapping_file()
            if mapping_file is not None:
                mapping = read_synset_mapping(mapping_file)
                synsets = sorted(mapping)
                self._classes = (synsets, [mapping[s] for s in synsets])
            else:
                if self.train_path.is_dir():
                    folder = self.train_path
                elif self.val_path.is_dir() and not self._val_is_flat():
                    folder = self.val_path
                else:
                    folder = None
                if folder is not None:
                    synsets = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
                elif self.val_path.is_dir():
                    synsets = sorted(set(read_val_solution(self._solution_file()).values()))
                else:
                    raise FileNotFoundError(
                        f"Neither {self.train_path} nor {self.val_path} exists; expected ImageFolder subfolders."
                    )
                self._classes = (synsets, list(synsets))
        return self._classes

    @property
    def synsets(self) -> list[str]:
        """Class ids (synsets or folder names) in label order."""
        return self._resolve_classes()[0]

    @property
    def class_names(self) -> list[str]:
        """Human-readable name of each class, in label order."""
        return self._resolve_classes()[1]

    @property
    def num_classes(self) -> int:
        return len(self.synsets)

    @property
    def n_bad_images(self) -> int:
        """Unreadable images skipped so far in the train and validation splits."""
        return sum(d.n_bad for d in (self.train_set, self.val_set) if isinstance(d, FileDataset))

    # ------------------------------------------------------------------ splits
    def _val_samples(self, class_to_idx: dict[str, int]) -> tuple[list[str], list[int]]:
        if not self.val_path.is_dir():
            raise FileNotFoundError(
                f"Validation folder {self.val_path} does not exist; expected one subfolder per class or the flat "
                "Kaggle layout (JPEGs + LOC_val_solution.csv). Set val_dir if it has another name."
            )
        if not self._val_is_flat():
            return scan_image_folder(self.val_path, class_to_idx)
        solution = read_val_solution(self._solution_file())
        files, labels = [], []
        for name in sorted(n for n in os.listdir(self.val_path) if _is_image(n)):
            synset = solution.get(Path(name).stem)
            if synset is None:
                continue  # an image without a label (e.g. from the test set) is not used
            if synset not in class_to_idx:
                raise ValueError(f"{self._solution_file()}: synset {synset!r} of {name} is not a known class.")
            files.append(str(self.val_path / name))
            labels.append(class_to_idx[synset])
        if not files:
            raise FileNotFoundError(
                f"No image in {self.val_path} is listed in {self._solution_file()}; expected files named "
                "<ImageId>.JPEG for the ImageIds of the csv."
            )
        return files, labels

    def _subset(self, files: list[str], labels: list[int], limit: int | None) -> tuple[list[str], list[int]]:
        keep = seeded_limit(len(files), limit, self.seed)
        return [files[i] for i in keep], [labels[i] for i in keep]

    def setup(self, stage: str | None = None) -> None:
        synsets, _ = self._resolve_classes()
        class_to_idx = {s: i for i, s in enumerate(synsets)}
        if stage in (None, "fit") and self.train_set is None:
            if not self.train_path.is_dir():
                raise FileNotFoundError(
                    f"Training folder {self.train_path} does not exist; expected one subfolder per class. Set "
                    "train_dir if it has another name."
                )
            files, labels = self._subset(*scan_image_folder(self.train_path, class_to_idx), self.limit_train)
            self.train_set = ImageFileDataset(files, labels, self.train_transform, self.on_bad_image)
        if self.val_set is None:
            files, labels = self._subset(*self._val_samples(class_to_idx), self.limit_val)
            self.val_set = ImageFileDataset(files, labels, self.val_transform, self.on_bad_image)
            self.test_set = self.val_set
