"""`AtlasWriter`: accumulates what ``AtlasModule.predict_step`` returns into the feature atlas and writes it.

One streaming pass (``prisma predict``): every batch's features go into a
:class:`~prisma_lightning.atlas.FeatureAccumulator` (memory ``O(d_sae x top_k)``; Lightning is told not to
keep the per-batch outputs). At the end the ranks' accumulators are merged (all-gather; sums added, top-k lists
merged), and rank 0 writes into ``output_dir``: the top images, ``features.jsonl``, ``atlas.json``,
``ground_truth.json`` (dSprites-like data) and the static site.

Patch maps are stored compactly during the pass (uint8 per patch, relative to the image's score) for the top-k
candidates only; no second pass over the data is needed.

Resuming: every ``save_every_n_batches`` batches each rank saves its accumulator atomically to
``output_dir/.atlas_state/rank<r>-of-<world>.pt``. A run started again with the same settings loads it and skips
the batches it holds (the module returns None for them); the result equals an uninterrupted run. The state files
are deleted once the atlas is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from prisma_lightning.atlas import (
    AtlasData,
    FeatureAccumulator,
    all_gather_merge,
    decoder_neighbours,
    dsprites_factors,
    write_images,
    write_json,
    write_jsonl,
    write_site,
)
from prisma_lightning.utils import atomic_path


class AtlasWriter(BasePredictionWriter):
    """Builds the feature atlas of an :class:`~prisma_lightning.modules.AtlasModule` over the predict data.

    Args:
        output_dir: folder that receives the atlas (created; must not be the SAE's folder).
        top_k: top-activating images kept per feature.
        hist_bins: bins of the per-feature activation histogram.
        hist_range: ``(lo, hi)`` log10 range of the histogram bins (shared by all features; activations outside
            are counted in the first / last bin).
        save_every_n_batches: save the resumable state every this many batches (0: never).
        neighbours: nearest features by decoder cosine listed per feature.
        text_top: closest class names per feature (CLIP with ``AtlasModule(zero_shot=...)``).
        ground_truth: evaluate against the data's generative factors: ``auto`` when the data module provides them
            (dSprites), ``on`` (fail without them) or ``off``.
        ground_truth_images: images (those with dataset index below this) whose feature scores are kept for the
            ground-truth metrics (memory ``ground_truth_images x d_sae`` floats); None: 10,000, fewer for SAEs
            wider than 6,553 features so that the kept scores stay within 2**26 floats (256 MB).
        site: write the HTML site and the images (False: only ``features.jsonl``, ``atlas.json`` and
            ``ground_truth.json``).
        image_size: longest side of the written images (smaller images are kept as they are).
        chunk_size: features per data file of the feature pages.
        title: page title.
        class_names: names of the labels (default: the data module's ``class_names`` when it has them).
    """

    def __init__(
        self,
        output_dir: str,
        top_k: int = 16,
        hist_bins: int = 64,
        hist_range: tuple[float, float] = (-4.0, 4.0),
        save_every_n_batches: int = 100,
        neighbours: int = 8,
        text_top: int = 5,
        ground_truth: Literal["auto", "on", "off"] = "auto",
        ground_truth_images: int | None = None,
        site: bool = True,
        image_size: int = 128,
        chunk_size: int = 128,
        title: str | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if ground_truth not in ("auto", "on", "off"):
            raise ValueError(f"ground_truth must be 'auto', 'on' or 'off', got {ground_truth!r}.")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        if save_every_n_batches < 0:
            raise ValueError(f"save_every_n_batches must be >= 0 (0: never), got {save_every_n_batches}.")
        self.output_dir = Path(output_dir).expanduser()
        self.top_k, self.hist_bins, self.hist_range = top_k, hist_bins, (float(hist_range[0]), float(hist_range[1]))
        self.save_every_n_batches, self.neighbours, self.text_top = save_every_n_batches, neighbours, text_top
        self.ground_truth, self.ground_truth_images = ground_truth, ground_truth_images
        self.site, self.image_size, self.chunk_size = site, image_size, chunk_size
        self.title, self.class_names = title, class_names
        self.acc: FeatureAccumulator | None = None
        self.batches_done = 0
        self.seconds = 0.0
        self._factors = None
        self._dataset = None
        self._batch_size = None
        self.data: AtlasData | None = None
        """The written atlas (rank 0, after the pass)."""

    # ------------------------------------------------------------------ setup
    def _gt_images(self, d_sae: int) -> int:
        if self.ground_truth_images is not None:
            return self.ground_truth_images
        return min(10_000, max(1, 2**26 // d_sae))

    def _state_file(self, trainer: pl.Trainer) -> Path:
        return self.output_dir / ".atlas_state" / f"rank{trainer.global_rank}-of-{trainer.world_size}.pt"

    def _fingerprint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "model": pl_module.describe(),
            "n_samples": len(self._dataset) if self._dataset is not None else None,
            "batch_size": self._batch_size,
            "world_size": trainer.world_size,
        }

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for method in ("layout", "describe", "display_images", "decoder_directions"):
            if not hasattr(pl_module, method):
                raise TypeError(
                    f"AtlasWriter needs an AtlasModule (or a module with {method!r}); got {type(pl_module).__name__}."
                )
        sae_dir = getattr(pl_module, "sae_source", None)
        if sae_dir and Path(sae_dir).exists():
            sae_dir = Path(sae_dir).resolve()
            out = self.output_dir.resolve()
            if out == sae_dir or sae_dir in out.parents:
                raise ValueError(
                    f"output_dir {self.output_dir} is inside the SAE folder {sae_dir}, which is an input and is "
                    "never written to; choose another output_dir."
                )
        # The atlas is the result: per-batch outputs are not collected (memory would grow with the data).
        trainer.predict_loop.return_predictions = False
        loader = trainer.predict_dataloaders
        if isinstance(loader, list | tuple):
            if len(loader) != 1:
                raise ValueError(f"AtlasWriter reads one predict dataloader, got {len(loader)}.")
            loader = loader[0]
        self._dataset = getattr(loader, "dataset", None)
        self._batch_size = getattr(loader, "batch_size", None)
        datamodule = getattr(trainer, "datamodule", None)
        self._factors = None
        if self.ground_truth != "off":
            self._factors = dsprites_factors(datamodule, self._dataset)
            if self._factors is None and self.ground_truth == "on":
                raise ValueError(
                    "ground_truth='on' needs data with generative factors (a DSpritesDataModule, or a data module "
                    "with grid.latents_classes and a dataset with indices); use ground_truth='auto' or 'off'."
                )
        layout = pl_module.layout
        self.acc = FeatureAccumulator(
            d_sae=pl_module.describe()["d_sae"], top_k=self.top_k, n_patches=layout.n_patches,
            patch_start=layout.patch_start, hist_bins=self.hist_bins, hist_range=self.hist_range,
            gt_images=self._gt_images(pl_module.describe()["d_sae"]) if self._factors is not None else 0,
            n_factors=len(self._factors.names) if self._factors is not None else 0, device=pl_module.device,
        )  # fmt: skip
        self.batches_done, self.seconds = 0, 0.0
        state_file = self._state_file(trainer)
        if state_file.is_file():
            state = torch.load(state_file, map_location="cpu", weights_only=True)
            if state["fingerprint"] != self._fingerprint(trainer, pl_module):
                raise ValueError(
                    f"{state_file} holds an unfinished atlas of another run ({state['fingerprint']}); delete "
                    f"{state_file.parent} or choose another output_dir."
                )
            self.acc.load_state_dict(state["accumulator"])
            self.batches_done = int(state["batches_done"])
        pl_module.skip_batches = self.batches_done

    # ------------------------------------------------------------------ per batch
    def write_on_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if prediction is None:
            return
        start = time.perf_counter()
        features, labels = prediction
        if batch_indices is None or len(batch_indices) != features.shape[0]:
            raise RuntimeError(
                "AtlasWriter needs the dataset index of every sample; Lightning provides them for DataLoaders "
                "with a batch sampler (predict with a plain torch DataLoader)."
            )
        ids = torch.as_tensor(list(batch_indices), dtype=torch.int64)
        classes = None
        if self._factors is not None and bool((ids < self.acc.gt_images).any()):
            classes = torch.from_numpy(self._factors.classes(ids.numpy()))
        self.acc.update(features, ids, labels, classes)
        self.batches_done = batch_idx + 1
        self.seconds += time.perf_counter() - start
        if self.save_every_n_batches and self.batches_done % self.save_every_n_batches == 0:
            self.save_state(trainer, pl_module)

    def save_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Save this rank's accumulator and progress atomically (called every ``save_every_n_batches``)."""
        path = self._state_file(trainer)
        state = {
            "accumulator": self.acc.state_dict(),
            "batches_done": self.batches_done,
            "fingerprint": self._fingerprint(trainer, pl_module),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path

    # ------------------------------------------------------------------ end
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = all_gather_merge(self.acc)
        if trainer.is_global_zero:
            self.write(acc, trainer, pl_module)
        trainer.strategy.barrier("atlas_written")
        state_file = self._state_file(trainer)
        if state_file.is_file():
            state_file.unlink()
        trainer.strategy.barrier("atlas_state_removed")
        if trainer.is_global_zero and state_file.parent.is_dir() and not any(state_file.parent.iterdir()):
            state_file.parent.rmdir()

    def _label_names(self, trainer: pl.Trainer) -> list[str] | None:
        if self.class_names is not None:
            return list(self.class_names)
        names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        return [str(n) for n in names] if names else None

    def _load_images(self, pl_module: pl.LightningModule) -> Any:
        dataset = self._dataset

        def load(ids: list[int]) -> torch.Tensor:
            if hasattr(dataset, "__getitems__"):
                samples = dataset.__getitems__(ids)
            else:
                samples = [dataset[i] for i in ids]
            images = [s[0] if isinstance(s, list | tuple) else s for s in samples]
            return pl_module.display_images(torch.stack([torch.as_tensor(x) for x in images]))

        return load

    def write(self, acc: FeatureAccumulator, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AtlasData:
        """Write the atlas of a merged accumulator into ``output_dir`` (rank 0)."""
        from prisma_lightning.metrics.ground_truth import ground_truth_report

        layout = pl_module.layout
        meta = {
            **pl_module.describe(),
            "patch_grid": list(layout.grid) if layout.n_patches else [0, 0, 0],
            "hist_range": list(self.hist_range),
            "score": "max over the tokens the SAE reads (the class token for tokens='cls')",
            "patch_values": "uint8 per patch token, 255 = the image score",
        }
        directions = pl_module.decoder_directions().cpu()
        text = pl_module.text_similarity(self.text_top) if hasattr(pl_module, "text_similarity") else None
        data = AtlasData.from_accumulator(
            acc, meta, label_names=self._label_names(trainer), factors=self._factors,
            neighbours=decoder_neighbours(directions, self.neighbours) if self.neighbours > 0 else None, text=text,
        )  # fmt: skip
        if self._factors is not None:
            scores, classes, ids = acc.ground_truth_rows()
            if scores.shape[0] > 0:
                factors = dict(zip(self._factors.names, self._factors.sizes, strict=True))
                data.ground_truth = ground_truth_report(
                    scores, classes, factors, ids=ids, top_classes=data.top_classes, top_k=acc.top_k
                )
                write_json(data.ground_truth, self.output_dir / "ground_truth.json")
        if self.site:
            write_images(data, self.output_dir, self._load_images(pl_module), self.image_size)
        write_jsonl(data, self.output_dir / "features.jsonl")
        summary = {key: value for key, value in data.meta.items()}
        summary["label_names"] = data.label_names
        summary["factors"] = (
            {n: v for n, v in zip(self._factors.names, self._factors.value_names, strict=True)}
            if self._factors is not None else None
        )  # fmt: skip
        summary["hist_edges"] = [float(e) for e in data.hist_edges.tolist()]
        summary["alive_features"] = int((acc.fire_tokens > 0).sum())
        write_json(summary, self.output_dir / "atlas.json")
        if self.site:
            index = write_site(data, self.output_dir, self.chunk_size, self.title)
            print(f"Feature atlas: {index}")
        self.data = data
        return data
