"""BatchTopK across processes: the selection over 2 ranks' rows equals one process's over the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prisma_lightning.sae import SAEConfig, SparseAutoencoder
from prisma_lightning.sae.sparse_ops import batch_topk_select

K, D_SAE = 3, 40


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(24, D_SAE, generator=gen)
    pre[:12] *= 3  # rank 0's rows dominate: a per-rank selection would differ from the global one
    return pre[:12], pre[12:]


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        values, pattern = batch_topk_select(_batches()[rank], K, dist.group.WORLD)
        dense = torch.zeros(12, D_SAE)
        dense[pattern.rows, pattern.indices] = values
        out[rank] = dense
        # The SAE's training pass with the group: same features and the same running threshold on both ranks.
        sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=D_SAE, architecture="batchtopk", k=K, seed=0))
        sae.batch_topk_group = dist.group.WORLD
        x = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
        feats = sae(x[rank * 12 : (rank + 1) * 12], return_feats=True).feats
        out[f"feats{rank}"] = feats.detach()
        out[f"threshold{rank}"] = sae.running_threshold.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_topk_over_two_ranks_equals_one_process(tmp_path) -> None:
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    whole = torch.cat(_batches())
    values, pattern = batch_topk_select(whole, K)
    expected = torch.zeros_like(whole)
    expected[pattern.rows, pattern.indices] = values
    got = torch.cat([out[0], out[1]])
    assert torch.equal(got, expected)
    assert int((got > 0).sum()) == K * 24 and int((got[:12] > 0).sum()) > K * 12  # the global budget, unevenly

    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=D_SAE, architecture="batchtopk", k=K, seed=0))
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(1))
    one = sae(x, return_feats=True)
    torch.testing.assert_close(torch.cat([out["feats0"], out["feats1"]]), one.feats)
    assert torch.equal(out["threshold0"], out["threshold1"])
    torch.testing.assert_close(out["threshold0"], sae.running_threshold)
