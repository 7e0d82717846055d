"""Subclass SAEModule to change one step: here, add a penalty on decoder-row overlap to the loss.

Run it through the CLI by naming the class (this folder must be importable, e.g. PYTHONPATH=examples), on the
activations cached by ``prisma predict --config configs/cache/dsprites_vit.yaml``:

    PYTHONPATH=examples prisma fit --config configs/sae/cached_shards.yaml \\
        --model custom_sae_loss.DecorrelatedSAEModule --model.overlap_coefficient 0.1

Every other argument of SAEModule still works (``--model.lr``, ``--model.sae.k``, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from prisma_lightning.modules import SAEModule
from prisma_lightning.sae import SAEOutput


class DecorrelatedSAEModule(SAEModule):
    """SAEModule whose loss also penalises the mean squared cosine between decoder rows.

    Args:
        overlap_coefficient: weight of the decoder-overlap penalty.
        **kwargs: everything SAEModule takes.
    """

    def __init__(self, *args: Any, overlap_coefficient: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlap_coefficient = overlap_coefficient

    def compute_loss(self, x: Tensor, target: Tensor | None) -> SAEOutput:
        out = super().compute_loss(x, target)
        w = torch.nn.functional.normalize(self.sae.W_dec, dim=1)
        # A random subset of rows keeps the penalty cheap for wide dictionaries; drawn from the step number, so a
        # resumed run draws what an uninterrupted one would.
        gen = torch.Generator().manual_seed(int(self.global_step))
        rows = w[torch.randperm(w.shape[0], generator=gen)[:256].to(w.device)]
        gram = rows @ rows.T
        overlap = (gram - torch.eye(gram.shape[0], device=gram.device)).pow(2).mean()
        self.log("train/decoder_overlap", overlap.detach())
        return out._replace(loss=out.loss + self.overlap_coefficient * overlap)
