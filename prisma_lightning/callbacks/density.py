"""`FeatureDensityLogger`: feature firing-rate histograms, dead / dense counts and top-activating patches.

Every ``every_n_steps`` SAE steps the callback watches the next ``n_batches`` training steps: it re-encodes the rows
each SAE trained on with the SAE in eval mode (no side effects on its training state) and accumulates the firing
counts in a :class:`~prisma_lightning.metrics.FeatureFiring` metric (summed over DDP ranks). In online mode it then
runs ``n_batches`` image batches (validation images, or training images without a validation set) through the
backbone and keeps the ``top_k_patches`` highest-activating image patches of a few features. Then it logs

- ``density/log10_firing_rate``: histogram of ``log10(firing rate)`` (never-fired features at -10),
- ``density/dead_count`` (rate < ``dead_below``), ``density/dense_count`` (rate > ``dense_above``),
  ``density/alive_pct``: scalars, to every logger,
- ``density/top_patches``: one grid row per feature, its top patches left to right (online mode only),

through TensorBoard (``add_histogram`` / ``add_image``) and Weights & Biases (``wandb.Histogram`` / ``wandb.Image``),
and writes ``top_patches_step<N>.png`` and the latest ``sparsity.safetensors`` into ``<log_dir>/feature_density/``
(atomically). In a multi-SAE run every tag and folder gets the SAE's name: ``density/<name>/...``,
``feature_density/<name>/``.

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
        self.stats_by_sae: dict[str, dict[str, Tensor]] = {}
        """The last measurement: SAE name -> firing statistics."""
        self.grids_by_sae: dict[str, Tensor | None] = {}
        """The last top-patch grid of each SAE ``[3, H, W]`` (None in cached mode)."""
        self._firing: dict[str, FeatureFiring] | None = None
        self._batches = 0
        self._chosen: dict[str, list[int]] = {}
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
        self._observe(pl_module, batch)
        self._batches += 1
        if self._batches >= self.n_batches:
            self._finish(trainer, pl_module)

    # ------------------------------------------------------------------ measuring
    def _start(self, pl_module: pl.LightningModule) -> None:
        saes = _saes(pl_module)
        for name, sae in saes.items():
            if self.features and not all(0 <= f < sae.d_sae for f in self.features):
                raise ValueError(f"features={self.features} must be feature ids in [0, d_sae={sae.d_sae}) ({name}).")
        self._firing = {
            name: FeatureFiring(sae.d_sae, self.dead_below, self.dense_above).to(pl_module.device)
            for name, sae in saes.items()
        }
        self._batches = 0

    @torch.no_grad()
    def encode(self, sae: Any, x: Tensor) -> Tensor:
        """Dense features ``[n, d_sae]`` of ``x [n, d_in]`` in eval mode (the SAE's training state is untouched)."""
        was_training = sae.training
        sae.eval()
        try:
            return sae.encode(x)
        finally:
            sae.train(was_training)

    def _rows(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, Tensor]:
        """The training rows of every hook group in this batch (the SAE step's rows online)."""
        groups = getattr(pl_module, "groups", None)
        if isinstance(batch, dict) and groups and set(batch) <= set(groups):
            return batch
        if hasattr(pl_module, "rows_from_batch") and not getattr(pl_module, "online", False):
            if not groups:
                pl_module.groups = pl_module.build_groups()
            return pl_module.rows_from_batch(batch)
        return {"*": batch}

    def _observe(self, pl_module: pl.LightningModule, batch: Any) -> None:
        rows = self._rows(pl_module, batch)
        for name, sae in _saes(pl_module).items():
            key = pl_module.group_of(name).key if hasattr(pl_module, "group_of") and "*" not in rows else "*"
            with _stepping(pl_module, name):
                x = pl_module.split(rows[key])[0] if hasattr(pl_module, "split") else rows[key]
            for chunk in x.split(self.chunk_size):  # chunks bound the dense [chunk, d_sae] features
                self._firing[name].update(self.encode(sae, chunk))

    def _grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Tensor | None:
        """Top-activating patches of a few features of SAE ``name`` over ``n_batches`` image batches (validation
        images, or training images without a validation set)."""
        if not (self.top_features and getattr(pl_module, "online", False) and not self._no_grid):
            return None
        sae = pl_module.saes[name] if hasattr(pl_module, "saes") else pl_module.sae
        group = pl_module.group_of(name)
        chosen = torch.tensor(self.features, dtype=torch.long) if self.features else None
        top_values = top_tiles = None
        for i, batch in enumerate(_image_batches(trainer, pl_module)):
            if i >= self.n_batches:
                break
            rows = pl_module.rows_from_images(_to_device(batch, pl_module.device))[group.key]
            with _stepping(pl_module, name):
                x = pl_module.split(rows)[0]
            feats = torch.cat([self.encode(sae, chunk) for chunk in x.split(self.chunk_size)])
            if chosen is None:  # the features that peak highest on the first batch
                peak = feats.amax(0)
                n = min(self.top_features, int((peak > 0).sum()))
                if n == 0:
                    return None
                chosen = peak.topk(n).indices.cpu()
            acts = feats[:, chosen.to(feats.device)]
            images = batch[0] if isinstance(batch, list | tuple) else batch
            k = min(self.top_k_patches, acts.shape[0])
            values, picks = acts.topk(k, dim=0)  # [k, F]
            tiles = self.tiles(pl_module.backbone, images, picks.t().reshape(-1).cpu(), acts.shape[0])
            if tiles is None:
                self._no_grid = True  # the token layout is unknown: stop trying for this run
                return None
            values = values.t().cpu().float()
            tiles = tiles.view(len(chosen), k, *tiles.shape[1:])
            if top_values is not None:
                values, tiles = torch.cat([top_values, values], 1), torch.cat([top_tiles, tiles], 1)
            keep = values.topk(min(self.top_k_patches, values.shape[1]), dim=1).indices
            top_values, top_tiles = values.gather(1, keep), tiles[torch.arange(len(chosen))[:, None], keep]
        self._chosen[name] = chosen.tolist() if chosen is not None else []
        return None if top_tiles is None else self.make_grid(top_tiles)

    def make_grid(self, top_tiles: Tensor) -> Tensor:
        """The top-patch grid ``[3, H, W]`` in [0, 1], one row per feature (features with fewer hits: black)."""
        from torchvision.utils import make_grid

        n_feats, k = top_tiles.shape[:2]
        tiles = torch.zeros(n_feats, self.top_k_patches, *top_tiles.shape[2:])
        tiles[:, :k] = top_tiles
        return make_grid(tiles.flatten(0, 1), nrow=self.top_k_patches, normalize=True, scale_each=True, padding=2)

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
        firing, self._firing = self._firing, None
        stats = {name: metric.compute() for name, metric in firing.items()}  # all-gathers under DDP: every rank
        self.last_step = trainer.global_step
        self.stats_by_sae = {n: {k: v.detach().cpu() for k, v in st.items()} for n, st in stats.items()}
        self._chosen = {}
        grids = {name: self._grid(trainer, pl_module, name) if trainer.is_global_zero else None for name in stats}
        self.grids_by_sae = grids
        if trainer.is_global_zero:
            for name in stats:
                self.write_logs(trainer, self.stats_by_sae[name], grids[name], None if len(stats) == 1 else name)

    @property
    def last_stats(self) -> dict[str, Tensor] | None:
        """The last measurement of a single-SAE run."""
        stats = getattr(self, "stats_by_sae", None)
        return next(iter(stats.values())) if stats and len(stats) == 1 else None

    @property
    def last_grid(self) -> Tensor | None:
        grids = getattr(self, "grids_by_sae", None)
        return next(iter(grids.values())) if grids and len(grids) == 1 else None

    def write_logs(
        self, trainer: pl.Trainer, stats: dict[str, Tensor], grid: Tensor | None, name: str | None = None
    ) -> None:
        """Send the histogram, scalars and grid to every logger and write the PNG and sparsity file (rank 0)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        log10 = stats["log10_density"].float()
        prefix = "density/" if name is None else f"density/{name}/"
        hist_tag = HISTOGRAM_TAG if name is None else f"{prefix}log10_firing_rate"
        image_tag = IMAGE_TAG if name is None else f"{prefix}top_patches"
        scalars = {
            f"{prefix}dead_count": float(stats["dead_count"]),
            f"{prefix}dense_count": float(stats["dense_count"]),
            f"{prefix}alive_pct": float(stats["alive_pct"]),
        }
        features = self._chosen.get(name or next(iter(self._chosen), ""), []) if self._chosen else []
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(hist_tag, log10, step)
                if grid is not None:
                    logger.experiment.add_image(image_tag, grid, step)
            elif isinstance(logger, WandbLogger):
                import wandb

                payload: dict[str, Any] = {hist_tag: wandb.Histogram(log10.numpy()), "trainer/global_step": step}
                if grid is not None:
                    payload[image_tag] = wandb.Image(grid.permute(1, 2, 0).numpy(), caption=f"features {features}")
                logger.experiment.log(payload)
        folder = self.folder or Path(trainer.default_root_dir) / "feature_density"
        if name is not None:
            folder = folder / name
        from prisma_lightning.sae import save_sparsity
        from prisma_lightning.utils import atomic_write_text, save_image_atomic

        save_sparsity(folder, log10)
        if grid is not None and self.save_png:
            save_image_atomic(grid, folder / f"top_patches_step{step:07d}.png")
            atomic_write_text(
                folder / f"top_patches_step{step:07d}.txt",
                "Rows, top to bottom: features " + ", ".join(map(str, features)) + "\n",
            )


def _saes(pl_module: Any) -> dict[str, Any]:
    saes = getattr(pl_module, "saes", None)
    return dict(saes.items()) if saes is not None else {"sae": pl_module.sae}


def _stepping(pl_module: Any, name: str) -> Any:
    import contextlib

    stepping = getattr(pl_module, "stepping", None)
    if callable(stepping) and getattr(pl_module, "saes", None) is not None and getattr(pl_module, "groups", None):
        return stepping(name)
    return contextlib.nullcontext()


def _image_batches(trainer: pl.Trainer, pl_module: Any) -> Any:
    from prisma_lightning.callbacks.evaluator import _validation_loaders

    try:
        loaders = _validation_loaders(trainer)
    except Exception:  # noqa: BLE001 (no validation data: use the training images)
        loaders = None
    loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
    if loader is None or isinstance(loader, list | tuple):
        loader = pl_module._train_source()
    return iter(loader)


def _to_device(batch: Any, device: torch.device) -> Any:
    from prisma_lightning.callbacks.evaluator import _to_device as move

    return move(batch, device)
