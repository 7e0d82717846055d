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

from . import native
from .scratch import scratch
from .sparse_ops import pre_activations, transpose_into

_BYTE = torch.empty(0, dtype=torch.uint8)
"""Dtype template for byte masks taken from :func:`~prisma_lightning.sae.scratch.scratch`."""


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


def _feature_grad(grad_feats: Tensor | None, grad_recon: Tensor | None, W_dec: Tensor, feats: Tensor) -> Tensor:
    """The gradient reaching the features, ``grad_recon @ W_dec.T (+ grad_feats)``, as a contiguous buffer the
    caller may overwrite (zeros when neither is given)."""
    if grad_recon is not None:
        grad = torch.mm(grad_recon, W_dec.t(), out=scratch(feats.shape, feats))
        return grad if grad_feats is None else grad.add_(grad_feats)
    if grad_feats is None:
        return torch.zeros_like(feats, memory_format=torch.contiguous_format)
    return grad_feats.clone(memory_format=torch.contiguous_format)


def _decoder_grads(
    need: tuple[bool, bool],
    feats: Tensor,
    grad_recon: Tensor | None,
    W_dec: Tensor,
    norms: Tensor | None,
    grad_norms: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_W_dec, grad_b_dec)`` of ``recon = feats @ W_dec + b_dec`` plus a penalty that reads the row norms
    ``||W_dec[i]||`` with gradient ``grad_norms [d_sae]`` (``d ||W_dec[i]|| / d W_dec[i] = W_dec[i] / ||W_dec[i]||``);
    ``need`` says which of the two are wanted."""
    grad_W_dec = grad_b_dec = None
    if need[0] and (grad_recon is not None or grad_norms is not None):
        grad_W_dec = _mm_like(feats.t(), grad_recon, W_dec) if grad_recon is not None else torch.zeros_like(W_dec)
        if grad_norms is not None:
            grad_W_dec.addcmul_(W_dec, (grad_norms / norms.clamp_min(1e-12))[:, None])
    if need[1] and grad_recon is not None:
        grad_b_dec = grad_recon.sum(0)
    return grad_W_dec, grad_b_dec


def _encoder_grads(
    need: tuple[bool, ...],
    x: Tensor,
    centred: bool,
    W_enc: Tensor,
    b_in: Tensor | None,
    grad_pre: Tensor,
    grad_pre_sum: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_W_enc, grad_b_in)`` of ``pre = (x - b_in) @ W_enc + ...`` from ``grad_pre [n, d_sae]`` and its
    column sums (needed only with ``b_in``); ``need`` is the node's ``needs_input_grad`` with ``x``, ``W_enc`` and
    ``b_in`` at 0, 1 and 3. ``x`` is the saved input, already centred (``x - b_in``) when ``centred``."""
    grad_x = grad_W_enc = grad_b_in = None
    if need[1]:
        if W_enc.stride(0) == 1:  # feature-major storage: build the transpose
            grad_W_enc = _weight_grad_like(W_enc, grad_pre.t() @ x)
        else:
            grad_W_enc = _mm_like(x.t(), grad_pre, W_enc)
        if b_in is not None and not centred:
            grad_W_enc.addr_(b_in, grad_pre_sum, alpha=-1)
    if b_in is not None and need[3]:
        grad_b_in = -(W_enc @ grad_pre_sum)
    if need[0]:
        grad_x = grad_pre @ W_enc.t()
    return grad_x, grad_W_enc, grad_b_in


def _centred(x: Tensor, b_in: Tensor | None) -> Tensor:
    """``x - b_in`` (``x`` without ``b_in``): the native paths multiply the centred input, so the encoder's weight
    gradient needs no rank-one correction."""
    return x if b_in is None else x - b_in


class _ReluSAE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, l1_norm_weighted):
        ctx.set_materialize_grads(False)
        norms = W_dec.norm(dim=1) if l1_norm_weighted else None
        ctx.native = native.usable(x, W_enc, b_enc, W_dec)
        if ctx.native:  # bias, ReLU, L0, L1 and firing in one C pass (see native)
            x = _centred(x, b_in)  # (saved centred: see _encoder_grads)
            feats = pre_activations(x, W_enc, None, None, reuse=True)
            n, d = feats.shape
            l0, fired = feats.new_empty(n), feats.new_empty(d)
            l1 = feats.new_empty(n) if norms is not None else None
            ptrs = [native.ptr(t) for t in (feats, b_enc.detach().contiguous(), norms, l0, l1, fired)]
            native.call("prisma_relu_forward", n, d, *ptrs)
            fired, ctx.work = fired > 0, None
        else:
            feats = pre_activations(x, W_enc, b_enc, b_in, reuse=True).relu_()
            l1 = feats @ norms if norms is not None else None
            # L0 per token as sign(f).sum(-1): a float pass plus a fast row sum (per-row counting kernels are
            # several times slower on CPU). The [n, d_sae] buffer is then reused for the backward's feature gradient.
            work = torch.sign(feats, out=scratch(feats.shape, feats))
            l0 = work.sum(-1)
            fired = work.sum(0) > 0
            ctx.work = work
        recon = torch.addmm(b_dec, feats, W_dec)
        ctx.mark_non_differentiable(l0, fired)
        ctx.save_for_backward(x, W_enc, b_in, W_dec, norms, feats)
        return feats, recon, l1, l0, fired

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l1, _grad_l0, _grad_fired):
        x, W_enc, b_in, W_dec, norms, feats = ctx.saved_tensors
        need = ctx.needs_input_grad
        passes = _ReluSAE.backward_native if ctx.native else _ReluSAE.backward_torch
        grad_pre, grad_b_enc, grad_norms = passes(ctx, grad_feats, grad_recon, grad_l1)
        grad_W_dec, grad_b_dec = _decoder_grads(need[4:6], feats, grad_recon, W_dec, norms, grad_norms)
        if grad_pre is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, None
        grad_x, grad_W_enc, grad_b_in = _encoder_grads(need, x, ctx.native, W_enc, b_in, grad_pre, grad_b_enc)
        return grad_x, grad_W_enc, grad_b_enc if need[2] else None, grad_b_in, grad_W_dec, grad_b_dec, None

    @staticmethod
    def backward_torch(ctx, grad_feats, grad_recon, grad_l1):
        """The backward's elementwise work in PyTorch passes: the pre-activations' gradient (masked, or None), its
        column sums and the L1 term's gradient of the decoder norms, ``feats^T grad_l1`` (or None)."""
        _, _, _, W_dec, norms, feats = ctx.saved_tensors
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
        grad_norms = feats.t() @ grad_l1 if grad_l1 is not None and ctx.needs_input_grad[4] else None
        if grad_pre is None:
            return None, None, grad_norms
        # ReLU mask applied in place, in one pass, in a buffer this node owns
        torch.ops.aten.threshold_backward.grad_input(grad_pre, feats, 0.0, grad_input=grad_pre)
        return grad_pre, grad_pre.sum(0), grad_norms

    @staticmethod
    def backward_native(ctx, grad_feats, grad_recon, grad_l1):
        """The same as :meth:`backward_torch` in one C pass (L1 gradient, ReLU mask, bias and norm sums)."""
        _, _, _, W_dec, norms, feats = ctx.saved_tensors
        if grad_recon is None and grad_feats is None and grad_l1 is None:
            return None, None, None
        n, d = feats.shape
        grad_l1 = None if grad_l1 is None else grad_l1.contiguous()
        grad = _feature_grad(grad_feats, grad_recon, W_dec, feats)
        sums = feats.new_empty(2, d)  # b_enc, feats^T grad_l1
        ptrs = [native.ptr(t) for t in (grad, feats, norms, grad_l1, sums[0], sums[1])]
        native.call("prisma_relu_backward", n, d, *ptrs)
        return grad, sums[0], sums[1] if grad_l1 is not None else None


def relu_sae(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_in: Tensor | None,
    W_dec: Tensor,
    b_dec: Tensor,
    l1_norm_weighted: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """A ReLU SAE as one autograd node.

    Returns ``feats = relu((x - b_in) @ W_enc + b_enc) [n, d_sae]``, ``recon = feats @ W_dec + b_dec [n, d_out]``,
    with ``l1_norm_weighted`` Anthropic's per-token penalty ``feats @ ||W_dec||_rows [n]`` (else None; its gradient
    reaches ``W_dec`` through the row norms too), the number of active features per token ``l0 [n]`` and which
    features fired in the batch ``[d_sae]`` (bool, no gradient).
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
        ctx.bandwidth, ctx.tanh_scale, ctx.native = bandwidth, tanh_scale, native.usable(x, W_enc, threshold, W_dec)
        if ctx.native:
            return _JumpReluSAE.forward_native(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, threshold)
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
        ctx.near = near
        ctx.save_for_backward(x, W_enc, b_in, W_dec, threshold, feats, rows, cols, norms)
        ctx.mark_non_differentiable(fired)
        return feats, recon, l0, fired, tanh_sum

    @staticmethod
    def forward_native(ctx, x, W_enc, b_enc, b_in, W_dec, b_dec, threshold):
        """The forward's elementwise work as one C pass (see :mod:`~prisma_lightning.sae.native`), the encoder bias
        included: the matmul's output becomes the features in place; the kernel's entries are kept as a byte mask."""
        x = _centred(x, b_in)  # (saved centred: see _encoder_grads)
        pre = pre_activations(x, W_enc, None, None, reuse=True)
        bias = b_enc.detach().contiguous()
        n, d = pre.shape
        near = scratch((n, d), _BYTE)
        l0, fired = pre.new_empty(n), pre.new_empty(d)
        norms = tanh_sum = coef = None
        if ctx.tanh_scale is not None:
            norms = W_dec.norm(dim=1)
            coef, tanh_sum = norms * ctx.tanh_scale, pre.new_empty(n)
        theta = threshold.detach().contiguous()
        args = (n, d, native.ptr(pre), native.ptr(bias), native.ptr(theta), 0.5 * ctx.bandwidth, native.ptr(coef),
                native.ptr(near))  # fmt: skip
        native.call("prisma_jumprelu_forward", *args, native.ptr(l0), native.ptr(tanh_sum), native.ptr(fired))
        feats, fired = pre, fired > 0
        recon = torch.addmm(b_dec, feats, W_dec)
        ctx.near = near
        ctx.save_for_backward(x, W_enc, b_in, W_dec, threshold, feats, coef, norms)
        ctx.mark_non_differentiable(fired)  # (l0 is differentiable: the step estimator's gradient of the threshold)
        return feats, recon, l0, fired, tanh_sum

    @staticmethod
    def backward_native(ctx, grad_feats, grad_recon, grad_l0, grad_tanh):
        """The backward's elementwise work as one C pass; returns the pre-activations' gradient (masked), its
        column sums, the threshold's and the decoder norms' gradients (or None)."""
        x, W_enc, b_in, W_dec, threshold, feats, coef, norms = ctx.saved_tensors
        near, ctx.near = ctx.near, None
        n, d = feats.shape
        grad = _feature_grad(grad_feats, grad_recon, W_dec, feats)
        grad_tanh = None if coef is None or grad_tanh is None else grad_tanh.contiguous()
        grad_l0 = None if grad_l0 is None else grad_l0.contiguous()
        sums = feats.new_empty(4, d)  # b_enc, threshold (JumpReLU STE), threshold (step STE), decoder norms
        ptrs = [native.ptr(t) for t in (grad, feats, near, coef, grad_tanh, grad_l0)]
        native.call("prisma_jumprelu_backward", n, d, *ptrs, *(native.ptr(row) for row in sums))
        bw = ctx.bandwidth
        grad_threshold = sums[1].mul_(-threshold / bw)
        if grad_l0 is not None:
            grad_threshold.sub_(sums[2], alpha=1.0 / bw)
        grad_norms = sums[3].mul_(ctx.tanh_scale) if grad_tanh is not None else None
        return grad, sums[0], grad_threshold, grad_norms

    @staticmethod
    def backward(ctx, grad_feats, grad_recon, grad_l0, _grad_fired, grad_tanh):
        saved = ctx.saved_tensors  # (x, W_enc, b_in, W_dec, threshold, feats, <per path>, norms)
        x, W_enc, b_in, W_dec, _, feats, norms = *saved[:6], saved[-1]
        need = ctx.needs_input_grad
        passes = _JumpReluSAE.backward_native if ctx.native else _JumpReluSAE.backward_torch
        grad_pre, grad_b_enc, grad_threshold, grad_norms = passes(ctx, grad_feats, grad_recon, grad_l0, grad_tanh)
        grad_threshold = grad_threshold if need[6] else None
        grad_W_dec, grad_b_dec = _decoder_grads(need[4:6], feats, grad_recon, W_dec, norms, grad_norms)
        if grad_pre is None:
            return None, None, None, None, grad_W_dec, grad_b_dec, grad_threshold, None, None
        grad_x, grad_W_enc, grad_b_in = _encoder_grads(need, x, ctx.native, W_enc, b_in, grad_pre, grad_b_enc)
        b_enc_grad = grad_b_enc if need[2] else None
        return grad_x, grad_W_enc, b_enc_grad, grad_b_in, grad_W_dec, grad_b_dec, grad_threshold, None, None

    @staticmethod
    def backward_torch(ctx, grad_feats, grad_recon, grad_l0, grad_tanh):
        """The backward's elementwise work in PyTorch passes; returns what :meth:`backward_native` does."""
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
        if grad is None:
            return None, None, grad_threshold, grad_norms
        # the JumpReLU mask (active = feats > 0), in place, in one pass
        grad_pre = torch.ops.aten.threshold_backward.grad_input(grad, feats, 0.0, grad_input=grad)
        return grad_pre, grad_pre.sum(0), grad_threshold, grad_norms


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
        scale = r_mag.exp()
        norms = W_dec.norm(dim=1)
        ctx.native = native.usable(x, W_enc, b_gate, scale, b_mag, W_dec)
        if ctx.native:  # the elementwise work below as one C pass (see native): gate, features, L1, L0, firing
            n, d = x.shape[0], W_enc.shape[1]
            # features (rows :n) and gate (rows n:) in one buffer, so both reconstructions are one matmul
            both = scratch((2 * n, d), x)
            x = _centred(x, b_in)  # (saved centred: see _encoder_grads)
            h = torch.mm(x, W_enc, out=both[:n])
            gate, l1, l0, fired = both[n:], h.new_empty(n), h.new_empty(n), h.new_empty(d)
            biases = (b_gate.detach().contiguous(), scale, b_mag.detach().contiguous(), norms)
            ptrs = [native.ptr(t) for t in (h, gate, *biases, l1, l0, fired)]
            native.call("prisma_gated_forward", n, d, *ptrs)
            feats, fired = h, fired > 0
            recon, via_gate = torch.addmm(b_dec, both, W_dec).split(n)
            ctx.work = None
            ctx.mark_non_differentiable(l0, fired)
            ctx.save_for_backward(x, W_enc, b_in, W_dec, scale, b_mag, norms, feats, gate)
            return feats, recon, via_gate, l1, l0, fired
        h = pre_activations(x, W_enc, None, b_in, reuse=True)  # [n, d_sae], shared by both paths
        gate = torch.add(h, b_gate).relu_()  # relu(pi_gate): the L1 and auxiliary paths read it
        # magnitude path in h's buffer: relu(h * e^r + b_mag), kept where the gate is open
        feats = torch.addcmul(b_mag, h, scale, out=h).relu_()
        # keep it where pi_gate > 0, i.e. where relu(pi_gate) > 0: threshold_backward masks in one pass, no bool temp
        torch.ops.aten.threshold_backward.grad_input(feats, gate, 0.0, grad_input=feats)
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
        passes = _GatedSAE.backward_native if ctx.native else _GatedSAE.backward_torch
        grad_h, grad_b_gate, grad_r, grad_b_mag, grad_norms = passes(ctx, grad_feats, grad_recon, grad_via, grad_l1)
        # (the auxiliary reconstruction reads b_dec and W_dec frozen: only the L1 term's norms add to the decoder's)
        grad_W_dec, grad_b_dec = _decoder_grads(need[6:8], feats, grad_recon, W_dec, norms, grad_norms)
        grad_W_enc = grad_b_in = grad_x = None
        if grad_h is not None:
            grad_h_sum = None
            if b_in is not None:  # (the native pass has both parts' column sums: h's is scale * b_mag's + b_gate's)
                grad_h_sum = torch.addcmul(grad_b_gate, scale, grad_b_mag) if ctx.native else grad_h.sum(0)
            encoder_need = (need[0], need[1], False, need[5])  # (b_in is input 5 here)
            grad_x, grad_W_enc, grad_b_in = _encoder_grads(encoder_need, x, ctx.native, W_enc, b_in, grad_h,
                                                           grad_h_sum)  # fmt: skip
        return (grad_x, grad_W_enc, grad_b_gate if need[2] else None, grad_r if need[3] else None,
                grad_b_mag if need[4] else None, grad_b_in, grad_W_dec, grad_b_dec)  # fmt: skip

    @staticmethod
    def backward_native(ctx, grad_feats, grad_recon, grad_via, grad_l1):
        """The same as :meth:`backward_torch` in one C pass."""
        x, W_enc, b_in, W_dec, scale, b_mag, norms, feats, gate = ctx.saved_tensors
        n, d = feats.shape
        if grad_recon is not None and grad_via is not None:  # both feature gradients from one matmul
            stacked = torch.cat([grad_recon, grad_via], out=scratch((2 * n, grad_recon.shape[1]), feats))
            grads = torch.mm(stacked, W_dec.t(), out=scratch((2 * n, d), feats))
            grad, grad_gate = grads[:n], grads[n:]
            if grad_feats is not None:
                grad.add_(grad_feats)
        else:
            grad = _feature_grad(grad_feats, grad_recon, W_dec, feats)
            grad_gate = None if grad_via is None else torch.mm(grad_via, W_dec.t(), out=scratch((n, d), feats))
        grad_l1 = None if grad_l1 is None else grad_l1.contiguous()
        sums = feats.new_empty(4, d)  # b_mag, sum of (masked gradient * features), b_gate, gate^T grad_l1
        ptrs = [native.ptr(t) for t in (grad, grad_gate, feats, gate, scale, norms, grad_l1)]
        native.call("prisma_gated_backward", n, d, *ptrs, *(native.ptr(row) for row in sums))
        grad_r = sums[1].addcmul_(b_mag, sums[0], value=-1)
        return grad, sums[2], grad_r, sums[0], sums[3] if grad_l1 is not None else None

    @staticmethod
    def backward_torch(ctx, grad_feats, grad_recon, grad_via, grad_l1):
        """The backward's elementwise work in PyTorch passes: the gradient of ``h`` (or None), those of ``b_gate``,
        ``r_mag`` and ``b_mag``, and the L1 term's gradient of the decoder norms, ``gate^T grad_l1`` (or None)."""
        x, W_enc, b_in, W_dec, scale, b_mag, norms, feats, gate = ctx.saved_tensors
        work, ctx.work = ctx.work, None
        grad_norms = gate.t() @ grad_l1 if grad_l1 is not None and ctx.needs_input_grad[6] else None
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
        return grad_h, grad_b_gate, grad_r, grad_b_mag, grad_norms


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
