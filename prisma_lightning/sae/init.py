"""Initialisation: dictionary weights, and the decoder bias from data (mean or geometric median).

The geometric median -- the point minimising the sum of Euclidean distances to the samples -- is a robust
centre for activations with outliers (e.g. the class token or high-norm register-like tokens of ViTs);
Anthropic ("Towards Monosemanticity") initialise ``b_dec`` with it. It is computed with Weiszfeld's
iteration, each step a distance-weighted mean with weights ``1 / ||x_i - y||``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GeometricMedian(NamedTuple):
    """Result of :func:`geometric_median`."""

    median: Tensor
    """The estimate, shape ``[d]``."""
    iterations: int
    """Weiszfeld steps taken."""
    converged: bool
    """Whether the last step moved the estimate by less than ``tol`` (relative to the data scale)."""


@torch.no_grad()
def geometric_median(
    points: Tensor, weights: Tensor | None = None, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-8
) -> GeometricMedian:
    """Weiszfeld's iteration for the (weighted) geometric median of ``points [n, d]``, computed in float64.

    Starts at the (weighted) mean. ``eps`` floors the distances so that a sample lying on the estimate does not
    divide by zero (the usual Weiszfeld safeguard; it biases the result by at most ``eps``).
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] tensor, got shape {tuple(points.shape)}.")
    x = points.to(torch.float64)
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.to(x)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("geometric_median weights must be non-negative with a positive sum.")
    y = (w[:, None] * x).sum(0) / w.sum()
    scale = (x - y).norm(dim=1).mean().clamp_min(eps)
    iterations, converged = 0, False
    while iterations < max_iter:
        iterations += 1
        inv = w / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (inv[:, None] * x).sum(0) / inv.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * scale:
            converged = True
            break
    return GeometricMedian(y.to(points.dtype), iterations, converged)


@torch.no_grad()
def unit_rows(n_rows: int, n_cols: int, norm: float, generator: torch.Generator) -> Tensor:
    """A ``[n_rows, n_cols]`` float64 matrix of random directions, each row scaled to ``norm`` (CPU)."""
    w = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
    return w * (norm / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
