"""Reused work buffers: handed out again only when nothing holds them, so interleaved passes stay correct."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from prisma_lightning.sae import SAEConfig, SparseAutoencoder
from prisma_lightning.sae.scratch import release, scratch


def test_a_free_buffer_is_reused_and_a_held_one_is_not() -> None:
    release()
    like = torch.zeros(1)
    a = scratch((4, 6), like)
    ptr = a.data_ptr()
    b = scratch((4, 6), like)  # a is still referenced
    assert b.data_ptr() != ptr
    del a
    c = scratch((6, 4), like)  # same size, other shape: a's memory, now free
    assert c.data_ptr() == ptr and c.shape == (6, 4)
    view = c.t()
    del c
    assert scratch((24,), like).data_ptr() not in (ptr, b.data_ptr())  # a view still uses it
    del view
    assert scratch((24,), like).data_ptr() == ptr
    assert scratch((24,), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    release()


def test_passes_with_reused_buffers_equal_passes_with_fresh_ones(monkeypatch) -> None:
    """Each fused node keeps its buffers until its backward: a second pass meanwhile (or a second buffer of the
    same pass) must get its own, so gradients equal those computed with fresh buffers."""
    from prisma_lightning.sae import activations, sparse_ops

    def grads(sae, xs, interleaved: bool) -> list[torch.Tensor]:
        sae.zero_grad(set_to_none=True)
        if interleaved:
            losses = [sae(x).loss for x in xs]
            for loss in losses:
                loss.backward()
        else:
            for x in xs:
                sae(x).loss.backward()
        return [p.grad.clone() for p in sae.parameters() if p.grad is not None]

    def fresh(shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    step_penalty = {"jumprelu_sparsity_loss": "step", "jumprelu_bandwidth": 10.0}  # a dense kernel mask
    for arch, extra in (("relu", {}), ("jumprelu", {}), ("jumprelu", step_penalty), ("gated", {}), ("topk", {"k": 4}),
                        ("batchtopk", {"k": 4})):  # fmt: skip
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, architecture=arch, **extra))
        xs = [torch.randn(16, 8), torch.randn(16, 8)]
        with monkeypatch.context() as m:
            m.setattr(activations, "scratch", fresh)
            m.setattr(sparse_ops, "scratch", fresh)
            want = grads(sae, xs, interleaved=False)
        release()
        for interleaved in (False, True):
            for got, ref in zip(grads(sae, xs, interleaved), want, strict=True):
                assert_close(got, ref, msg=f"{arch} {extra} interleaved={interleaved}")


def test_inference_mode_passes_do_not_leave_buffers_that_training_cannot_write() -> None:
    release()
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, architecture="relu"))
    x = torch.randn(16, 8)
    with torch.inference_mode():
        sae(x)
    sae(x).loss.backward()  # would fail writing into an inference tensor kept from the pass above
    assert all(p.grad is not None for p in (sae.W_enc, sae.W_dec))


def test_consecutive_training_steps_reuse_the_gradient_memory() -> None:
    from prisma_lightning.sae import make_optimizer, train_step

    release()
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, architecture="relu"))
    optimizer = make_optimizer(sae, lr=1e-3)
    x = torch.randn(16, 8)
    train_step(sae, optimizer, x, step=0)
    first = sae.W_enc.grad.data_ptr(), sae.W_dec.grad.data_ptr()
    train_step(sae, optimizer, x, step=1)  # zero_grad(set_to_none=True) gave the buffers back
    assert (sae.W_enc.grad.data_ptr(), sae.W_dec.grad.data_ptr()) == first
    kept = sae.W_enc.grad  # a gradient still held elsewhere is never written over
    train_step(sae, optimizer, x, step=2)
    assert sae.W_enc.grad.data_ptr() != kept.data_ptr()
