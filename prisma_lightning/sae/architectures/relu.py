"""ReLU SAE with an L1 penalty weighted by the decoder row norms; optional ghost grads.

Method: Bricken et al. (2023), "Towards Monosemanticity: Decomposing Language Models With Dictionary Learning"
(Anthropic), with the April 2024 update ("Circuits Updates"): the penalty is ``sum_i f_i * ||W_dec[i]||`` with
free (not unit-norm) decoder rows. Ghost grads: Anthropic's February 2024 update.

Initialisation: Anthropic's (decoder rows of norm 0.1, encoder = decoder transpose, zero biases), then
``initialize_from_data`` rescales the decoder so the initial reconstruction of the sample is least-squares optimal.
Left at 1% of the input, the reconstruction gradient first makes every feature fire (L0 ~ d_sae / 2 on the
quickstart); fitted, the L1 penalty works from the first step (quickstart, l1_coefficient 1, 600 steps: L0 227 ->
55 at the same explained variance).

The training pass is one fused autograd node (:func:`~prisma_lightning.sae.activations.relu_sae`): encoder,
decoder and the per-token penalty, with the backward fused into the buffers the matmuls must produce anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .. import losses
from ..activations import relu_sae
from ..config import SAEConfig, check_number
from ..init import fit_decoder_scale
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder
from ..sparse_ops import pre_activations

RECOMMENDED = 1.0
"""A first ``l1_coefficient`` on normalised activations (``expected_norm``): on the quickstart it gives tens of
features per token."""


@dataclass
class FittedDecoderConfig(SAEConfig):
    """Fields of architectures with a free decoder whose scale is fitted to the data (``relu``, ``gated``,
    ``panneal``)."""

    decoder_init_fit: bool = True
    """At ``initialize_from_data``, rescale the decoder so the initial reconstruction of the sample is least-squares
    optimal (``decoder_init_norm`` then only sets the rows' starting norm). False: keep ``decoder_init_norm``."""


class FittedDecoder:
    """``initialize_dictionary`` for a :class:`FittedDecoderConfig` architecture (mix in before the SAE class)."""

    @torch.no_grad()
    def initialize_dictionary(self, x_n: Tensor) -> None:
        """Fit the decoder's scale to the sample ``x_n [n, d_in]`` (``decoder_init_fit``; not for transcoders,
        whose targets this hook does not see)."""
        if self.cfg.decoder_init_fit and not self.is_transcoder:  # type: ignore[attr-defined]
            fit_decoder_scale(self, x_n)


@dataclass
class ReLUConfig(FittedDecoderConfig):
    """ReLU SAE: ``f = relu((x - b_dec) W_enc + b_enc)``, penalty ``l1_coefficient * sum_i f_i ||W_dec[i]||``."""

    architecture: Literal["relu"] = "relu"
    """``relu``."""
    l1_coefficient: float = RECOMMENDED
    """Weight of the L1 penalty ``sum_i f_i * ||W_dec[i]||`` per token, averaged over tokens."""
    ghost_grads: bool = False
    """Add Anthropic's ghost-grads loss, which trains dead features on the reconstruction residual."""
    sparsity_field = "l1_coefficient"
    recommended_coefficient = RECOMMENDED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("l1_coefficient", self.l1_coefficient)


@register_architecture
class ReLUSAE(FittedDecoder, SparseAutoencoder):
    """ReLU SAE (see the module docstring)."""

    config_class = ReLUConfig
    saelens_names = ("standard",)
    paper = "Bricken et al. 2023, Towards Monosemanticity (Anthropic); April 2024 update"

    def encode_rows(self, x_n: Tensor) -> Tensor:
        return pre_activations(x_n, self.W_enc, self.b_enc, self._input_bias()).relu()

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        coef = self.sparsity_coefficient(step)
        args = (x_n, self.W_enc, self.b_enc, self._input_bias(), self.W_dec, self.b_dec, coef > 0)
        feats, recon, l1, l0, fired = relu_sae(*args)
        sparsity = coef * l1.mean() if l1 is not None else recon.new_zeros(())
        recon = self._add_skip(recon, x_n)
        fired = fired if self.training else fired.new_zeros(0)
        return Pass(recon, feats, None, sparsity, None, None, l0, fired)

    def dead_feature_loss(self, x_n: Tensor, target_n: Tensor, recon: Tensor, mse_tok: Tensor) -> Tensor:
        if not self.cfg.ghost_grads:
            return recon.new_zeros(())
        dead = self.dead_features()
        if dead.numel() == 0:
            return recon.new_zeros(())
        residual = (target_n - recon).detach()
        return losses.ghost_grads_loss(
            x_n, residual, mse_tok, self.W_enc, self.b_enc, self._input_bias(), self.W_dec, dead
        )
