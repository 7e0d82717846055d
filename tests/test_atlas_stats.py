"""The atlas's streaming statistics: equal to brute force, order-independent merges, exact state round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.atlas import FeatureAccumulator, decode_keys, encode_keys, hist_edges
from prisma_lightning.atlas.stats import firing_entries

B, T, F, K, P = 24, 5, 12, 4, 4  # images per batch, tokens (1 prefix + 4 patches), features, top-k, patches


def make_batches(n_batches: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.relu(torch.randn(n_batches, B, T, F, generator=gen)) * 3
    feats = feats * (torch.rand(n_batches, B, T, F, generator=gen) < 0.3)
    feats[..., F - 1] = 0  # a dead feature
    feats[0, 3] = feats[0, 5]  # two identical images: an exact tie, broken by the lower image id
    return feats


def run(feats: torch.Tensor, batches: list[int] | None = None, acc: FeatureAccumulator | None = None):
    acc = acc or FeatureAccumulator(F, K, P, patch_start=1, hist_bins=8, hist_range=(-2.0, 2.0), gt_images=40,
                                    n_factors=2)  # fmt: skip
    for i in batches if batches is not None else range(feats.shape[0]):
        ids = torch.arange(i * B, (i + 1) * B)
        acc.update(feats[i], ids, labels=ids % 3, classes=torch.stack([ids % 2, ids % 5], 1))
    return acc


def test_statistics_equal_brute_force() -> None:
    feats = make_batches()
    acc = run(feats)
    tokens = feats.reshape(-1, F)
    fire = tokens > 0
    assert torch.equal(acc.fire_tokens, fire.sum(0))
    assert int(acc.n_tokens) == tokens.shape[0] and int(acc.n_images) == feats.shape[0] * B
    assert_close(acc.act_sum, tokens.double().sum(0))
    assert_close(acc.act_max, tokens.amax(0))
    images = feats.reshape(-1, T, F).amax(1)  # [N, F] image scores
    assert torch.equal(acc.fire_images, (images > 0).sum(0))
    summary = acc.summary()
    assert_close(summary["mean_all"], tokens.double().mean(0))
    assert math.isnan(summary["mean_firing"][F - 1]) and summary["frac_nonzero"][F - 1] == 0
    # Histogram: 8 bins over log10 in [-2, 2], out-of-range values in the first / last bin.
    edges = hist_edges(8, (-2.0, 2.0))
    for f in range(F):
        v = tokens[fire[:, f], f].double()
        b = ((v.log10() + 2) * 2).floor().clamp(0, 7).long()
        assert torch.equal(acc.hist[f], torch.bincount(b, minlength=8)), f
    assert_close(edges[[0, 4, 8]], torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64))


def test_top_k_images_maps_and_labels_equal_brute_force() -> None:
    feats = make_batches()
    acc = run(feats)
    images = feats.reshape(-1, T, F)
    scores = images.amax(1)
    top_scores, top_ids = acc.top()
    for f in range(F):
        order = sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i, f]), i))
        expected = [i for i in order[:K] if scores[i, f] > 0]
        got = [i for i in top_ids[f].tolist() if i >= 0]
        assert got == expected, f
        for j, i in enumerate(expected):
            assert top_scores[f, j] == scores[i, f]
            assert acc.top_labels[f, j] == i % 3
            ratio = images[i, 1:, f] / scores[i, f]
            assert torch.equal(acc.top_maps[f, j], (ratio * 255).round().to(torch.uint8))
        assert (top_ids[f, len(expected) :] == -1).all() and (acc.top_labels[f, len(expected) :] == -1).all()
    assert (top_ids[F - 1] == -1).all()  # the dead feature has no top image
    # The tie: images 3 and 5 have equal scores everywhere; where both are listed, 3 comes first.
    for f in range(F):
        ids = top_ids[f].tolist()
        if 3 in ids and 5 in ids:
            assert ids.index(3) < ids.index(5)


def test_merge_is_order_independent_and_equals_one_pass() -> None:
    """Two 'ranks' with interleaved batches, merged either way round, equal one accumulator over everything."""
    feats = make_batches(6)
    whole = run(feats).state_dict()
    a, b = run(feats, [0, 2, 4]), run(feats, [1, 3, 5])
    for first, second in ((a, b), (b, a)):
        merged = run(feats, [])
        merged.merge(first)
        merged.merge(second.state_dict())
        state = merged.state_dict()
        for key, value in whole.items():
            if key == "act_sum":
                assert_close(state[key], value, rtol=1e-12, atol=0)
            elif key != "config":
                assert torch.equal(state[key], value), key


def test_state_dict_round_trip_resumes_exactly() -> None:
    feats = make_batches(6)
    whole = run(feats).state_dict()
    first = run(feats, [0, 1, 2])
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in first.state_dict().items()}
    resumed = run(feats, [])
    resumed.load_state_dict(saved)
    run(feats, [3, 4, 5], acc=resumed)
    for key, value in resumed.state_dict().items():
        assert key == "config" or torch.equal(value, whole[key]), key
    scores, classes, ids = resumed.ground_truth_rows()
    assert torch.equal(ids, torch.arange(40)) and torch.equal(classes[:, 1], ids % 5)
    assert_close(scores, feats.reshape(-1, T, F).amax(1)[:40])
    wrong = FeatureAccumulator(F, K + 1, P, patch_start=1)
    with pytest.raises(ValueError, match="saved atlas state"):
        wrong.load_state_dict(saved)


def test_keys_order_scores_then_lower_ids() -> None:
    scores = torch.tensor([[0.5], [2.0], [0.5], [0.0], [1e-30]])
    ids = torch.tensor([7, 1, 3, 9, 4])
    keys = encode_keys(scores, ids).squeeze(1)
    order = torch.argsort(keys, descending=True).tolist()
    assert order == [1, 2, 0, 4, 3]  # 2.0, then 0.5 with id 3 before id 7, then the tiny one; 0 is empty
    value, image = decode_keys(keys)
    assert_close(value, torch.tensor([0.5, 2.0, 0.5, 0.0, 1e-30]))
    assert image.tolist() == [7, 1, 3, -1, 4]


def test_firing_entries_matches_nonzero() -> None:
    x = torch.relu(torch.randn(1001 * 2)) * (torch.rand(2002) < 0.1)
    x[5] = -0.0
    x[6] = -1.0
    idx, vals = firing_entries(x)
    expected = torch.nonzero(x > 0).squeeze(1)
    assert torch.equal(idx, expected) and torch.equal(vals, x[expected])
    idx, _ = firing_entries(x[:-1].contiguous())  # odd length: the plain path
    assert torch.equal(idx, torch.nonzero(x[:-1] > 0).squeeze(1))


def test_bad_shapes_are_reported() -> None:
    acc = FeatureAccumulator(F, K, P)
    with pytest.raises(ValueError, match="d_sae=12"):
        acc.update(torch.zeros(2, T, F + 1), torch.arange(2))
    with pytest.raises(ValueError, match="ids has 3 entries"):
        acc.update(torch.zeros(2, T, F), torch.arange(3))
