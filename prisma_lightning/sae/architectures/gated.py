"""Gated SAE: a gate path decides which features fire, a magnitude path how strongly.

Method: Rajamanoharan et al. (2024), "Improving Dictionary Learning with Gated Sparse Autoencoders" (Google
DeepMind): ``f = H(pi_gate) * relu(pi_mag)`` with ``pi_gate = (x - b_dec) W_gate + b_gate`` and
``pi_mag = (x - b_dec) (W_gate * exp(r_mag)) + b_mag`` (weight sharing). Losses: the MSE, the L1 penalty on
``relu(pi_gate)`` weighted by decoder norms, and the auxiliary reconstruction from ``relu(pi_gate)`` through a frozen
copy of the decoder, which trains the gate path.

Initialisation as for the ReLU SAE: Anthropic's small decoder, whose scale ``initialize_from_data`` then fits so
the initial reconstruction of the sample is least-squares optimal (left at 1% of the input, every gate opens first).

The training pass is one fused autograd node (:func:`~prisma_lightning.sae.activations.gated_sae`): one encoder
GEMM serves both paths and the backward works in the forward's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..activations import gated_sae
from ..config import check_number
from ..losses import squared_error_rows
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder
from .relu import FittedDecoder, FittedDecoderConfig

RECOMMENDED = 6.0
"""A first ``l1_coefficient`` on normalised activations (``expected_norm``): on the quickstart it gives tens of
features per token."""


@dataclass
class GatedConfig(FittedDecoderConfig):
    """Gated SAE: gate and magnitude paths sharing the encoder directions; L1 penalty on the gate."""

    architecture: Literal["gated"] = "gated"
    """``gated``."""
    l1_coefficient: float = RECOMMENDED
    """Weight of the L1 penalty ``sum_i relu(pi_gate)_i * ||W_dec[i]||`` per token, averaged over tokens."""
    sparsity_field = "l1_coefficient"
    recommended_coefficient = RECOMMENDED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("l1_coefficient", self.l1_coefficient)


@register_architecture
class GatedSAE(FittedDecoder, SparseAutoencoder):
    """Gated SAE (see the module docstring)."""

    config_class = GatedConfig
    feature_parameters = {"W_enc": 1, "W_dec": 0, "b_gate": 0, "r_mag": 0, "b_mag": 0}
    feature_biases = ("b_gate", "r_mag", "b_mag")
    saelens_names = ("gated",)
    paper = "Rajamanoharan et al. 2024, Improving Dictionary Learning with Gated Sparse Autoencoders"

    def build_parameters(self, kw: dict[str, Any]) -> None:
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae, **kw))
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))

    def _gated_parts(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        b_in = self._input_bias()
        h = (x_n if b_in is None else x_n - b_in) @ self.W_enc  # one matmul serves both paths (W_mag = W_gate*e^r)
        pi_gate = h + self.b_gate
        magnitude = torch.relu(h * self.r_mag.exp() + self.b_mag)
        return (pi_gate > 0).to(h.dtype) * magnitude, pi_gate

    def encode_rows(self, x_n: Tensor) -> Tensor:
        return self._gated_parts(x_n)[0]

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        args = (x_n, self.W_enc, self.b_gate, self.r_mag, self.b_mag, self._input_bias(), self.W_dec, self.b_dec)
        feats, recon, via_gate, l1, l0, fired = gated_sae(*args)
        recon = self._add_skip(recon, x_n)
        via_gate = self._add_skip(via_gate, x_n, detach=True)
        sparsity = self.sparsity_coefficient(step) * l1.mean()
        aux = squared_error_rows(via_gate, target_n).mean()
        if not self.training:
            fired = fired.new_zeros(0)
        return Pass(recon, feats, None, sparsity, aux, None, l0, fired)

    def file_tensors(self) -> dict[str, Tensor]:
        return {
            "W_enc": self.W_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "b_gate": self.b_gate,
            "r_mag": self.r_mag,
            "b_mag": self.b_mag,
        }
