"""Reusable CPU work buffers for the fused training passes.

A training step of a ``d_sae``-wide SAE needs a few ``[batch, d_sae]`` temporaries (pre-activations that only feed a
selection, the L0 / gradient buffer of the fused nodes). On the CPU a fresh tensor of that size comes straight from
the operating system (glibc maps allocations above 32 MiB anew every time), so each step pays page faults over the
whole buffer -- for ``batch = 2048, d_sae = 12288`` about a quarter of a millisecond per megabyte, a few percent of
the step per buffer. :func:`scratch` hands out a buffer kept from an earlier step instead, but only one that nothing
else still holds: no Python reference (an autograd context that has not run its backward yet), no tensor sharing
its storage (a view, a saved tensor). Otherwise it allocates a new one. CUDA tensors are always fresh (PyTorch's
caching allocator already reuses memory there), and so are tensors made under ``torch.inference_mode`` (which could
not be written outside it later).

Contents are uninitialised; callers write every element before reading (``out=`` of a matmul or elementwise op).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

MAX_BUFFERS = 6
"""Buffers kept (least recently used dropped first): enough for the passes of one SAE step at a time."""

_POOL: OrderedDict[int, Tensor] = OrderedDict()
"""Flat buffers by a running id; each hand-out is a new tensor on its storage, so every holder counts."""
_NEXT = [0]


def _storage_holders(buf: Tensor) -> int:
    """Tensors sharing ``buf``'s storage, ``buf`` included (the temporary storage handle is not counted)."""
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) - 1


def scratch(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """An uninitialised ``shape`` tensor with ``like``'s dtype, on its device; on the CPU a kept buffer that no
    tensor still uses when there is one (each hand-out is a new tensor on its storage, so any holder -- a Python
    reference, a saved tensor, a view -- keeps it busy)."""
    if like.device.type != "cpu" or torch.is_inference_mode_enabled():  # (an inference tensor cannot be kept)
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    shape = tuple(shape)
    numel = 1
    for size in shape:
        numel *= size
    for key, buf in _POOL.items():
        if buf.numel() == numel and buf.dtype == like.dtype and _storage_holders(buf) == 1:
            _POOL.move_to_end(key)
            return _on_storage(buf, shape)
    buf = torch.empty(numel, dtype=like.dtype)
    _NEXT[0] += 1
    _POOL[_NEXT[0]] = buf
    while len(_POOL) > MAX_BUFFERS:
        _POOL.popitem(last=False)
    return _on_storage(buf, shape)


def _on_storage(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A new contiguous tensor on ``buf``'s storage -- not a view, so autograd treats it (as a Function output, a
    gradient) like any fresh tensor."""
    out = torch.empty(0, dtype=buf.dtype)
    return out.set_(buf.untyped_storage(), 0, shape)


def release() -> None:
    """Drop every kept buffer (their memory returns once nothing else holds them)."""
    _POOL.clear()
