"""Activation functions with custom gradients: JumpReLU / Heaviside step estimators and a fused dense ReLU SAE.

* :func:`jumprelu` and :func:`step` implement the straight-through estimators of Rajamanoharan et al. (2024),
  "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders": the threshold gets a
  pseudo-gradient through a rectangle kernel of width ``bandwidth``; the pre-activations get the exact gradient
  of ``z * H(z - theta)`` (and none through the step function).
* :func:`relu_sae` runs a ReLU SAE's encoder, decoder and per-token L1 term as one autograd node. Its backward
  fuses the L1 gradient and the ReLU mask into the buffer of the decoder's input-gradient matmul, so a training
  step allocates no ``[batch, d_sae]`` temporaries beyond the two its matmuls must produce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse_ops import pre_activations


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_t = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((pre - threshold) / bw)
            grad_t = -(threshold / bw) * (kernel * grad_out).sum(0)
        return grad_pre, grad_t, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = -(1.0 / bw) * (_rectangle((pre - threshold) / bw) * grad_out).sum(0)
        return None, grad_t, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``pre * (pre > threshold)`` for ``pre [n, d_sae]``; ``threshold [d_sae]`` learns through the STE."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside ``H(pre - threshold)`` as floats; gradient only to ``threshold`` (for an L0 penalty)."""
    return _Step.apply(pre, threshold, bandwidth)


class _ReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, l1_weight):
        ctx.set_materialize_grads(False)
        feats = pre_activations(x, W_enc, b_enc, b_in).relu_()
        recon = torch.addmm(b_dec, feats, W_dec)
        l1 = feats @ l1_weight if l1_weight is not None else None
        ctx.save_for_backward(x, W_enc, b_in, W_dec, l1_weight, feats)
        return feats, recon, l1

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l1):
        x, W_enc, b_in, W_dec, l1_weight, feats = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_pre = None
        if grad_recon is not None:
            grad_pre = grad_recon @ W_dec.t()
        if grad_l1 is not None:
            if grad_pre is None:
                grad_pre = torch.outer(grad_l1, l1_weight)
            else:
                grad_pre.addr_(grad_l1, l1_weight)
        if grad_feats is not None:
            grad_pre = grad_feats.clone() if grad_pre is None else grad_pre.add_(grad_feats)
        grad_W_dec = grad_b_dec = grad_l1_weight = None
        if grad_recon is not None:
            grad_W_dec = feats.t() @ grad_recon if need[4] else None
            grad_b_dec = grad_recon.sum(0) if need[5] else None
        if grad_l1 is not None and need[6]:
            grad_l1_weight = feats.t() @ grad_l1
        if grad_pre is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, grad_l1_weight
        grad_pre.masked_fill_(feats == 0, 0)  # ReLU mask, in place in a buffer this node owns
        grad_b_enc = grad_pre.sum(0)
        grad_W_enc = grad_b_in = grad_x = None
        if need[1]:
            grad_w_t = grad_pre.t() @ x  # [d_sae, d_in]: the layout of W_enc's feature-major storage
            if b_in is not None:
                grad_w_t.addr_(grad_b_enc, b_in, alpha=-1)
            grad_W_enc = grad_w_t.t()
        if b_in is not None and need[3]:
            grad_b_in = -(W_enc @ grad_b_enc)
        if need[0]:
            grad_x = grad_pre @ W_enc.t()
        return grad_x, grad_W_enc, grad_b_enc if need[2] else None, grad_b_in, grad_W_dec, grad_b_dec, grad_l1_weight


def relu_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
    l1_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A ReLU SAE as one autograd node.

    Returns ``feats = relu((x - b_in) @ W_enc + b_enc) [n, d_sae]``, ``recon = feats @ W_dec + b_dec [n, d_out]``
    and, if ``l1_weight [d_sae]`` is given, the per-token penalty ``feats @ l1_weight [n]`` (pass the decoder row
    norms for Anthropic's norm-weighted L1; they may require grad).
    """
    return _ReluSAE.apply(x, W_enc, b_enc, b_in, W_dec, b_dec, l1_weight)
