"""Metrics against hand-computed values, and independence from batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.metrics import L0, CERecovered, ExplainedVariance, FeatureFiring, MeanCosineSimilarity


def test_l0_hand_computed() -> None:
    feats = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    metric = L0()
    metric.update(feats)
    assert metric.compute().item() == pytest.approx((2 + 1 + 3 + 0) / 4)
    counts = L0()
    counts.update_counts(torch.tensor([2.0, 1.0, 3.0, 0.0]))
    assert counts.compute().item() == pytest.approx(1.5)


def test_explained_variance_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])  # mean (3, 2); SST = 4+4 + 0 + 4+4 = 16
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 2.0], [4.0, 4.0]])  # SSE = 1 + 0 + 1 = 2
    metric = ExplainedVariance()
    metric.update(x_hat, x)
    assert metric.compute().item() == pytest.approx(1 - 2 / 16)


@pytest.mark.parametrize("batch", [1, 3, 7, 50])
def test_metrics_do_not_depend_on_batching(batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=gen) * torch.linspace(0.1, 3, 50)[:, None] + 2.0
    x_hat = x + 0.3 * torch.randn(50, 8, generator=gen)
    feats = torch.relu(torch.randn(50, 16, generator=gen))
    whole = [ExplainedVariance(), L0(), MeanCosineSimilarity(), FeatureFiring(16)]
    parts = [ExplainedVariance(), L0(), MeanCosineSimilarity(), FeatureFiring(16)]
    for metric_set, chunks in ((whole, [slice(0, 50)]), (parts, [slice(i, i + batch) for i in range(0, 50, batch)])):
        for s in chunks:
            metric_set[0].update(x_hat[s], x[s])
            metric_set[1].update(feats[s])
            metric_set[2].update(x[s], x_hat[s])
            metric_set[3].update(feats[s])
    for a, b in zip(whole[:3], parts[:3], strict=True):
        assert_close(a.compute(), b.compute())
    assert_close(whole[3].compute()["firing_rate"], parts[3].compute()["firing_rate"])
    # Mean of per-batch ratios would differ: the metric is a ratio of sums.
    if batch == 7:
        per_batch = []
        for i in range(0, 50, 7):
            m = ExplainedVariance()
            m.update(x_hat[i : i + 7], x[i : i + 7])
            per_batch.append(m.compute())
        assert abs(torch.stack(per_batch).mean() - whole[0].compute()) > 1e-3


def test_cosine_similarity_is_per_token() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    metric = MeanCosineSimilarity()
    metric.update(a, b)
    assert metric.compute().item() == pytest.approx((1 / math.sqrt(2) + -1.0) / 2)


def test_ce_recovered_identity_zero_and_half() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (40,), generator=gen)
    clean = torch.randn(40, 5, generator=gen) * 3
    zero = torch.zeros(40, 5)
    m = CERecovered()
    m.update(clean, clean, zero, labels)  # SAE = identity
    assert m.compute()["ce_recovered_pct"].item() == pytest.approx(100.0)
    m = CERecovered()
    m.update(clean, zero, zero, labels)  # SAE = zero ablation
    assert m.compute()["ce_recovered_pct"].item() == pytest.approx(0.0)
    # A constructed half case: recon CE exactly halfway between clean and zero CE, example by example.
    ce = torch.nn.functional.cross_entropy
    target = (ce(clean, labels, reduction="none") + ce(zero, labels, reduction="none")) / 2
    # logits [t, 0, 0, 0, 0] on the label with CE = log(1 + 4 e^{-t}) -> solve for t.
    t = -torch.log((torch.exp(target) - 1) / 4)
    half = torch.zeros(40, 5)
    half[torch.arange(40), labels] = t
    m = CERecovered()
    m.update(clean, half, zero, labels)
    out = m.compute()
    assert out["ce_recovered_pct"].item() == pytest.approx(50.0, abs=1e-4)
    assert out["ce_zero"].item() == pytest.approx(math.log(5))


def test_feature_firing_alive_dead_dense() -> None:
    feats = torch.zeros(1000, 4)
    feats[:, 0] = 1.0  # fires always -> dense
    feats[:5, 1] = 1.0  # rate 0.005
    metric = FeatureFiring(4)
    metric.update(feats[:500])
    metric.update(feats[500:])
    out = metric.compute()
    assert_close(out["firing_rate"], torch.tensor([1.0, 0.005, 0.0, 0.0], dtype=torch.float64))
    assert out["alive_pct"].item() == pytest.approx(50.0)
    assert out["dead_count"].item() == 2 and out["dense_count"].item() == 1
    assert out["log10_density"][2].item() == pytest.approx(-10.0)
    sparse = FeatureFiring(4)
    sparse.update_sparse(torch.tensor([0, 1, 0, 0]), n_tokens=4)
    assert_close(sparse.compute()["firing_rate"], torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64))
