"""`TranscoderModule`: train a transcoder from one hook to another (e.g. an MLP's input to its output)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prisma_lightning.modules.sae_module import SAEModule
from prisma_lightning.sae import SAEOutput, Transcoder, TranscoderConfig


class TranscoderModule(SAEModule):
    """Like :class:`SAEModule`, with input rows from ``hook_name`` and targets from ``hook_name_out``.

    Typical pair: ``blocks.5.ln2.hook_normalized`` -> ``blocks.5.hook_mlp_out``. Online, both hooks come from
    one backbone pass; the mixing buffer stores input and target side by side so they stay paired. Cached, the
    data module yields ``(x, y)`` pairs (``ActivationDataModule(path=..., path_out=...)``).

    Args:
        sae: the transcoder config (or a Transcoder object).
        hook_name_out: target hook; defaults to ``sae.hook_name_out``.
        **kwargs: everything :class:`SAEModule` takes.
    """

    def __init__(self, sae: TranscoderConfig | Transcoder, hook_name_out: str | None = None, **kwargs: Any) -> None:
        super().__init__(sae, **kwargs)
        self.hook_name_out = hook_name_out or self.sae.cfg.hook_name_out
        if not self.hook_name_out:
            raise ValueError("A transcoder needs hook_name_out (the target hook), e.g. 'blocks.5.hook_mlp_out'.")

    def build_sae(self, sae: TranscoderConfig | Transcoder | dict[str, Any]) -> Transcoder:
        if isinstance(sae, dict):
            sae = TranscoderConfig.from_dict(sae)
        if isinstance(sae, Transcoder):
            return sae
        if not isinstance(sae, TranscoderConfig):
            raise TypeError(f"TranscoderModule needs a TranscoderConfig or Transcoder, got {type(sae).__name__}.")
        return Transcoder(sae)

    def hook_names(self) -> list[str]:
        return [self.hook_name, self.hook_name_out]

    def activations(self, batch: Any) -> Tensor:
        if not self.online:
            x, y = batch
            return torch.cat([x, y], dim=-1)
        return super().activations(batch)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        return rows[:, : self.sae.d_in], rows[:, self.sae.d_in :]

    def compute_loss(self, x: Tensor, target: Tensor | None) -> SAEOutput:
        return self.sae(x, target, step=self.global_step, return_feats=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not bool(self.initialized):  # e.g. the sanity check before the first step: nothing to measure yet
            return None
        rows = self.activations(batch)
        x, target = self.split(rows)
        with torch.no_grad():
            out = self.sae(x, target, return_feats=False)
        self.log("val/mse_loss", out.mse_loss, sync_dist=True)
        self.log("val/l0", out.l0.float().mean(), sync_dist=True)


__all__ = ["TranscoderModule"]
