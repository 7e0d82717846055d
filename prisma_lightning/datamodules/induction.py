"""ViT-Prisma's synthetic "induction" datasets, generated deterministically in memory.

Three variants (``variant=``), each with pixels identical to ViT-Prisma's generators for the same configuration:

``induction`` (4 classes, 32x32): two small shapes (circle, vertical line, X, diagonal; 5x5 px each) whose
centres are 7 px apart, side by side or one above the other. The task needs comparing two shapes at a
distance, the visual analogue of an induction head. Labels (ViT-Prisma's order)::

    0 vertical-same   1 vertical-different   2 horizontal-same   3 horizontal-different

``polygenic`` (12 classes, 64x64): four shapes in a row (7 px apart) drawn from two shape types A != B, in one
of six same/different patterns; ``label = pattern + 6 * vertical`` with patterns::

    0 AAAA   1 ABAB   2 ABBA   3 AABB   4 ABBB   5 AAAB

(``horizontal`` 0-5, ``vertical`` 6-11, read along the row left to right or down the column). The pattern is the
equality structure of the four shapes, so every label is fully determined by the image and none by a single
shape. (ViT-Prisma's code names the flag the other way round; the labels of its images are the same.)

``circle`` (60 classes, 32x32): the mod-60 addition task. A white image with 60 black dots on a circle
(radius 15.5 px about (16, 16), at angles ``6 * k`` degrees, k = 0..59); the dots at ``a`` and ``b`` (``a < b``)
are grey (128) instead, and the label is ``(a + b) mod 60``. Angles are measured from the +x (column) axis
towards +y (down the rows).

Every variant enumerates all its distinct images; the splits are drawn from them without overlap, balanced over
the classes (each class gets ``n // num_classes`` images, the first ``n % num_classes`` classes one more) and seeded
by ``seed``. ``n_val`` and ``n_test`` default to 10 % of the largest balanced pool (induction 6,528 images,
polygenic 35,328, circle 1,740; rounded down to whole images per class) and ``n_train`` to the rest of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from prisma_lightning.datamodules.base import PrismaDataModule, check_choice, check_positive, transform_is_random

Variant = Literal["induction", "polygenic", "circle"]
SHAPE_NAMES = ("circle", "line", "x", "diagonal")
PATTERNS = ("AAAA", "ABAB", "ABBA", "AABB", "ABBB", "AAAB")
OFFSET = 7
"""Distance in pixels between the centres of neighbouring shapes."""
CIRCLE_STEPS = 60
CIRCLE_RADIUS = 15.5
CIRCLE_CENTRE = 16.0


def _stamps() -> np.ndarray:
    """[4, 5, 5] bool: the shapes, centred on pixel (2, 2)."""
    r, c = np.mgrid[-2:3, -2:3]
    circle = r**2 + c**2 <= 4
    line = c == 0
    cross = (r == c) | (r == -c)
    diagonal = r == c
    return np.stack([circle, line, cross, diagonal])


STAMPS = _stamps()


def class_names(variant: Variant) -> list[str]:
    """Name of each class of ``variant``, in label order."""
    check_choice("variant", variant, ("induction", "polygenic", "circle"))
    if variant == "induction":
        return ["vertical-same", "vertical-different", "horizontal-same", "horizontal-different"]
    if variant == "polygenic":
        return [f"{arrangement}-{p}" for arrangement in ("horizontal", "vertical") for p in PATTERNS]
    return [str(s) for s in range(CIRCLE_STEPS)]


# ---------------------------------------------------------------------------------------------- configurations
def enumerate_configs(variant: Variant) -> dict[str, np.ndarray]:
    """Every distinct image of ``variant`` as arrays of equal length.

    ``label`` [n]; for the shape variants ``rows`` / ``cols`` [n, m] (centre of each of the m shapes, in the
    returned image), ``shapes`` [n, m] (index into ``SHAPE_NAMES``) and ``transpose`` [n] (the shapes are drawn
    transposed, as ViT-Prisma draws them by transposing the whole image); for ``circle`` ``a`` and ``b`` [n].
    """
    check_choice("variant", variant, ("induction", "polygenic", "circle"))
    if variant == "circle":
        a, b = np.triu_indices(CIRCLE_STEPS, k=1)
        return {"a": a, "b": b, "label": (a + b) % CIRCLE_STEPS}
    records: list[tuple[bool, tuple[int, ...], int, int]] = []  # (transpose, shapes, row0, col0)
    label: list[int] = []
    if variant == "induction":
        # ViT-Prisma: A at (row a, col b), B at (a, b + 7), a in [4, 28), b in [4, 21); vertical = transposed.
        n_obj, step_rows = 2, False
        for t in (True, False):
            for a in range(4, 28):
                for b in range(4, 21):
                    for sa in range(4):
                        for sb in range(4):
                            records.append((t, (sa, sb), a, b))
                            label.append((0 if sa == sb else 1) + (0 if t else 2))
    else:
        # ViT-Prisma: shapes at (a + 7k, b), a in [9, 25), b in [9, 55) on 64x64; transposed = horizontal.
        n_obj, step_rows = 4, True
        for t in (True, False):
            for p_idx, pat in enumerate(PATTERNS):
                pairs = (
                    [(s, s) for s in range(4)] if p_idx == 0 else [(x, y) for x in range(4) for y in range(4) if x != y]
                )
                for sa, sb in pairs:
                    shapes = tuple(sa if ch == "A" else sb for ch in pat)
                    for a in range(9, 25):
                        for b in range(9, 55):
                            records.append((t, shapes, a, b))
                            label.append(p_idx + (0 if t else 6))
    transpose = np.array([r[0] for r in records])
    shapes = np.array([r[1] for r in records], dtype=np.int64)
    row0 = np.array([r[2] for r in records])[:, None]
    col0 = np.array([r[3] for r in records])[:, None]
    steps = np.arange(n_obj)[None, :] * OFFSET
    # Canonical (untransposed) frame: a column of shapes (polygenic) or a row of shapes (induction).
    r_can = row0 + steps if step_rows else np.repeat(row0, n_obj, 1)
    c_can = np.repeat(col0, n_obj, 1) if step_rows else col0 + steps
    rows_img = np.where(transpose[:, None], c_can, r_can)
    cols_img = np.where(transpose[:, None], r_can, c_can)
    return {"rows": rows_img, "cols": cols_img, "shapes": shapes, "transpose": transpose, "label": np.array(label)}


def render_config(variant: Variant, configs: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Image ``i`` of ``configs`` as uint8 [H, W]: shapes 1 on 0 (induction, polygenic); for ``circle`` 255
    background, 0 dots, 128 for the two marked dots."""
    if variant == "circle":
        img = np.full((32, 32), 255, dtype=np.uint8)
        rr, cc = circle_dot_pixels()
        img[rr, cc] = 0
        img[rr[[configs["a"][i], configs["b"][i]]], cc[[configs["a"][i], configs["b"][i]]]] = 128
        return img
    size = 32 if variant == "induction" else 64
    img = np.zeros((size, size), dtype=np.uint8)
    for r, c, s in zip(configs["rows"][i], configs["cols"][i], configs["shapes"][i], strict=True):
        stamp = STAMPS[s].T if configs["transpose"][i] else STAMPS[s]
        img[r - 2 : r + 3, c - 2 : c + 3] |= stamp
    return img


def circle_dot_pixels() -> tuple[np.ndarray, np.ndarray]:
    """(rows [60], cols [60]) of the circle's dots; dot k sits at angle 6k degrees (truncated, as PIL does)."""
    angles = np.radians(np.arange(CIRCLE_STEPS) * (360 / CIRCLE_STEPS))
    cols = (CIRCLE_CENTRE + CIRCLE_RADIUS * np.cos(angles)).astype(np.int64)
    rows = (CIRCLE_CENTRE + CIRCLE_RADIUS * np.sin(angles)).astype(np.int64)
    return rows, cols


def balanced_splits(labels: np.ndarray, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Disjoint index arrays of the given ``sizes``, each balanced over the classes of ``labels``."""
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    quotas, offset = [], 0
    for n in sizes:  # the remainder's extra images go to different classes in successive splits
        quotas.append([n // num_classes + ((c - offset) % num_classes < n % num_classes) for c in range(num_classes)])
        offset += n % num_classes
    smallest = min(len(p) for p in pools)
    if any(sum(q[c] for q in quotas) > len(pools[c]) for c in range(num_classes)):
        raise ValueError(
            f"n_train + n_val + n_test = {sum(sizes)} is more than this variant's {num_classes * smallest} distinct "
            f"class-balanced images ({smallest} per class); lower the split sizes."
        )
    out, start = [], [0] * num_classes
    for quota in quotas:
        parts = []
        for c in range(num_classes):
            parts.append(pools[c][start[c] : start[c] + quota[c]])
            start[c] += quota[c]
        out.append(rng.permutation(np.concatenate(parts)))
    return out


# ---------------------------------------------------------------------------------------------- dataset
class InductionDataset(Dataset):
    """(image float [C, H, W] in [0, 1], label) for the chosen configurations, rendered on request."""

    def __init__(
        self,
        variant: Variant,
        configs: dict[str, np.ndarray],
        indices: np.ndarray,
        channels: int = 1,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.variant, self.configs, self.indices = variant, configs, np.asarray(indices)
        self.channels, self.transform = channels, transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.configs["label"][self.indices]

    @property
    def is_random(self) -> bool:
        """Whether reading a sample draws random numbers (only a random transform does)."""
        return transform_is_random(self.transform)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        j = int(self.indices[i])
        img = torch.from_numpy(render_config(self.variant, self.configs, j)).float()
        if self.variant == "circle":
            img = img / 255.0
        img = img.unsqueeze(0).expand(self.channels, -1, -1).contiguous()
        return (self.transform(img) if self.transform is not None else img), int(self.configs["label"][j])


class InductionDataModule(PrismaDataModule):
    """ViT-Prisma's induction (4 classes), polygenic induction (12) and circle mod-60 (60) datasets.

    See the module docstring for the images and the exact label of each class (also ``class_names``).

    Args:
        variant: ``induction`` (32x32, 4 classes), ``polygenic`` (64x64, 12 classes) or ``circle`` (32x32,
            60 classes: (a + b) mod 60).
        n_train: Training images (distinct, class-balanced); None: the balanced pool less val and test.
        n_val: Validation images; None: 10 % of the pool.
        n_test: Test images; None: 10 % of the pool.
        channels: 1 (grayscale) or 3 (the channel repeated, for RGB backbones).
        transform: Callable applied to each image (float [C, H, W] in [0, 1]), e.g. a backbone's
            ``preprocess()``; None returns the image as is.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the split (which images land in which split) and of the shuffle order.
    """

    def __init__(
        self,
        variant: Variant = "induction",
        n_train: int | None = None,
        n_val: int | None = None,
        n_test: int | None = None,
        channels: Literal[1, 3] = 1,
        transform: Callable[[torch.Tensor], Any] | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        check_choice("variant", variant, ("induction", "polygenic", "circle"))
        check_choice("channels", channels, (1, 3))
        for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value is not None:
                check_positive(name, value, minimum=0)
        self.save_hyperparameters(ignore=["transform"])
        self.variant, self.channels, self.transform = variant, channels, transform
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test

    @property
    def num_classes(self) -> int:
        return len(class_names(self.variant))

    @property
    def class_names(self) -> list[str]:
        return class_names(self.variant)

    @property
    def image_size(self) -> int:
        return 64 if self.variant == "polygenic" else 32

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        configs = enumerate_configs(self.variant)
        counts = np.bincount(configs["label"], minlength=self.num_classes)
        per_class = int(counts.min())
        n_eval = int(0.1 * per_class) * self.num_classes  # default val / test size, a multiple of num_classes
        sizes = (
            self.n_train if self.n_train is not None else per_class * self.num_classes - 2 * n_eval,
            self.n_val if self.n_val is not None else n_eval,
            self.n_test if self.n_test is not None else n_eval,
        )
        splits = balanced_splits(configs["label"], sizes, self.seed)
        self.train_set, self.val_set, self.test_set = (
            InductionDataset(self.variant, configs, idx, self.channels, self.transform) for idx in splits
        )
