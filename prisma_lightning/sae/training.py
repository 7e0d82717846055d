"""One SAE optimisation step, shared by the benchmark and the Lightning module.

The order matters for unit-norm decoders: the gradient component parallel to each decoder row is removed
*between* ``backward`` and ``optimizer.step`` (it would only change the row's norm, which is renormalised anyway,
and Adam would otherwise spend its step size on it), and the rows are renormalised *after* the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_autoencoder import SAEOutput, SparseAutoencoder
from .transcoder import Transcoder


def make_optimizer(
    sae: SparseAutoencoder, lr: float = 4e-4, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Adam:
    """Adam over all SAE parameters, using the fused (single-kernel) implementation where the device has one."""
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=betas, fused=True)


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    x_out: Tensor | None = None,
    step: int | None = None,
    *,
    max_grad_norm: float | None = None,
    return_feats: bool = False,
) -> SAEOutput:
    """Forward, backward, decoder-gradient projection, optional clipping, optimizer step, decoder renormalisation.

    ``x_out`` is the target of a :class:`Transcoder`. ``step`` drives the sparsity warm-up. Returns the forward's
    :class:`SAEOutput` (its graph has been freed by ``backward``); by default TopK-family features are not
    densified (``feats`` is None) to save a ``[batch, d_sae]`` tensor.
    """
    optimizer.zero_grad(set_to_none=True)
    if isinstance(sae, Transcoder):
        if x_out is None:
            raise ValueError("A Transcoder's train_step needs the target activations x_out.")
        out = sae(x, x_out, step, return_feats=return_feats)
    else:
        if x_out is not None:
            raise ValueError("x_out is only used by transcoders; a SparseAutoencoder reconstructs its input.")
        out = sae(x, step, return_feats=return_feats)
    out.loss.backward()
    sae.before_optimizer_step()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    sae.after_optimizer_step()
    return out
