"""Activation functions with custom gradients: JumpReLU / Heaviside step estimators and a fused dense ReLU SAE.

* :func:`jumprelu` and :func:`step` implement the straight-through estimators of Rajamanoharan et al. (2024),
  "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders": the threshold gets a
  pseudo-gradient through a rectangle kernel of width ``bandwidth``; the pre-activations get the exact gradient
  of ``z * H(z - theta)`` (and none through the step function).
* :func:`relu_sae` runs a ReLU SAE's encoder, decoder and per-token L1 term as one autograd node. Its backward
  fuses the L1 gradient and the ReLU mask into the buffer of the decoder's input-gradient matmul, so a training
  step allocates no ``[batch, d_sae]`` temporaries beyond the two its matmuls must produce.
* :func:`jumprelu_sae` does the same for a JumpReLU SAE with its L0 or tanh penalty, and :func:`gated_sae` for a
  Gated SAE with its L1 and auxiliary losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scratch import scratch
from .sparse_ops import pre_activations, transpose_into


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
    return grad_t.t() if W.stride(0) == 1 else transpose_into(scratch(W.shape, W), grad_t)


def _mm_like(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """``a @ b`` for the gradient of the weight ``like``: into a reused buffer of its layout when it is contiguous (the
    gradient is taken over by ``.grad`` and the buffer comes back once the optimizer's ``zero_grad`` drops it)."""
    return torch.mm(a, b, out=scratch(like.shape, like)) if like.is_contiguous() else a @ b


class _ReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, l1_norm_weighted):
        ctx.set_materialize_grads(False)
        feats = pre_activations(x, W_enc, b_enc, b_in, reuse=True).relu_()
        recon = torch.addmm(b_dec, feats, W_dec)
        norms = W_dec.norm(dim=1) if l1_norm_weighted else None
        l1 = feats @ norms if norms is not None else None
        # L0 per token as sign(f).sum(-1): a float pass plus a fast row sum (per-row counting kernels are several
        # times slower on CPU). The [n, d_sae] buffer is then reused for the backward's feature gradient.
        work = torch.sign(feats, out=scratch(feats.shape, feats))
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
            grad_W_dec = _mm_like(feats.t(), grad_recon, W_dec) if grad_recon is not None else torch.zeros_like(W_dec)
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
                grad_W_enc = _mm_like(x.t(), grad_pre, W_enc)
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


_DENSE_KERNEL = 32
"""The threshold's kernel is kept as a dense mask when more than 1 / this of the entries fall inside it."""
_KERNEL_SAMPLE_ROWS = 64
"""Rows whose kernel entries are counted to choose between the two forms."""


class _JumpReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, threshold, bandwidth, tanh_scale):
        ctx.set_materialize_grads(False)
        pre = pre_activations(x, W_enc, b_enc, b_in, reuse=True)
        gap = torch.sub(pre, threshold, out=scratch(pre.shape, pre))  # [n, d_sae]
        # the pre-activation buffer becomes the features, masked in one pass by the sign of the gap (no bool temp);
        # the threshold is positive, so the active entries are exactly those with feats > 0
        feats = torch.ops.aten.threshold_backward.grad_input(pre, gap, 0.0, grad_input=pre)
        # Entries inside the rectangle kernel |pre - threshold| < bandwidth / 2 are the only ones the threshold's
        # straight-through gradient reads. Few (a narrow kernel): keep their coordinates; many (a kernel as wide as
        # the pre-activations' spread, early in training): keep the mask, read densely in the backward.
        near = gap.abs_().lt_(0.5 * bandwidth)  # 1.0 inside the kernel, 0.0 outside, in the gap's buffer
        sample = near[:_KERNEL_SAMPLE_ROWS]
        if int(sample.sum()) * _DENSE_KERNEL > sample.numel():
            rows = cols = None
        else:
            rows, cols = near.nonzero(as_tuple=True)
            near = None
        del gap
        # L0 per token as sign(f).sum(-1) (see relu_sae); the buffer is reused by the backward
        work = torch.sign(feats, out=scratch(feats.shape, feats))
        l0 = work.sum(-1)
        fired = work.sum(0) > 0
        ctx.work = work
        recon = torch.addmm(b_dec, feats, W_dec)
        norms = tanh_sum = None
        ctx.tanh_work = None
        if tanh_scale is not None:
            norms = W_dec.norm(dim=1)
            tanh = torch.mul(feats, norms * tanh_scale, out=scratch(feats.shape, feats)).tanh_()  # 1 - tanh^2 later
            tanh_sum = tanh.sum(-1)
            ctx.tanh_work = tanh
        ctx.bandwidth, ctx.tanh_scale, ctx.near = bandwidth, tanh_scale, near
        ctx.save_for_backward(x, W_enc, b_in, W_dec, threshold, feats, rows, cols, norms)
        ctx.mark_non_differentiable(fired)
        return feats, recon, l0, fired, tanh_sum

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l0, _grad_fired, grad_tanh):
        x, W_enc, b_in, W_dec, threshold, feats, rows, cols, norms = ctx.saved_tensors
        need, bw, scale = ctx.needs_input_grad, ctx.bandwidth, ctx.tanh_scale
        work, tanh, near = ctx.work, ctx.tanh_work, ctx.near
        ctx.work = ctx.tanh_work = ctx.near = None
        grad = None  # gradient reaching the features (from the reconstruction and any penalty on them)
        if grad_recon is not None:
            grad = torch.mm(grad_recon, W_dec.t(), out=work)
            if grad_feats is not None:
                grad.add_(grad_feats)
        elif grad_feats is not None:
            grad = grad_feats.clone()
        del work
        grad_norms = None
        if grad_tanh is not None:
            # d/df tanh(s f n) = s n (1 - tanh^2); the same factor times s f gives the gradient of the norm n
            g = grad_tanh[:, None]
            tanh = torch.addcmul(g, tanh.square_(), g, value=-1, out=tanh)  # g * (1 - tanh^2)
            if grad is None:
                grad = tanh * (norms * scale)
            else:
                grad.addcmul_(tanh, (norms * scale)[None])
            grad_norms = tanh.mul_(feats).sum(0).mul_(scale) if need[4] else None
        del tanh
        grad_threshold = None
        if need[6]:
            grad_threshold = torch.zeros_like(threshold)
            l0_part = None  # Heaviside STE: d H / d theta = -(1 / bw) * rect((pre - theta) / bw)
            if grad_l0 is not None:
                l0_part = grad_l0[rows] if near is None else near.t() @ grad_l0
            if grad is not None:  # JumpReLU STE: d f / d theta = -(theta / bw) * rect((pre - theta) / bw)
                if near is None:
                    grad_threshold.index_add_(0, cols, grad[rows, cols])
                else:
                    grad_threshold.add_(near.mul_(grad).sum(0))  # the kernel's buffer is not needed any more
                grad_threshold.mul_(-threshold / bw)
            if l0_part is not None:
                if near is None:
                    grad_threshold.index_add_(0, cols, l0_part, alpha=-1.0 / bw)
                else:
                    grad_threshold.sub_(l0_part, alpha=1.0 / bw)
        del near
        grad_W_dec = _mm_like(feats.t(), grad_recon, W_dec) if grad_recon is not None and need[4] else None
        if grad_norms is not None:  # d ||W_dec[i]|| / d W_dec[i] = W_dec[i] / ||W_dec[i]||
            row_scale = (grad_norms / norms.clamp_min(1e-12))[:, None]
            grad_W_dec = W_dec * row_scale if grad_W_dec is None else grad_W_dec.addcmul_(W_dec, row_scale)
        grad_b_dec = grad_recon.sum(0) if grad_recon is not None and need[5] else None
        if grad is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, grad_threshold, None, None
        # the JumpReLU mask (active = feats > 0), in place, in one pass
        grad_pre = torch.ops.aten.threshold_backward.grad_input(grad, feats, 0.0, grad_input=grad)
        grad_b_enc = grad_pre.sum(0)
        grad_W_enc = grad_b_in = grad_x = None
        if need[1]:
            if W_enc.stride(0) == 1:
                grad_W_enc = _weight_grad_like(W_enc, grad_pre.t() @ x)
            else:
                grad_W_enc = _mm_like(x.t(), grad_pre, W_enc)
            if b_in is not None:
                grad_W_enc.addr_(b_in, grad_b_enc, alpha=-1)
        if b_in is not None and need[3]:
            grad_b_in = -(W_enc @ grad_b_enc)
        if need[0]:
            grad_x = grad_pre @ W_enc.t()
        b_enc_grad = grad_b_enc if need[2] else None
        return grad_x, grad_W_enc, b_enc_grad, grad_b_in, grad_W_dec, grad_b_dec, grad_threshold, None, None


def jumprelu_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: float,
    tanh_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """A JumpReLU SAE as one autograd node (the composition of :func:`jumprelu`, :func:`step`, the decoder and
    Anthropic's tanh penalty).

    Returns ``feats = pre * (pre > threshold) [n, d_sae]`` with ``pre = (x - b_in) @ W_enc + b_enc``,
    ``recon = feats @ W_dec + b_dec [n, d_out]``, ``l0 = H(pre - threshold).sum(-1) [n]``, which features
    fired in the batch ``[d_sae]`` (bool, no gradient) and, with ``tanh_scale``, the per-token penalty
    ``tanh(tanh_scale * feats * ||W_dec||_rows).sum(-1) [n]`` (else None; its gradient reaches ``W_dec`` through the
    row norms too). ``threshold`` must be positive (``exp(log_threshold)``) and gets both straight-through gradients
    (through ``feats`` and through ``l0``). The dense passes are the two GEMMs per direction plus a handful of
    elementwise ones; the kernel's entries are kept as coordinates when few, as a mask when many.
    """
    return _JumpReluSAE.apply(x, W_enc, b_enc, b_in, W_dec, b_dec, threshold, bandwidth, tanh_scale)


def _column_dots(a: Tensor, b: Tensor, rows: int = 256) -> Tensor:
    """``(a * b).sum(0)`` for ``[n, d]`` matrices, in row blocks (no ``[n, d]`` temporary)."""
    out = a.new_zeros(a.shape[1])
    for a_blk, b_blk in zip(a.split(rows), b.split(rows), strict=True):
        out.add_((a_blk * b_blk).sum(0))
    return out


class _GatedSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_gate, r_mag, b_mag, b_in, W_dec, b_dec):
        ctx.set_materialize_grads(False)
        # [n, d_sae], shared by both paths
        h = pre_activations(x, W_enc, torch.zeros_like(b_gate), b_in, reuse=True)
        gate = torch.add(h, b_gate).relu_()  # relu(pi_gate): the L1 and auxiliary paths read it
        scale = r_mag.exp()
        # magnitude path in h's buffer: relu(h * e^r + b_mag), kept where the gate is open
        feats = torch.addcmul(b_mag, h, scale, out=h).relu_()
        # keep it where pi_gate > 0, i.e. where relu(pi_gate) > 0: threshold_backward masks in one pass, no bool temp
        torch.ops.aten.threshold_backward.grad_input(feats, gate, 0.0, grad_input=feats)
        norms = W_dec.norm(dim=1)
        recon = torch.addmm(b_dec, feats, W_dec)
        via_gate = torch.addmm(b_dec, gate, W_dec)
        l1 = gate @ norms
        # L0 per token as sign(f).sum(-1) (see relu_sae); the buffer is reused by the backward
        work = torch.sign(feats, out=scratch(feats.shape, feats))
        l0 = work.sum(-1)
        fired = work.sum(0) > 0
        ctx.work = work
        ctx.mark_non_differentiable(l0, fired)
        ctx.save_for_backward(x, W_enc, b_in, W_dec, scale, b_mag, norms, feats, gate)
        return feats, recon, via_gate, l1, l0, fired

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_via, grad_l1, _grad_l0, _grad_fired):
        x, W_enc, b_in, W_dec, scale, b_mag, norms, feats, gate = ctx.saved_tensors
        need = ctx.needs_input_grad
        work, ctx.work = ctx.work, None
        grad_W_dec = grad_b_dec = None
        if need[6] and (grad_recon is not None or grad_l1 is not None):
            grad_W_dec = _mm_like(feats.t(), grad_recon, W_dec) if grad_recon is not None else torch.zeros_like(W_dec)
            if grad_l1 is not None:  # d(g @ ||W_dec||)/dW_dec = (g^T grad_l1 / ||W_dec||) * W_dec, row-wise
                grad_W_dec.addcmul_(W_dec, ((gate.t() @ grad_l1) / norms.clamp_min(1e-12))[:, None])
        if grad_recon is not None and need[7]:
            grad_b_dec = grad_recon.sum(0)  # the auxiliary reconstruction reads b_dec and W_dec frozen
        # magnitude path: gradient of the features, masked to the active ones, in the sign buffer
        grad_mag = None
        if grad_recon is not None:
            grad_mag = torch.mm(grad_recon, W_dec.t(), out=work)
            if grad_feats is not None:
                grad_mag.add_(grad_feats)
        elif grad_feats is not None:
            grad_mag = grad_feats.clone()
        grad_r = grad_b_mag = None
        if grad_mag is not None:
            torch.ops.aten.threshold_backward.grad_input(grad_mag, feats, 0.0, grad_input=grad_mag)
            grad_b_mag = grad_mag.sum(0)
            # d/dr of relu(h e^r + b_mag) = grad * (f - b_mag) on active entries (h e^r = f - b_mag there)
            grad_r = _column_dots(grad_mag, feats).addcmul_(b_mag, grad_b_mag, value=-1)
            grad_mag.mul_(scale)  # now the magnitude path's gradient of h
        # gate path: auxiliary reconstruction and L1
        grad_gate = None
        if grad_via is not None:
            grad_gate = torch.mm(grad_via, W_dec.t(), out=scratch(gate.shape, gate))
        if grad_l1 is not None:
            grad_gate = torch.outer(grad_l1, norms) if grad_gate is None else grad_gate.addr_(grad_l1, norms)
        grad_b_gate = None
        if grad_gate is not None:
            torch.ops.aten.threshold_backward.grad_input(grad_gate, gate, 0.0, grad_input=grad_gate)
            grad_b_gate = grad_gate.sum(0)
        grad_h = grad_gate if grad_mag is None else grad_mag if grad_gate is None else grad_mag.add_(grad_gate)
        del grad_gate
        grad_W_enc = grad_b_in = grad_x = None
        if grad_h is not None:
            grad_h_sum = grad_h.sum(0)
            if need[1]:
                if W_enc.stride(0) == 1:
                    grad_W_enc = _weight_grad_like(W_enc, grad_h.t() @ x)
                else:
                    grad_W_enc = _mm_like(x.t(), grad_h, W_enc)
                if b_in is not None:
                    grad_W_enc.addr_(b_in, grad_h_sum, alpha=-1)
            if b_in is not None and need[5]:
                grad_b_in = -(W_enc @ grad_h_sum)
            if need[0]:
                grad_x = grad_h @ W_enc.t()
        return (grad_x, grad_W_enc, grad_b_gate if need[2] else None, grad_r if need[3] else None,
                grad_b_mag if need[4] else None, grad_b_in, grad_W_dec, grad_b_dec)  # fmt: skip


def gated_sae(
    x: Tensor,
    W_enc: Tensor,
    b_gate: Tensor,
    r_mag: Tensor,
    b_mag: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A Gated SAE's training pass as one autograd node (Rajamanoharan et al. 2024, weight sharing).

    With ``h = (x - b_in) @ W_enc`` (one GEMM serves both paths) and ``gate = relu(h + b_gate)``, returns
    ``feats = 1[gate > 0] * relu(h * exp(r_mag) + b_mag) [n, d_sae]``, ``recon = feats @ W_dec + b_dec [n, d_out]``,
    the auxiliary reconstruction ``via_gate = gate @ W_dec + b_dec [n, d_out]`` -- through a *frozen* decoder: its
    gradient reaches only the gate path -- the per-token L1 term ``gate @ ||W_dec||_rows [n]`` (its gradient reaches
    ``W_dec`` through the row norms), the number of active features per token ``l0 [n]`` and which features fired
    in the batch ``[d_sae]`` (bool). The backward reuses the forward's buffers: beyond the decoder's two extra GEMMs
    (the auxiliary reconstruction and its input gradient), a step costs what a ReLU SAE's does plus a few
    elementwise passes.
    """
    return _GatedSAE.apply(x, W_enc, b_gate, r_mag, b_mag, b_in, W_dec, b_dec)
