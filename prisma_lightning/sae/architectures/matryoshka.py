"""Matryoshka BatchTopK SAE: nested dictionaries, each prefix trained to reconstruct on its own.

Method: Bussmann, Nabeshima, Karvonen and Nanda (2025), "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders" (also Nabeshima 2024, "Matryoshka Sparse Autoencoders"). BatchTopK selection; the loss adds, for
every proper prefix of the dictionary (``matryoshka_prefixes``), the MSE of the reconstruction from that prefix's
features alone, so early features learn general concepts and later ones refine them.

The sparse decode runs once per (token, feature group) bag; cumulative sums give every prefix's reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..registry import register_architecture
from ..sparse_ops import SparsePattern, group_pattern, sparse_decode
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MatryoshkaBatchTopKConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE: BatchTopK with nested-prefix reconstruction losses."""

    architecture: Literal["matryoshka_batchtopk"] = "matryoshka_batchtopk"
    """``matryoshka_batchtopk``."""
    matryoshka_prefixes: list[int] | None = None
    """Prefix lengths of the nested dictionaries, increasing; ``d_sae`` is appended if missing. Default:
    ``d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        d_sae = int(self.d_sae)  # type: ignore[arg-type]
        if self.matryoshka_prefixes is None:
            prefixes = sorted({max(1, d_sae // 2**i) for i in range(4, -1, -1)})
        else:
            if not isinstance(self.matryoshka_prefixes, list | tuple) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in self.matryoshka_prefixes
            ):
                raise ValueError(f"matryoshka_prefixes must be a list of integers, got {self.matryoshka_prefixes!r}.")
            prefixes = [int(p) for p in self.matryoshka_prefixes]
        if not prefixes or prefixes[-1] != d_sae:
            prefixes.append(d_sae)
        if prefixes[0] <= 0 or any(a >= b for a, b in zip(prefixes, prefixes[1:], strict=False)):
            raise ValueError(
                f"matryoshka_prefixes={self.matryoshka_prefixes} must be strictly increasing prefix lengths in "
                f"(0, d_sae={d_sae}], e.g. [{d_sae // 4}, {d_sae // 2}, {d_sae}]."
            )
        self.matryoshka_prefixes = prefixes


@register_architecture
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (see the module docstring)."""

    config_class = MatryoshkaBatchTopKConfig
    saelens_names = ("matryoshka_batchtopk",)
    paper = "Bussmann et al. 2025, Learning Multi-Level Features with Matryoshka Sparse Autoencoders"

    def build_parameters(self, kw: dict[str, Any]) -> None:
        super().build_parameters(kw)
        ends = torch.tensor(self.cfg.matryoshka_prefixes, device=kw["device"])
        self.register_buffer("prefix_ends", ends, persistent=False)

    @classmethod
    def config_from_saelens(cls, raw: dict[str, Any], file: Any) -> dict[str, Any]:
        fields = super().config_from_saelens(raw, file)
        widths = raw.get("matryoshka_widths")
        if widths is not None:
            fields["matryoshka_prefixes"] = list(widths)  # SAELens' cumulative widths are our prefix lengths
        return fields

    def decode_selected(
        self, values: Tensor, pattern: SparsePattern, x_n: Tensor, target_n: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        groups = group_pattern(pattern, self.prefix_ends)
        parts = sparse_decode(values, self.W_dec, groups).view(pattern.n_rows, -1, self.d_out)
        recons = self._add_skip(parts.cumsum(1) + self.b_dec, x_n, expand=True)
        prefix = (recons[:, :-1] - target_n[:, None]).pow(2).sum(-1).mean(0).sum()
        return recons[:, -1], prefix
