"""`AtlasData`: the finished atlas in memory (what the export and the site are written from), and its helpers.

Also here: decoder-cosine nearest features, label purity, and how the atlas finds dSprites' generative factors
in a data module (duck-typed, so any data module with the same attributes works).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prisma_lightning.atlas.stats import FeatureAccumulator, hist_edges

DSPRITES_SHAPES = ("square", "ellipse", "heart")


@dataclass
class FactorSource:
    """Generative factors of the images of a dataset (e.g. dSprites' latent classes)."""

    names: list[str]
    """Factor names, e.g. ``["shape", "scale", "orientation", "posX", "posY"]``."""
    sizes: list[int]
    """Number of values of each factor."""
    value_names: list[list[str]]
    """Display name of every value of every factor."""
    classes: Callable[[np.ndarray], np.ndarray]
    """Dataset indices ``[n]`` -> factor classes ``[n, n_factors]`` (int64)."""
    source_index: Callable[[np.ndarray], np.ndarray]
    """Dataset indices -> index of the image in its source (e.g. the dSprites grid index)."""


def dsprites_factors(datamodule: Any, dataset: Any) -> FactorSource | None:
    """The factors of a dSprites-like dataset, or None.

    Works for a data module with ``grid.latents_classes(indices) -> [n, 6]`` (colour, shape, scale, orientation,
    posX, posY), ``grid.sizes`` and ``grid.values(name)`` (``DSpritesDataModule``) whose dataset keeps the grid
    index of each sample in ``indices``. The constant colour column is dropped.
    """
    grid = getattr(datamodule, "grid", None)
    indices = getattr(dataset, "indices", None)
    if grid is None or indices is None or not hasattr(grid, "latents_classes") or not hasattr(grid, "sizes"):
        return None
    indices = np.asarray(indices)
    names = ["shape", "scale", "orientation", "posX", "posY"]
    sizes = [int(s) for s in grid.sizes[1:]]
    value_names = [list(DSPRITES_SHAPES[: sizes[0]])]
    for name in names[1:]:
        value_names.append([f"{float(v):.3g}" for v in grid.values(name)])

    def classes(ids: np.ndarray) -> np.ndarray:
        return np.asarray(grid.latents_classes(indices[np.asarray(ids)]), dtype=np.int64)[:, 1:]

    return FactorSource(names, sizes, value_names, classes, lambda ids: indices[np.asarray(ids)])


def decoder_neighbours(directions: Tensor, n: int = 8, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """The ``n`` features with the most similar decoder direction (cosine), excluding the feature itself.

    Args:
        directions: ``[F, d]`` decoder rows.
        n: neighbours per feature (at most ``F - 1``).
        chunk: rows compared at once (memory ``chunk x F``).

    Returns:
        ``(indices [F, n] int64, cosines [F, n] float32)``, most similar first.
    """
    f = directions.shape[0]
    n = min(n, f - 1)
    unit = torch.nn.functional.normalize(directions.float(), dim=1)
    idx, cos = [], []
    for start in range(0, f, chunk):
        sim = unit[start : start + chunk] @ unit.T  # [c, F]
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        v, i = sim.topk(n, dim=1) if n > 0 else (sim[:, :0], rows[:, None][:, :0])
        idx.append(i), cos.append(v)
    return torch.cat(idx), torch.cat(cos)


@dataclass
class AtlasData:
    """Everything the export and the site need (CPU tensors; ``F`` features, ``k`` top images, ``P`` patches)."""

    meta: dict[str, Any]
    """Model, layer, token layout, counts, settings (written to ``atlas.json``)."""
    summary: dict[str, Tensor]
    """Per feature ``[F]`` float64: ``frac_nonzero``, ``frac_images``, ``mean_firing``, ``mean_all``, ``max``."""
    hist: Tensor
    """``[F, bins]`` int64 counts of firing activations per log-spaced bin."""
    hist_edges: Tensor
    """``[bins + 1]`` float64 bin edges."""
    top_scores: Tensor
    """``[F, k]`` float32 image scores of the top images, best first (0 in empty slots)."""
    top_ids: Tensor
    """``[F, k]`` int64 image ids (dataset indices), -1 in empty slots."""
    top_maps: Tensor
    """``[F, k, P]`` uint8 per-patch values relative to the image score (``255`` = the score)."""
    top_labels: Tensor
    """``[F, k]`` int64 labels of the top images (-1: none)."""
    label_names: list[str] | None = None
    """Display name of each label, when known."""
    factors: FactorSource | None = None
    """Generative factors of the images (dSprites), when known."""
    top_classes: Tensor | None = None
    """``[F, k, n_factors]`` int64 factor classes of the top images (-1 in empty slots)."""
    neighbours: tuple[Tensor, Tensor] | None = None
    """``(indices [F, n], cosines [F, n])`` nearest features by decoder cosine."""
    text: dict[str, Any] | None = None
    """CLIP: ``{"names", "pos": (index, cosine), "neg": (index, cosine)}`` from ``AtlasModule.text_similarity``."""
    ground_truth: dict[str, Any] | None = None
    """:func:`prisma_lightning.metrics.ground_truth.ground_truth_report` of the ground-truth images."""
    image_files: dict[int, str] = field(default_factory=dict)
    """Image id -> PNG path relative to the output folder (filled when images are written)."""

    @classmethod
    def from_accumulator(cls, acc: FeatureAccumulator, meta: dict[str, Any], **kwargs: Any) -> AtlasData:
        """Collect a (merged) accumulator's results; ``kwargs`` fill the optional fields."""
        scores, ids = acc.top()
        meta = {**meta, "n_images": int(acc.n_images), "n_tokens": int(acc.n_tokens), "top_k": acc.top_k}
        data = cls(
            meta=meta,
            summary=acc.summary(),
            hist=acc.hist.cpu(),
            hist_edges=hist_edges(acc.hist_bins, acc.hist_range),
            top_scores=scores.cpu(),
            top_ids=ids.cpu(),
            top_maps=acc.top_maps.cpu(),
            top_labels=acc.top_labels.cpu(),
            **kwargs,
        )
        if data.factors is not None and data.top_classes is None:
            flat = data.top_ids.reshape(-1)
            classes = np.full((flat.numel(), len(data.factors.names)), -1, dtype=np.int64)
            valid = (flat >= 0).numpy()
            if valid.any():
                classes[valid] = data.factors.classes(flat.numpy()[valid])
            data.top_classes = torch.from_numpy(classes).reshape(*data.top_ids.shape, -1)
        return data

    @property
    def d_sae(self) -> int:
        return self.top_ids.shape[0]

    def label_name(self, label: int) -> str | None:
        """Display name of a label (its number when no names are known); None for -1."""
        if label < 0:
            return None
        if self.label_names is not None and label < len(self.label_names):
            return self.label_names[label]
        return str(label)

    def label_counts(self) -> list[list[tuple[int, int]]]:
        """Per feature: ``(label, count)`` among its top images, most common first (ties: lower label)."""
        out = []
        for row in self.top_labels.tolist():
            counts: dict[int, int] = {}
            for label in row:
                if label >= 0:
                    counts[label] = counts.get(label, 0) + 1
            out.append(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return out

    def purity(self, counts: Sequence[Sequence[tuple[int, int]]] | None = None) -> list[float | None]:
        """Label purity per feature: share of its labelled top images with the most common label (None: none)."""
        counts = self.label_counts() if counts is None else counts
        return [c[0][1] / sum(n for _, n in c) if c else None for c in counts]

    def unique_image_ids(self) -> list[int]:
        """Every image id that appears in some top list, sorted."""
        ids = self.top_ids[self.top_ids >= 0]
        return sorted(set(ids.tolist()))

    def source_index(self, image_id: int) -> int | None:
        """The image's index in its source (e.g. the dSprites grid), when known."""
        if self.factors is None:
            return None
        return int(self.factors.source_index(np.asarray([image_id]))[0])
