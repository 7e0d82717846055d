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
from torch.autograd.function import once_differentiable

from .sparse_ops import SparsePattern, pre_activations, sparse_decode


class _SquaredErrorRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target):
        diff = pred - target
        ctx.save_for_backward(diff)
        return torch.linalg.vecdot(diff, diff)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        grad_pred = diff * (2 * grad.unsqueeze(-1))
        need_pred, need_target = ctx.needs_input_grad
        if need_target:
            return (grad_pred if need_pred else None), -grad_pred
        return grad_pred, None


def squared_error_rows(pred: Tensor, target: Tensor) -> Tensor:
    """``((pred - target) ** 2).sum(-1)`` as one autograd node: a ``pred``-sized difference in the forward and the
    gradient in the backward, where the composition allocates a difference, its square and two more tensors in the
    backward (first-order gradients only)."""
    return _SquaredErrorRows.apply(pred, target)


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
    return squared_error_rows(e_hat, residual).mean()


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
    ghost_mse = squared_error_rows(ghost_out, residual)
    rescale = mse_per_token.detach() / (ghost_mse.detach() + 1e-6)
    return (rescale * ghost_mse).mean()
