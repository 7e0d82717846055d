"""Matryoshka BatchTopK SAE: nested dictionaries, each prefix trained to reconstruct on its own.

Method: Bussmann, Nabeshima, Karvonen and Nanda (2025), "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders" (also Nabeshima 2024, "Matryoshka Sparse Autoencoders"). BatchTopK selection; the loss adds, for
every proper prefix of the dictionary (``matryoshka_prefixes``), the MSE of the reconstruction from that prefix's
features alone, so early features learn general concepts and later ones refine them.

The sparse decode runs once per (token, feature group) bag; running sums of the groups give every prefix's
reconstruction, and :func:`nested_residuals` computes the prefix losses and their gradient in one node (a running
sum and a dot product per group forward, a reverse running sum backward) instead of materialising every prefix's
reconstruction and its squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..registry import register_architecture
from ..sparse_ops import SparsePattern, group_pattern, sparse_decode
from .batchtopk import BatchTopKConfig, BatchTopKSAE


class _NestedResiduals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, parts: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
        n, groups, _ = parts.shape
        residuals = parts.new_empty(groups - 1, *start.shape)  # the proper prefixes' residuals, one [n, d] each
        prefix = parts.new_zeros(())
        previous = start
        for g in range(groups - 1):
            torch.add(previous, parts[:, g], out=residuals[g])
            flat = residuals[g].view(-1)
            prefix += torch.dot(flat, flat)
            previous = residuals[g]
        final = previous + parts[:, groups - 1]
        ctx.save_for_backward(residuals)
        ctx.n = n
        return final, prefix / n

    @staticmethod
    def backward(ctx, grad_final: Tensor | None, grad_prefix: Tensor | None):
        (residuals,) = ctx.saved_tensors
        groups = residuals.shape[0] + 1
        n, d = residuals.shape[1], residuals.shape[2]
        if grad_final is None:
            grad_final = residuals.new_zeros(n, d)
        grad_parts = residuals.new_empty(n, groups, d)
        grad_parts[:, groups - 1] = grad_final
        if grad_prefix is None or groups == 1:
            grad_parts[:, : groups - 1] = grad_final[:, None]
            return grad_parts, grad_final.clone()
        scale = 2.0 * float(grad_prefix) / ctx.n
        running = residuals[groups - 2].clone()  # sum of the residuals of prefixes g >= j
        for j in range(groups - 2, -1, -1):
            if j < groups - 2:
                running.add_(residuals[j])
            torch.add(grad_final, running, alpha=scale, out=grad_parts[:, j])
        return grad_parts, grad_parts[:, 0].clone()


def nested_residuals(parts: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """Residuals of nested reconstructions, as one autograd node.

    ``parts [n, G, d]`` are the decodes of ``G`` consecutive feature groups and ``start [n, d]`` what the
    reconstruction adds to them minus the target (``b_dec + skip - target``). The reconstruction from the first
    ``g + 1`` groups then misses the target by ``r_g = start + sum_{j <= g} parts[:, j]``. Returns the full
    dictionary's residual ``r_{G-1} [n, d]`` and the prefix loss ``sum_{g < G-1} mean_n ||r_g||^2``.
    """
    return _NestedResiduals.apply(parts, start)


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
        start = self._add_skip(self.b_dec - target_n, x_n)  # what every prefix's reconstruction adds, minus the target
        residual, prefix = nested_residuals(parts, start)
        return residual + target_n, prefix
