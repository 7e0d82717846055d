"""Initialisation: dictionary weights, the decoder bias from data (mean or geometric median), and the scale of the
initial reconstruction (:func:`least_squares_scale`).

The geometric median -- the point minimising the sum of Euclidean distances to the samples -- is a robust
centre for activations with outliers (e.g. the class token or high-norm register-like tokens of ViTs);
Anthropic ("Towards Monosemanticity") initialise ``b_dec`` with it. It is computed with Weiszfeld's
iteration, each step a distance-weighted mean with weights ``1 / ||x_i - y||``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

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


@torch.no_grad()
def least_squares_scale(pairs: Iterable[tuple[Tensor, Tensor]]) -> float:
    """The factor ``c`` minimising ``sum ||c * recon - target||^2`` over ``(recon, target)`` row blocks
    (``<recon, target> / ||recon||^2``, accumulated in float64); 1 when every ``recon`` is 0 or ``c`` is not positive.

    Used to start an SAE at the right scale: its initial reconstruction of a data sample, rescaled by ``c``, neither
    overshoots (a loss spike that drives the first steps) nor undershoots (a reconstruction near 0, which makes
    every feature grow and fire at first).
    """
    dot = norm = 0.0
    for recon, target in pairs:
        dot += float((recon.double() * target.double()).sum())
        norm += float(recon.double().square().sum())
    c = dot / norm if norm > 0 else 1.0
    return c if c > 0 and math.isfinite(c) else 1.0


@torch.no_grad()
def fit_decoder_scale(sae: Any, x_n: Tensor, rows: int = 1024) -> float:
    """Rescale ``sae.W_dec`` (all rows by one factor) so that the SAE's initial reconstruction of the normalised
    sample ``x_n [n, d_in]`` is least-squares optimal; returns the factor.

    A free decoder starts at a small norm (``decoder_init_norm``, 0.1: Anthropic's heuristic) and the encoder at the
    decoder's transpose, so the initial reconstruction is about 1% of the input: the reconstruction gradient then
    pushes every feature up at once and, before any penalty can act, most features fire on most tokens.
    """
    pairs = ((sae.encode_rows(blk) @ sae.W_dec, blk - sae.b_dec) for blk in x_n.split(rows))
    c = least_squares_scale(pairs)
    sae.W_dec.mul_(c)
    return c
