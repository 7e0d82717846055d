"""Auxiliary losses that revive dead features: AuxK (TopK family) and ghost grads (ReLU).

Both take the features that have not fired for ``dead_feature_window`` steps, let them try to reconstruct the
(detached) residual error of the main reconstruction, and train only those features' encoder and decoder rows.
Their pre-activations are recomputed with a ``[n, d_in] @ [d_in, n_dead]`` matmul, so the main pass never has to
keep the dense ``[n, d_sae]`` pre-activations.

* AuxK, Gao et al. (2024), "Scaling and evaluating sparse autoencoders": the ``aux_k`` largest dead
  pre-activations (ReLU'd) decode the residual; ``L_aux = ||e - e_hat||^2``.
* Ghost grads, Anthropic (Feb 2024 update): dead features get ``exp`` activations; their output is rescaled to
  half the residual's norm, and the loss is rescaled to the size of the main MSE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_ops import SparsePattern, pre_activations, sparse_decode


def _dead_encoder(W_enc: Tensor, b_enc: Tensor, dead: Tensor) -> tuple[Tensor, Tensor]:
    return W_enc.index_select(1, dead), b_enc.index_select(0, dead)


def auxk_loss(
    x_n: Tensor,
    residual: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    dead: Tensor,
    aux_k: int,
) -> Tensor:
    """AuxK loss (sum over features, mean over tokens) for dead feature ids ``dead [n_dead]`` (non-empty).

    ``residual [n, d_out]`` is the detached target minus reconstruction in normalised space.
    """
    W, b = _dead_encoder(W_enc, b_enc, dead)
    pre = pre_activations(x_n, W, b, None if b_in is None else b_in.detach())
    values, local = pre.topk(min(aux_k, dead.numel()), dim=-1, sorted=False)
    pattern = SparsePattern.from_fixed_k(dead[local], W_dec.shape[0])
    e_hat = sparse_decode(values.relu().reshape(-1), W_dec, pattern)
    return (e_hat - residual).pow(2).sum(-1).mean()


def ghost_grads_loss(
    x_n: Tensor,
    residual: Tensor,
    mse_per_token: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    dead: Tensor,
) -> Tensor:
    """Ghost-grads loss for dead feature ids ``dead [n_dead]`` (non-empty); about the size of the main MSE.

    ``residual [n, d_out]`` is detached; ``mse_per_token [n]`` is the main loss, used (detached) for rescaling.
    """
    W, b = _dead_encoder(W_enc, b_enc, dead)
    pre = pre_activations(x_n, W, b, None if b_in is None else b_in.detach())
    ghost_out = torch.exp(pre.clamp(max=40.0)) @ W_dec.index_select(0, dead)
    scale = residual.norm(dim=-1) / (2 * ghost_out.norm(dim=-1) + 1e-6)
    ghost_out = ghost_out * scale.detach()[:, None]
    ghost_mse = (ghost_out - residual).pow(2).sum(-1)
    rescale = mse_per_token.detach() / (ghost_mse.detach() + 1e-6)
    return (rescale * ghost_mse).mean()
