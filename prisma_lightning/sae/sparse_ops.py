"""Index-based sparse encode/decode for the TopK family, with hand-written backward passes.

A TopK SAE keeps ``k`` of ``d_sae`` features per token, so its decoder needs ``B*k*d`` multiply-adds, not the
``B*d_sae*d`` of a dense ``[B, d_sae] @ [d_sae, d]`` matmul. The active features are held as a
:class:`SparsePattern`: a flat list of feature ids grouped by row (the ``embedding_bag`` layout), which also
covers BatchTopK's variable number of features per row and Matryoshka's (row, group) bags.

* :func:`sparse_decode` ``out[r] = sum_e values[e] * W[idx[e]]`` over the entries ``e`` of row ``r``. Backward:
  ``grad_values[e] = <grad_out[row(e)], W[idx(e)]>`` (a gather-dot) and
  ``grad_W[i] = sum_{e: idx(e)=i} values[e] * grad_out[row(e)]`` (a scatter into rows, computed as an
  ``embedding_bag`` over the entries sorted by feature, so each gradient row is written once).
* :func:`sparse_encode` computes the dense pre-activations (the encoder matmul is dense by nature), selects, and
  back-propagates only through the selected entries: ``grad_W_enc`` is built the same row-scatter way (as
  ``[d_sae, d_in]`` rows, then transposed once), ``grad_b_enc`` is a bincount, and the gradient of an
  input-centring bias folds into a matrix-vector product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .scratch import scratch

_EMBEDDING_BAG_SUM = 0  # the `mode` code of embedding_bag's "sum"


class SparsePattern:
    """Active (row, feature) pairs as a flat list grouped by row.

    ``indices [nnz]`` are feature ids, ``offsets [n_rows]`` the start of each row's entries (rows may be empty).
    Derived index structures (row of each entry, entries sorted by feature) are computed once, on first use.
    """

    def __init__(self, indices: Tensor, offsets: Tensor, n_rows: int, n_features: int) -> None:
        self.indices = indices
        self.offsets = offsets
        self.n_rows = n_rows
        self.n_features = n_features
        self._rows: Tensor | None = None
        self._by_feature: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_fixed_k(cls, indices: Tensor, n_features: int) -> SparsePattern:
        """Pattern of a ``[n_rows, k]`` index matrix (k entries per row)."""
        n_rows, k = indices.shape
        offsets = torch.arange(0, n_rows * k, k, device=indices.device)
        return cls(indices.reshape(-1), offsets, n_rows, n_features)

    @classmethod
    def from_counts(cls, indices: Tensor, counts: Tensor, n_features: int) -> SparsePattern:
        """Pattern from flat ``indices`` and the number of entries of each row, ``counts [n_rows]``."""
        offsets = torch.cumsum(counts, 0) - counts
        return cls(indices, offsets, counts.numel(), n_features)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def rows(self) -> Tensor:
        """Row of each entry, ``[nnz]``."""
        if self._rows is None:
            counts = self.counts()
            self._rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.indices.device), counts)
        return self._rows

    def counts(self) -> Tensor:
        """Entries per row, ``[n_rows]``."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.nnz])])
        return ends - self.offsets

    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(order, rows, feature_offsets)``: entry order sorted by feature id, the row of each entry in that
        order, and where each feature's run starts (empty runs for features with no entries)."""
        if self._by_feature is None:
            # A stable sort of int32 keys: deterministic, and on CPU much faster than the default argsort of
            # int64 keys, whose parallel path is pathologically slow when the cores are shared.
            keys, order = torch.sort(self.indices.to(torch.int32), stable=True)
            firsts = torch.arange(self.n_features, dtype=torch.int32, device=keys.device)
            self._by_feature = (order, self.rows[order], torch.searchsorted(keys, firsts))
        return self._by_feature


def scatter_rows(src: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    """``out[i] = sum_{e: idx(e)=i} values[e] * src[row(e)]``, shape ``[n_features, src.shape[1]]``."""
    order, rows, feature_offsets = pattern.by_feature()
    return F.embedding_bag(rows, src, feature_offsets, mode="sum", per_sample_weights=values[order].to(src.dtype))


def gather_dot(grad: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
    """``out[e] = <grad[row(e)], weight[idx(e)]>``, shape ``[nnz]``, without materialising the gathered rows."""
    grad = grad.contiguous()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, weight, pattern.indices, pattern.offsets, pattern.rows, _EMBEDDING_BAG_SUM, -1
    )


def _bag_sum(values: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
    return F.embedding_bag(
        pattern.indices, weight, pattern.offsets, mode="sum", per_sample_weights=values.to(weight.dtype)
    )


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(values, weight)
        ctx.pattern = pattern
        return _bag_sum(values, weight, pattern)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_values = gather_dot(grad_out, weight, pattern) if ctx.needs_input_grad[0] else None
        grad_weight = scatter_rows(grad_out.contiguous(), values, pattern) if ctx.needs_input_grad[1] else None
        return grad_values, grad_weight, None


def sparse_decode(values: Tensor, weight: Tensor, pattern: SparsePattern) -> Tensor:
    """``[n_rows, d]`` rows ``sum_e values[e] * weight[idx(e)]``; differentiable in ``values`` and ``weight``."""
    if pattern.nnz == 0:
        return weight.new_zeros(pattern.n_rows, weight.shape[1]) + 0 * values.sum()
    return _SparseDecode.apply(values, weight, pattern)


def encoder_bias(W_enc: Tensor, b_enc: Tensor | None, b_in: Tensor | None) -> Tensor | None:
    """The bias of ``(x - b_in) @ W_enc + b_enc`` written as ``x @ W_enc + bias``: ``b_enc - b_in @ W_enc`` (None
    when both are None)."""
    if b_in is None:
        return b_enc
    if b_enc is None:
        return -(b_in @ W_enc)
    return torch.addmv(b_enc, W_enc.t(), b_in, alpha=-1)


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, b_in: Tensor | None, reuse: bool = False) -> Tensor:
    """``(x - b_in) @ W_enc + b_enc`` as one ``addmm`` (the centring folds into the bias, see :func:`encoder_bias`;
    ``b_enc`` None: no bias, a plain ``mm``).

    ``reuse``: write into a kept buffer (:func:`~prisma_lightning.sae.scratch.scratch`; inside autograd Functions
    and ``no_grad`` code only, where ``out=`` is allowed)."""
    bias = encoder_bias(W_enc, b_enc, b_in)
    out = scratch((x.shape[0], W_enc.shape[1]), x) if reuse else None
    if bias is None:
        return torch.mm(x, W_enc, out=out)
    return torch.addmm(bias, x, W_enc, out=out)


Selector = Callable[[Tensor], tuple[Tensor, SparsePattern]]
"""Maps dense pre-activations ``[n, d_sae]`` to (selected post-ReLU values ``[nnz]``, their pattern)."""


def transpose_into(out: Tensor, src: Tensor, rows: int = 64) -> Tensor:
    """``out[:] = src.T`` for a 2-D ``src``; on the CPU in blocks of ``rows`` rows of ``src`` (each block's columns
    land in cache-sized pieces of ``out``: several times faster than one strided copy of a large matrix)."""
    if src.device.type != "cpu":
        return out.copy_(src.t())
    for start in range(0, src.shape[0], rows):
        out[:, start : start + rows].copy_(src[start : start + rows].t())
    return out


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_in, select: Selector, out: list):
        with torch.no_grad():  # the pre-activations only feed the selection: a reused buffer (see scratch)
            pre = pre_activations(x, W_enc, b_enc, b_in, reuse=True)
            values, pattern = select(pre)
            del pre
        out.append(pattern)
        ctx.pattern = pattern
        ctx.save_for_backward(x, W_enc, b_in, values)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, W_enc, b_in, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        # ReLU after selection: a zero value had a non-positive pre-activation and passes no gradient.
        grad = torch.where(values > 0, grad_values, 0)
        grad_b = grad.new_zeros(pattern.n_features).index_add_(0, pattern.indices, grad)
        grad_x = grad_w = grad_b_in = None
        if ctx.needs_input_grad[1]:
            grad_w_t = scatter_rows(x, grad, pattern)  # [d_sae, d_in]: one contiguous row per active feature
            if b_in is not None:
                grad_w_t.addr_(grad_b, b_in, alpha=-1)
            # back to W_enc's layout with one blocked transpose (optimizers and autograd want matching strides)
            grad_w = grad_w_t.t() if W_enc.stride(0) == 1 else transpose_into(scratch(W_enc.shape, W_enc), grad_w_t)
        if b_in is not None and ctx.needs_input_grad[3]:
            grad_b_in = -(W_enc @ grad_b)
        if ctx.needs_input_grad[0]:
            grad_x = _bag_sum(grad, W_enc.t().contiguous(), pattern)
        return grad_x, grad_w, grad_b if ctx.needs_input_grad[2] else None, grad_b_in, None, None


def sparse_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_in: Tensor | None, select: Selector
) -> tuple[Tensor, SparsePattern]:
    """Dense pre-activations, then ``select``; gradients flow only through the selected entries.

    Returns the selected post-ReLU values ``[nnz]`` (differentiable in ``x``, ``W_enc``, ``b_enc``, ``b_in``) and
    their :class:`SparsePattern`.
    """
    out: list[SparsePattern] = []
    values = _SparseEncode.apply(x, W_enc, b_enc, b_in, select, out)
    return values, out[0]


def topk_select(pre: Tensor, k: int) -> tuple[Tensor, SparsePattern]:
    """The ``k`` largest pre-activations of each row, ReLU applied (``topk(relu(z)) == relu(topk(z))``)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu_().reshape(-1), SparsePattern.from_fixed_k(indices, pre.shape[-1])


def batch_topk_select(pre: Tensor, k: int, group: Any = None) -> tuple[Tensor, SparsePattern]:
    """The ``k * n_rows`` largest positive pre-activations of the whole batch (rows get varying counts).

    Exact without sorting the ``n * d_sae`` entries: a strided sample gives a level ``lo`` a little below the
    selection threshold, the entries above ``lo`` (about twice as many as needed) are gathered in row-major
    order, and the exact threshold ``t`` is found among them; ``lo`` is lowered if too few entries pass. Entries
    equal to ``t`` are all kept. Entries come grouped by row with increasing feature ids within a row.

    With a ``torch.distributed`` process ``group`` the batch is the union of every rank's rows (DDP): the
    selection keeps ``k * (rows of all ranks)`` entries in all, as one process would on the whole global batch.
    Each rank proposes its own top candidates, they are all-gathered (``k * n_global`` values at most per rank),
    and every rank keeps its entries at or above the global threshold.
    """
    n, d_sae = pre.shape
    flat = pre.reshape(-1)
    n_global = n
    if group is not None:
        count = torch.tensor([n], device=pre.device, dtype=torch.long)
        torch.distributed.all_reduce(count, group=group)
        n_global = int(count)
    total = min(k * n_global, flat.numel())  # no rank can hold more of the selection than its own entries
    values, where = _entries_above_level(pre, total)
    if group is None:
        candidates, want = values, total
    else:
        candidates, want = _gather_candidates(values, total, group), k * n_global
    if int((candidates > 0).sum()) > want:  # else every candidate is kept
        t = candidates.topk(want, sorted=False).values.min()
        chosen = (values >= t).nonzero().squeeze(1)
        values, where = values.index_select(0, chosen), where.index_select(0, chosen)
    return values, _pattern_from_flat(where, n, d_sae)


def _gather_candidates(values: Tensor, total: int, group: Any) -> Tensor:
    """Every rank's ``total`` largest candidate values (all > 0), concatenated; padding entries are -1."""
    mine = values.topk(total, sorted=False).values if values.numel() > total else values
    size = torch.tensor([mine.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(sizes, size, group=group)
    padded = torch.full((int(max(int(s) for s in sizes)),), -1.0, dtype=values.dtype, device=values.device)
    padded[: mine.numel()] = mine
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(gathered, padded, group=group)
    return torch.cat(gathered)


def _entries_above_level(pre: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Values and flat positions of the entries above a level ``lo >= 0`` chosen so that at least ``total`` pass
    (or all positive entries, if fewer are positive); a strided sample sets ``lo`` at about ``2 * total``."""
    n, d_sae = pre.shape
    flat = pre.reshape(-1)
    stride = max(1, flat.numel() // 65536)
    while math.gcd(stride, d_sae) != 1:  # a stride sharing a factor with d_sae would sample few features
        stride += 1
    sample = flat[::stride]
    want = 2.0 * total / flat.numel()
    while True:
        n_top = math.ceil(want * sample.numel()) + 8
        if n_top < sample.numel():
            lo = sample.topk(n_top, sorted=False).values.min().clamp_min(0)
        else:
            lo = flat.new_zeros(())
        where = _flat_nonzero(pre > lo)
        if where.numel() >= total or bool(lo <= 0):
            break
        want *= 4
    return flat.index_select(0, where), where


def _flat_nonzero(mask: Tensor) -> Tensor:
    """Flat (row-major, hence sorted) positions of the True entries of ``mask``.

    ``nonzero`` plus a gather is far cheaper on CPU than ``masked_select`` or ``x[mask]`` on large tensors.
    """
    return mask.reshape(-1).nonzero().squeeze(1)


def _pattern_from_flat(where: Tensor, n_rows: int, n_features: int) -> SparsePattern:
    rows = torch.div(where, n_features, rounding_mode="floor")
    pattern = SparsePattern.from_counts(where - rows * n_features, torch.bincount(rows, minlength=n_rows), n_features)
    pattern._rows = rows
    return pattern


def threshold_select(pre: Tensor, threshold: Tensor) -> tuple[Tensor, SparsePattern]:
    """Entries with ``pre > max(threshold, 0)`` (BatchTopK at inference), in row-major order (sorted features).

    ``values`` is differentiable in ``pre`` (this is a plain gather, not a custom Function).
    """
    where = _flat_nonzero(pre > threshold.clamp_min(0))
    return pre.reshape(-1)[where], _pattern_from_flat(where, *pre.shape)


def dense_to_pattern(feats: Tensor) -> tuple[Tensor, SparsePattern]:
    """The nonzero entries of dense ``feats [n, d_sae]`` (differentiable values) and their pattern."""
    where = _flat_nonzero(feats != 0)
    return feats.reshape(-1)[where], _pattern_from_flat(where, *feats.shape)


def group_pattern(pattern: SparsePattern, boundaries: Tensor) -> SparsePattern:
    """Split each row into groups of features (``boundaries``: increasing group ends, the last ``d_sae``).

    The result has ``n_rows * n_groups`` bags in (row, group) order; it needs each row's features sorted.
    """
    n_groups = boundaries.numel()
    groups = torch.bucketize(pattern.indices, boundaries, right=True)
    bag = pattern.rows * n_groups + groups
    starts = torch.searchsorted(bag, torch.arange(pattern.n_rows * n_groups, device=bag.device))
    return SparsePattern(pattern.indices, starts, pattern.n_rows * n_groups, pattern.n_features)
