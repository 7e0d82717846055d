"""`ActivationCacheModule`: ``prisma predict`` runs a frozen backbone and yields activations for shards.

Pair it with the :class:`~prisma_lightning.callbacks.ActivationWriter` callback, which writes what
``predict_step`` returns. Batches whose images are already on disk (a resumed run) are skipped without
running the backbone.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.activations import Tokens, select_tokens


class ActivationCacheModule(pl.LightningModule):
    """Frozen backbone -> ``{hook_name: rows [N, d]}`` per predict batch.

    Args:
        backbone: registry name (or a HookedViT object).
        hook_names: hooks to cache (each gets its own shard folder).
        tokens: which tokens to keep (``all``, ``cls``, ``patches``).
        pretrained_backbone: load pretrained weights (False: random weights, offline).
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        hook_names: list[str],
        tokens: Tokens = "all",
        pretrained_backbone: bool = True,
    ) -> None:
        super().__init__()
        if not hook_names:
            raise ValueError("hook_names is empty; name at least one hook, e.g. ['blocks.5.hook_resid_post'].")
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else [])
        if isinstance(backbone, str):
            from prisma_lightning.backbones import load_hooked_model

            backbone = load_hooked_model(backbone, pretrained=pretrained_backbone)
        self.backbone = backbone.eval().requires_grad_(False)
        self.backbone.resolve_hooks(list(hook_names))
        self.hook_names, self.tokens = list(hook_names), tokens
        self.skip_images = 0  # set by ActivationWriter when resuming
        self._images_seen = 0

    @property
    def tokens_per_image(self) -> int:
        from prisma_lightning.activations import tokens_per_image

        cfg = self.backbone.cfg
        return tokens_per_image(cfg.n_tokens, self.tokens, cfg.n_prefix_tokens)

    def setup(self, stage: str) -> None:
        from prisma_lightning.modules.sae_module import apply_backbone_transforms

        apply_backbone_transforms(self.trainer.datamodule if self._trainer is not None else None, self.backbone)

    def on_predict_start(self) -> None:
        self._images_seen = 0

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        n = images.shape[0]
        first, self._images_seen = self._images_seen, self._images_seen + n
        if first + n <= self.skip_images:
            return None  # already on disk
        images = images[max(0, self.skip_images - first) :]
        cfg = self.backbone.cfg
        with torch.no_grad():
            _, cache = self.backbone.run_with_cache(
                images, names_filter=self.hook_names, stop_at_layer=self.backbone.stop_layer_for_all(self.hook_names)
            )
        rows: dict[str, Tensor] = {
            h: select_tokens(cache[h], self.tokens, cfg.n_prefix_tokens, has_cls=cfg.class_token)
            for h in self.hook_names
        }
        return {"activations": rows, "n_images": images.shape[0]}
