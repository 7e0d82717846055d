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


def _weight_grad_like(W: Tensor, grad_t: Tensor) -> Tensor:
    """``grad_t.T`` laid out like ``W`` (so autograd and fused optimizers need no copy)."""
    return grad_t.t() if W.stride(0) == 1 else grad_t.t().contiguous()


class _ReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, l1_norm_weighted):
        ctx.set_materialize_grads(False)
        feats = pre_activations(x, W_enc, b_enc, b_in).relu_()
        recon = torch.addmm(b_dec, feats, W_dec)
        norms = W_dec.norm(dim=1) if l1_norm_weighted else None
        l1 = feats @ norms if norms is not None else None
        # L0 per token as sign(f).sum(-1): a float pass plus a fast row sum (per-row counting kernels are several
        # times slower on CPU). The [n, d_sae] buffer is then reused for the backward's feature gradient.
        work = torch.sign(feats)
        l0 = work.sum(-1)
        ctx.work = work
        ctx.mark_non_differentiable(l0)
        ctx.save_for_backward(x, W_enc, b_in, W_dec, norms, feats)
        return feats, recon, l1, l0

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l1, _grad_l0):
        x, W_enc, b_in, W_dec, norms, feats = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_pre, work = None, ctx.work
        ctx.work = None
        if grad_recon is not None:
            grad_pre = torch.mm(grad_recon, W_dec.t(), out=work)
        if grad_l1 is not None:
            if grad_pre is None:
                grad_pre = torch.outer(grad_l1, norms)
            else:
                grad_pre.addr_(grad_l1, norms)
        if grad_feats is not None:
            grad_pre = grad_feats.clone() if grad_pre is None else grad_pre.add_(grad_feats)
        grad_W_dec = grad_b_dec = None
        if need[4] and (grad_recon is not None or grad_l1 is not None):
            grad_W_dec = feats.t() @ grad_recon if grad_recon is not None else torch.zeros_like(W_dec)
            if grad_l1 is not None:  # d(f @ ||W_dec||)/dW_dec = (f^T grad_l1 / ||W_dec||) * W_dec, row-wise
                grad_W_dec.addcmul_(W_dec, ((feats.t() @ grad_l1) / norms.clamp_min(1e-12))[:, None])
        if grad_recon is not None and need[5]:
            grad_b_dec = grad_recon.sum(0)
        if grad_pre is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, None
        # ReLU mask applied in place, in one pass, in a buffer this node owns
        torch.ops.aten.threshold_backward.grad_input(grad_pre, feats, 0.0, grad_input=grad_pre)
        grad_b_enc = grad_pre.sum(0)
        grad_W_enc = grad_b_in = grad_x = None
        if need[1]:
            if W_enc.stride(0) == 1:  # feature-major storage: build the transpose
                grad_W_enc = _weight_grad_like(W_enc, grad_pre.t() @ x)
            else:
                grad_W_enc = x.t() @ grad_pre
            if b_in is not None:
                grad_W_enc.addr_(b_in, grad_b_enc, alpha=-1)
        if b_in is not None and need[3]:
            grad_b_in = -(W_enc @ grad_b_enc)
        if need[0]:
            grad_x = grad_pre @ W_enc.t()
        return grad_x, grad_W_enc, grad_b_enc if need[2] else None, grad_b_in, grad_W_dec, grad_b_dec, None


def relu_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
    l1_norm_weighted: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """A ReLU SAE as one autograd node.

    Returns ``feats = relu((x - b_in) @ W_enc + b_enc) [n, d_sae]``, ``recon = feats @ W_dec + b_dec [n, d_out]``,
    with ``l1_norm_weighted`` Anthropic's per-token penalty ``feats @ ||W_dec||_rows [n]`` (else None; its gradient
    reaches ``W_dec`` through the row norms too), and the number of active features per token ``l0 [n]``.
    """
    return _ReluSAE.apply(x, W_enc, b_enc, b_in, W_dec, b_dec, l1_norm_weighted)


class _JumpReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, threshold, bandwidth):
        ctx.set_materialize_grads(False)
        pre = pre_activations(x, W_enc, b_enc, b_in)
        mask = pre > threshold
        # Entries inside the rectangle kernel |pre - threshold| < bandwidth / 2 are the only ones the threshold's
        # straight-through gradient reads; with a small bandwidth they are few, so keep their coordinates.
        half = 0.5 * bandwidth
        near = torch.logical_and(pre > threshold - half, pre < threshold + half)
        rows, cols = near.nonzero(as_tuple=True)
        del near
        feats = pre.mul_(mask)  # the pre-activation buffer becomes the features
        l0 = mask.view(torch.uint8).sum(-1, dtype=torch.int32).to(feats.dtype)  # the fastest row count on CPU
        fired = mask.any(0)
        recon = torch.addmm(b_dec, feats, W_dec)
        ctx.bandwidth = bandwidth
        ctx.save_for_backward(x, W_enc, b_in, W_dec, threshold, feats, mask, rows, cols)
        ctx.mark_non_differentiable(fired)
        return feats, recon, l0, fired

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l0, _grad_fired):
        x, W_enc, b_in, W_dec, threshold, feats, mask, rows, cols = ctx.saved_tensors
        need, bw = ctx.needs_input_grad, ctx.bandwidth
        grad = None  # gradient reaching the features (from the reconstruction and any penalty on them)
        if grad_recon is not None:
            grad = torch.mm(grad_recon, W_dec.t())
            if grad_feats is not None:
                grad.add_(grad_feats)
        elif grad_feats is not None:
            grad = grad_feats.clone()
        grad_threshold = None
        if need[6]:
            grad_threshold = torch.zeros_like(threshold)
            if grad is not None:  # JumpReLU STE: d f / d theta = -(theta / bw) * rect((pre - theta) / bw)
                grad_threshold.index_add_(0, cols, grad[rows, cols])
                grad_threshold.mul_(-threshold / bw)
            if grad_l0 is not None:  # Heaviside STE: d H / d theta = -(1 / bw) * rect((pre - theta) / bw)
                grad_threshold.index_add_(0, cols, grad_l0[rows], alpha=-1.0 / bw)
        grad_W_dec = feats.t() @ grad_recon if grad_recon is not None and need[4] else None
        grad_b_dec = grad_recon.sum(0) if grad_recon is not None and need[5] else None
        if grad is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, grad_threshold, None
        grad_pre = grad.mul_(mask)
        grad_b_enc = grad_pre.sum(0)
        grad_W_enc = grad_b_in = grad_x = None
        if need[1]:
            grad_W_enc = _weight_grad_like(W_enc, grad_pre.t() @ x) if W_enc.stride(0) == 1 else x.t() @ grad_pre
            if b_in is not None:
                grad_W_enc.addr_(b_in, grad_b_enc, alpha=-1)
        if b_in is not None and need[3]:
            grad_b_in = -(W_enc @ grad_b_enc)
        if need[0]:
            grad_x = grad_pre @ W_enc.t()
        b_enc_grad = grad_b_enc if need[2] else None
        return grad_x, grad_W_enc, b_enc_grad, grad_b_in, grad_W_dec, grad_b_dec, grad_threshold, None


def jumprelu_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A JumpReLU SAE as one autograd node (the composition of :func:`jumprelu`, :func:`step` and the decoder).

    Returns ``feats = pre * (pre > threshold) [n, d_sae]`` with ``pre = (x - b_in) @ W_enc + b_enc``,
    ``recon = feats @ W_dec + b_dec [n, d_out]``, ``l0 = H(pre - threshold).sum(-1) [n]`` and which features
    fired in the batch ``[d_sae]`` (bool, no gradient). ``threshold`` gets
    both straight-through gradients (through ``feats`` and through ``l0``); the dense passes are the two GEMMs per
    direction plus a handful of elementwise ones, and the kernel's few active entries are kept as coordinates.
    """
    return _JumpReluSAE.apply(x, W_enc, b_enc, b_in, W_dec, b_dec, threshold, bandwidth)
