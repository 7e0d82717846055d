"""`FeatureDensityLogger`: feature firing-rate histograms, dead / dense counts and top-activating patches.

Every ``every_n_steps`` SAE steps the callback watches the next ``n_batches`` training batches: it re-encodes their
rows with the SAE in eval mode (no side effects on the SAE's training state), accumulates the firing counts in a
:class:`~prisma_lightning.metrics.FeatureFiring` metric (summed over DDP ranks) and, in online mode, keeps the
``top_k_patches`` highest-activating image patches of a few features. Then it logs

- ``density/log10_firing_rate``: histogram of ``log10(firing rate)`` (never-fired features at -10),
- ``density/dead_count`` (rate < ``dead_below``), ``density/dense_count`` (rate > ``dense_above``),
  ``density/alive_pct``: scalars, to every logger,
- ``density/top_patches``: one grid row per feature, its top patches left to right (online mode only),

through TensorBoard (``add_histogram`` / ``add_image``) and Weights & Biases (``wandb.Histogram`` / ``wandb.Image``),
and writes ``top_patches_step<N>.png`` and the latest ``sparsity.safetensors`` into ``<log_dir>/feature_density/``.

Token ``t`` of an image maps to a patch as in the backbone: prefix tokens (class token, registers) first, then
patches row-major (video: time-major tubelets, shown by their first frame). Rows of a pooled or class-token hook
map to the whole image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from prisma_lightning.metrics import FeatureFiring

log = logging.getLogger(__name__)

HISTOGRAM_TAG = "density/log10_firing_rate"
IMAGE_TAG = "density/top_patches"


class FeatureDensityLogger(pl.Callback):
    """Log feature densities and top-activating patches during SAE training (see the module docstring).

    Args:
        every_n_steps: measure at every multiple of this many SAE steps.
        n_batches: training batches each measurement reads.
        top_features: features shown in the patch grid (online mode; 0 disables the grid).
        top_k_patches: patches shown per feature.
        features: feature ids to show; default: the ``top_features`` features with the largest activation on the
            first batch of each measurement.
        dead_below: firing rates below this count as dead.
        dense_above: firing rates above this count as dense.
        tile_size: side in pixels of each grid tile (patches are upscaled, whole images downscaled).
        save_png: also write the grid as a PNG under ``<log_dir>/feature_density/``.
        chunk_size: rows per SAE encode (bounds the dense ``[chunk_size, d_sae]`` feature matrix).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        n_batches: int = 8,
        top_features: int = 8,
        top_k_patches: int = 16,
        features: list[int] | None = None,
        dead_below: float = 1e-8,
        dense_above: float = 1e-1,
        tile_size: int = 48,
        save_png: bool = True,
        chunk_size: int = 1024,
    ) -> None:
        if every_n_steps <= 0 or n_batches <= 0:
            raise ValueError(f"every_n_steps ({every_n_steps}) and n_batches ({n_batches}) must be positive.")
        if top_features < 0 or top_k_patches <= 0 or tile_size <= 0:
            raise ValueError(
                f"top_features ({top_features}) must be >= 0, top_k_patches ({top_k_patches}) and tile_size "
                f"({tile_size}) positive."
            )
        self.every_n_steps, self.n_batches = every_n_steps, n_batches
        self.top_features = len(features) if features else top_features
        self.top_k_patches, self.features = top_k_patches, list(features) if features else None
        self.dead_below, self.dense_above = dead_below, dense_above
        self.tile_size, self.save_png, self.chunk_size = tile_size, save_png, chunk_size
        self.folder: Path | None = None
        """Where the PNGs and ``sparsity.safetensors`` go: ``<log_dir>/feature_density`` (set in ``setup``)."""
        self.last_step = 0
        self.last_stats: dict[str, Tensor] | None = None
        self.last_grid: Tensor | None = None
        self._firing: FeatureFiring | None = None
        self._batches = 0
        self._chosen: Tensor | None = None  # [F] feature ids of the grid
        self._top_values: Tensor | None = None  # [F, K]
        self._top_tiles: Tensor | None = None  # [F, K, C, tile, tile]
        self._warned = self._no_grid = False

    # ------------------------------------------------------------------ schedule
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: resolve it here, on every rank, not in rank-0-only code.
        self.folder = Path(trainer.log_dir or trainer.default_root_dir) / "feature_density"

    def due(self, step: int) -> bool:
        return step > 0 and step // self.every_n_steps > self.last_step // self.every_n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", 0))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._firing is None:
            if not self.due(trainer.global_step):
                return
            self._start(pl_module)
        self._observe(trainer, pl_module, batch)
        self._batches += 1
        if self._batches >= self.n_batches:
            self._finish(trainer, pl_module)

    # ------------------------------------------------------------------ measuring
    def _start(self, pl_module: pl.LightningModule) -> None:
        d_sae = pl_module.sae.d_sae
        if self.features and not all(0 <= f < d_sae for f in self.features):
            raise ValueError(f"features={self.features} must be feature ids in [0, d_sae={d_sae}).")
        self._firing = FeatureFiring(d_sae, self.dead_below, self.dense_above).to(pl_module.device)
        self._batches = 0
        self._chosen = torch.tensor(self.features, dtype=torch.long) if self.features else None
        self._top_values = self._top_tiles = None

    @torch.no_grad()
    def encode(self, sae: Any, x: Tensor) -> Tensor:
        """Dense features ``[n, d_sae]`` of ``x [n, d_in]`` in eval mode (the SAE's training state is untouched)."""
        was_training = sae.training
        sae.eval()
        try:
            return sae.encode(x)
        finally:
            sae.train(was_training)

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        with torch.no_grad():
            rows = pl_module.activations(batch) if hasattr(pl_module, "activations") else batch
            x = pl_module.split(rows)[0] if hasattr(pl_module, "split") else rows
        sae = pl_module.sae
        online = getattr(pl_module, "online", False)
        grid = bool(trainer.is_global_zero and self.top_features and online and not self._no_grid)
        # Chunks bound the dense [chunk, d_sae] features; only the grid's columns [n, F] are kept.
        chunks = x.split(self.chunk_size)
        peak, columns = None, []
        for chunk in chunks:
            feats = self.encode(sae, chunk)
            self._firing.update(feats)
            if grid and self._chosen is None:
                peak = feats.amax(0) if peak is None else torch.maximum(peak, feats.amax(0))
            elif grid:
                columns.append(feats[:, self._chosen.to(feats.device)])
        if not grid:
            return
        if self._chosen is None:  # first batch of the measurement: show the features that peak highest on it
            n = min(self.top_features, int((peak > 0).sum()))
            if n == 0:
                return
            self._chosen = peak.topk(n).indices.cpu()
            columns = [self.encode(sae, chunk)[:, self._chosen.to(chunk.device)] for chunk in chunks]
        images = batch[0] if isinstance(batch, list | tuple) else batch
        self._update_top_patches(pl_module, images, torch.cat(columns))

    def _update_top_patches(self, pl_module: pl.LightningModule, images: Tensor, acts: Tensor) -> None:
        """Merge this batch's top patches into the running top ``top_k_patches``; ``acts [n_rows, F]``."""
        n_chosen = acts.shape[1]
        k = min(self.top_k_patches, acts.shape[0])
        values, rows = acts.topk(k, dim=0)  # [k, F]
        tiles = self.tiles(pl_module.backbone, images, rows.t().reshape(-1).cpu(), acts.shape[0])
        if tiles is None:
            self._no_grid = True  # the token layout is unknown: stop trying for this run
            return
        values = values.t().cpu().float()  # [F, k]
        tiles = tiles.view(n_chosen, k, *tiles.shape[1:])
        if self._top_values is not None:
            values = torch.cat([self._top_values, values], 1)
            tiles = torch.cat([self._top_tiles, tiles], 1)
        keep = values.topk(min(self.top_k_patches, values.shape[1]), dim=1).indices
        self._top_values = values.gather(1, keep)
        self._top_tiles = tiles[torch.arange(n_chosen)[:, None], keep]

    def tiles(self, backbone: Any, images: Tensor, rows: Tensor, n_rows: int) -> Tensor | None:
        """Image crops ``[len(rows), C, tile, tile]`` of the tokens behind feature rows ``rows`` (None: unknown layout).

        ``n_rows`` rows came from ``images`` (image-major), so each image contributes ``n_rows // B`` rows.
        """
        cfg = backbone.cfg
        images = images.detach().float().cpu()
        b = images.shape[0]
        video = images.ndim == 5  # [B, T, C, H, W]
        ph, pw = cfg.patch_size
        gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
        n_patches = gh * gw * (images.shape[1] // cfg.tubelet_size if video else 1)
        per_image = n_rows // b if n_rows % b == 0 else -1
        if per_image == 1:
            offset = None  # class token / pooled hook: the whole image
        elif per_image == n_patches:
            offset = 0
        elif per_image == n_patches + cfg.n_prefix_tokens:
            offset = cfg.n_prefix_tokens
        else:
            if not self._warned:
                log.warning(
                    "FeatureDensityLogger: %d rows for %d images do not match %d patches (+%d prefix tokens) per "
                    "image; the top-patch grid is skipped.", n_rows, b, n_patches, cfg.n_prefix_tokens,
                )  # fmt: skip
                self._warned = True
            return None
        out = []
        size = (self.tile_size, self.tile_size)
        for row in rows.tolist():
            image_idx, token = divmod(row, per_image)
            patch = -1 if offset is None else token - offset
            frames = images[image_idx]
            if patch < 0:  # a prefix token: the whole (first frame of the) image
                crop, mode = frames[0] if video else frames, "bilinear"
            else:
                t, p = divmod(patch, gh * gw)
                r, c = divmod(p, gw)
                frame = frames[t * cfg.tubelet_size] if video else frames
                crop, mode = frame[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw], "nearest"
            kw = {"antialias": True} if mode == "bilinear" else {}
            out.append(F.interpolate(crop[None], size=size, mode=mode, **kw)[0])
        return torch.stack(out)

    # ------------------------------------------------------------------ results
    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = self._firing.compute()  # all-gathers the counts under DDP: every rank must call it
        self._firing = None
        self.last_step = trainer.global_step
        self.last_stats = {k: v.detach().cpu() for k, v in stats.items()}
        grid = self.grid()
        self.last_grid = grid
        if trainer.is_global_zero:
            self.write_logs(trainer, self.last_stats, grid)

    def grid(self) -> Tensor | None:
        """The top-patch grid ``[3, H, W]`` in [0, 1] (one row per feature), or None when there is nothing to show."""
        if self._top_tiles is None:
            return None
        from torchvision.utils import make_grid

        n_feats, k = self._top_tiles.shape[:2]
        tiles = torch.zeros(n_feats, self.top_k_patches, *self._top_tiles.shape[2:])
        tiles[:, :k] = self._top_tiles  # features that fired on fewer rows keep black tiles
        return make_grid(tiles.flatten(0, 1), nrow=self.top_k_patches, normalize=True, scale_each=True, padding=2)

    def write_logs(self, trainer: pl.Trainer, stats: dict[str, Tensor], grid: Tensor | None) -> None:
        """Send the histogram, scalars and grid to every logger and write the PNG and sparsity file (rank 0)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        log10 = stats["log10_density"].float()
        scalars = {
            "density/dead_count": float(stats["dead_count"]),
            "density/dense_count": float(stats["dense_count"]),
            "density/alive_pct": float(stats["alive_pct"]),
        }
        features = self._chosen.tolist() if self._chosen is not None else []
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(HISTOGRAM_TAG, log10, step)
                if grid is not None:
                    logger.experiment.add_image(IMAGE_TAG, grid, step)
            elif isinstance(logger, WandbLogger):
                import wandb

                payload: dict[str, Any] = {HISTOGRAM_TAG: wandb.Histogram(log10.numpy()), "trainer/global_step": step}
                if grid is not None:
                    payload[IMAGE_TAG] = wandb.Image(grid.permute(1, 2, 0).numpy(), caption=f"features {features}")
                logger.experiment.log(payload)
        folder = self.folder or Path(trainer.default_root_dir) / "feature_density"
        from prisma_lightning.sae import save_sparsity

        save_sparsity(folder, log10)
        if grid is not None and self.save_png:
            from torchvision.utils import save_image

            save_image(grid, folder / f"top_patches_step{step:07d}.png")
            (folder / f"top_patches_step{step:07d}.txt").write_text(
                "Rows, top to bottom: features " + ", ".join(map(str, features)) + "\n"
            )
