"""TopK SAE: the ``k`` largest pre-activations of each token, decoded sparsely; AuxK revives dead features.

Method: Gao et al. (2024), "Scaling and evaluating sparse autoencoders" (OpenAI): ``f = topk(relu(pre))``, no
sparsity penalty (k fixes L0), unit-norm decoder rows, and the AuxK loss -- the ``aux_k`` largest dead
pre-activations reconstruct the residual -- against dead features.

This file also holds what the whole TopK family (``batchtopk``, ``matryoshka_batchtopk``, ...) shares: the
index-based sparse encode / decode with hand-written backward passes
(:mod:`~prisma_lightning.sae.sparse_ops`: no dense ``[batch, d_sae]`` decoder matmul), the AuxK loss and the
sparse output. A family member overrides :meth:`TopKSAE.select` (which entries of the pre-activations are kept) and
:meth:`TopKSAE.selector` (the selection of a training step, e.g. a warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .. import losses
from ..config import SAEConfig, check_int, check_number
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder, SparseCodes
from ..sparse_ops import (
    Selector,
    SparsePattern,
    dense_to_pattern,
    pre_activations,
    sparse_decode,
    sparse_encode,
    topk_select,
)


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE: ``k`` active features per token, AuxK loss on dead features, unit-norm decoder rows."""

    architecture: Literal["topk"] = "topk"
    """``topk``."""
    k: int = 32
    """Active features per token (for batch-level selections: on average, ``k * batch`` in total)."""
    aux_k: int | None = None
    """Dead features used by the AuxK loss to reconstruct the residual; default ``d_in // 2``."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (0 turns it off)."""

    default_decoder_norm = "unit"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k)
        if not self.k <= self.d_sae:  # type: ignore[operator]
            raise ValueError(
                f"k={self.k} must satisfy 0 < k <= d_sae={self.d_sae} for architecture {self.architecture!r}; "
                "lower k or raise d_sae."
            )
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_sae, self.d_in // 2))  # type: ignore[type-var]
        check_int("aux_k", self.aux_k)
        if self.aux_k > self.d_sae:  # type: ignore[operator]
            raise ValueError(f"aux_k={self.aux_k} must satisfy 0 < aux_k <= d_sae={self.d_sae}.")
        check_number("aux_k_coefficient", self.aux_k_coefficient)


@register_architecture
class TopKSAE(SparseAutoencoder):
    """TopK SAE, and the base of the TopK family (see the module docstring)."""

    config_class = TopKConfig
    sparse_codes = True
    encoder_init_cap = None
    saelens_names = ("topk",)
    paper = "Gao et al. 2024, Scaling and evaluating sparse autoencoders (OpenAI)"

    # ------------------------------------------------------------------ selection (family hook)
    def select(self, pre: Tensor) -> tuple[Tensor, SparsePattern]:
        """Selected post-ReLU values ``[nnz]`` and their pattern from dense pre-activations ``[n, d_sae]``."""
        return topk_select(pre, self.cfg.k)

    def selector(self, step: int | None) -> Selector:
        """The selection of the training pass at ``step`` (family hook; default :meth:`select`)."""
        return self.select

    def encode_rows(self, x_n: Tensor) -> Tensor:
        pre = pre_activations(x_n, self.W_enc, self.b_enc, self._input_bias())
        values, pattern = self.select(pre)
        return self._densify(values, pattern)

    def encode_entries(self, x_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, pattern = self.select(pre_activations(x_n, self.W_enc, self.b_enc, self._input_bias()))
        return pattern.rows, pattern.indices, values

    @staticmethod
    def _densify(values: Tensor, pattern: SparsePattern) -> Tensor:
        dense = values.new_zeros(pattern.n_rows, pattern.n_features)
        return dense.index_put((pattern.rows, pattern.indices), values)

    def decode_rows(self, f: Tensor) -> Tensor:
        values, pattern = dense_to_pattern(f)
        return sparse_decode(values, self.W_dec, pattern) + self.b_dec

    # ------------------------------------------------------------------ training pass
    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        values, pattern = sparse_encode(x_n, self.W_enc, self.b_enc, self._input_bias(), self.selector(step))
        recon, prefix = self.decode_selected(values, pattern, x_n, target_n)
        with torch.no_grad():
            active = values > 0
            l0 = self.count_per_row(active, pattern)
            fired = pattern.indices if bool(active.all()) else pattern.indices[active]
            if self.training:
                self.update_statistics(values, step)
        feats = self._densify(values, pattern) if return_feats else None
        codes = SparseCodes(pattern.indices, values, pattern.offsets)
        return Pass(recon, feats, codes, values.new_zeros(()), None, prefix, l0.to(values.dtype), fired)

    def decode_selected(
        self, values: Tensor, pattern: SparsePattern, x_n: Tensor, target_n: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Reconstruction ``[n, d_out]`` (normalised space, skip included) and any prefix loss (family hook)."""
        return self._add_skip(sparse_decode(values, self.W_dec, pattern) + self.b_dec, x_n), None

    def count_per_row(self, active: Tensor, pattern: SparsePattern) -> Tensor:
        """Active entries of each row, ``[n]``."""
        return active.view(pattern.n_rows, self.cfg.k).sum(-1)

    def update_statistics(self, values: Tensor, step: int | None) -> None:
        """Running statistics updated by each training pass at ``step`` (BatchTopK's threshold); none for TopK."""

    # ------------------------------------------------------------------ AuxK
    def dead_feature_loss(self, x_n: Tensor, target_n: Tensor, recon: Tensor, mse_tok: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.aux_k_coefficient <= 0:
            return recon.new_zeros(())
        dead = self.dead_features()
        if dead.numel() == 0:
            return recon.new_zeros(())
        residual = (target_n - recon).detach()
        args = (self.W_enc, self.b_enc, self._input_bias(), self.W_dec, dead)
        return cfg.aux_k_coefficient * losses.auxk_loss(x_n, residual, *args, aux_k=int(cfg.aux_k))

    # ------------------------------------------------------------------ files
    def saelens_fields(self) -> dict[str, Any]:
        return {
            "architecture": "topk",
            "k": self.cfg.k,
            "rescale_acts_by_decoder_norm": False,
            "activation_fn_kwargs": {"k": self.cfg.k},
        }

    @classmethod
    def config_from_saelens(cls, raw: dict[str, Any], file: Path) -> dict[str, Any]:
        k = raw.get("k")
        if k is None:
            k = (raw.get("activation_fn_kwargs") or {}).get("k")
        if k is None:
            k = 100  # SAELens' default
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"{file}: field 'k' must be an integer, got {k!r}.")
        return {"k": k}

    @torch.no_grad()
    def after_saelens_load(self, raw: dict[str, Any]) -> None:
        """``rescale_acts_by_decoder_norm: true`` (SAELens' TopK training default): SAELens multiplies the
        pre-activations by ``||W_dec[i]||`` before the selection and divides the features by it when decoding;
        folding the norms (``W_enc[:, i] *= n_i``, ``b_enc[i] *= n_i``, ``W_dec[i] /= n_i``) computes exactly that
        with plain weights (SAELens itself folds them when it saves for inference)."""
        flag = raw.get("rescale_acts_by_decoder_norm", False)
        if not isinstance(flag, bool):
            raise ValueError(f"field 'rescale_acts_by_decoder_norm' must be true or false, got {flag!r}.")
        if not flag:
            return
        norms = self.W_dec.norm(dim=1)
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None].clamp_min(1e-12))
