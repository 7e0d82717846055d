"""Ground-truth metrics on hand-computed cases, and end to end on a planted SAE (feature j = shape j)."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.callbacks.atlas_writer import AtlasWriter
from prisma_lightning.datamodules import DSpritesDataModule
from prisma_lightning.metrics.ground_truth import (
    FactorAUROC,
    FactorDominance,
    SparseProbingAccuracy,
    average_ranks,
    best_feature_auroc,
    binary_auroc,
    factor_auroc,
    factor_dominance,
    ground_truth_report,
    sparse_probe,
    top_images,
)
from prisma_lightning.modules.atlas_module import AtlasBatch, AtlasModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder


def test_auroc_of_known_rankings() -> None:
    # The classic example: negatives 0.1, 0.4; positives 0.35, 0.8 -> 3 of 4 pairs ordered = 0.75.
    scores = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    assert_close(binary_auroc(scores, torch.tensor([0, 0, 1, 1])), torch.tensor([0.75], dtype=torch.float64))
    # Ties count 1/2: pairs (pos 1 vs neg 1) = 0.5, (pos 2 vs neg 1) = 1 -> 0.75.
    tied = torch.tensor([[1.0], [1.0], [2.0]])
    assert_close(binary_auroc(tied, torch.tensor([0, 1, 1])), torch.tensor([0.75], dtype=torch.float64))
    # Perfect, reversed and constant features in one call.
    s = torch.tensor([[0.0, 3.0, 1.0], [1.0, 2.0, 1.0], [2.0, 1.0, 1.0], [3.0, 0.0, 1.0]])
    auc = binary_auroc(s, torch.tensor([0, 0, 1, 1]))
    assert_close(auc, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert math.isnan(float(binary_auroc(s, torch.ones(4))[0]))  # no negatives
    assert_close(average_ranks(torch.tensor([[3.0], [1.0], [3.0], [2.0]])),
                 torch.tensor([[3.5, 1.0, 3.5, 2.0]], dtype=torch.float64))  # fmt: skip


def test_factor_auroc_and_best_feature() -> None:
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([
        [5.0, 0.0, 0.1],
        [4.0, 0.0, 0.2],
        [0.0, 3.0, 0.3],
        [1.0, 2.0, 0.4],
        [0.0, 1.0, 0.9],
        [0.0, 0.0, 0.8],
    ])  # fmt: skip
    auc = factor_auroc(scores, classes, 3)  # [V, F]
    assert_close(auc[0, 0], torch.tensor(1.0, dtype=torch.float64))
    assert_close(auc[1, 1], torch.tensor(1.0, dtype=torch.float64))
    assert_close(auc[2, 2], torch.tensor(1.0, dtype=torch.float64))
    # Feature 1 for value 2: positives {1, 0} vs negatives {0, 0, 3, 2}: pairs 1>0,1>0,1<3,1<2 | 0=0,0=0,0<3,0<2
    assert_close(auc[2, 1], torch.tensor((2 + 0.5 * 2) / 8, dtype=torch.float64))
    best, feature = best_feature_auroc(scores, classes, 4)  # value 3 has no image
    assert feature.tolist() == [0, 1, 2, -1]
    assert_close(best[:3], torch.ones(3, dtype=torch.float64))
    assert math.isnan(float(best[3]))
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 2\)"):
        factor_auroc(scores, classes, 2)


def test_sparse_probe_separable_and_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 400
    classes = torch.arange(n) % 4
    noise = torch.rand(n, 20, generator=gen)
    scores = noise.clone()
    scores[:, 7] = (classes == 2).float() * 5 + 0.01 * noise[:, 0]  # feature 7 detects value 2 exactly
    res = sparse_probe(scores, classes, 4, ks=(1, 4), seed=0)
    assert res.features[2, 0] == 7
    assert_close(res.balanced_accuracy[:, 2], torch.ones(2, dtype=torch.float64))
    assert_close(res.accuracy[:, 2], torch.ones(2, dtype=torch.float64))
    # Values with no informative feature: near chance.
    assert float(res.balanced_accuracy[0, [0, 1, 3]].max()) < 0.65
    # The split follows the ids, not the row order.
    perm = torch.randperm(n, generator=gen)
    shuffled = sparse_probe(scores[perm], classes[perm], 4, ks=(1, 4), ids=perm)
    plain = sparse_probe(scores, classes, 4, ks=(1, 4), ids=torch.arange(n))
    assert_close(shuffled.balanced_accuracy, plain.balanced_accuracy)
    with pytest.raises(ValueError, match="ks must be"):
        sparse_probe(scores, classes, 4, ks=(21,))


def test_dominance() -> None:
    top = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],  # 90% value 1: dominated
        [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],  # 80%: not
        [2, 2, 2, -1, -1, -1, -1, -1, -1, -1],  # 3 images only: not eligible with min_images = k
        [-1] * 10,  # never fired
    ])  # fmt: skip
    res = factor_dominance(top, 3, threshold=0.9)
    assert res.dominated.tolist() == [True, False, False, False]
    assert res.eligible.tolist() == [True, True, False, False]
    assert res.value.tolist() == [1, 1, 2, -1]
    assert_close(res.share[:3], torch.tensor([0.9, 0.8, 1.0], dtype=torch.float64))
    assert res.fraction == 0.5
    assert factor_dominance(top, 3, threshold=0.9, min_images=3).dominated.tolist() == [True, False, True, False]


def test_top_images_ties_and_silent_features() -> None:
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    assert top_images(scores, 3).tolist() == [[1, 0, 2], [-1, -1, -1]]


def test_metrics_match_functions_and_sharding() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 120
    classes = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2], 1)
    scores = torch.rand(n, 6, generator=gen)
    scores[:, 0] += (classes[:, 0] == 1) * 2.0
    factors = {"shape": 3, "side": 2}
    ids = torch.arange(n)
    metrics = [FactorAUROC(factors), SparseProbingAccuracy(factors, ks=(1, 4)), FactorDominance(factors, top_k=8)]
    shards = [FactorAUROC(factors), SparseProbingAccuracy(factors, ks=(1, 4)), FactorDominance(factors, top_k=8)]
    for m in metrics:
        m.update(scores, classes, ids)
    for m in shards:  # out of order, in pieces: same results
        for part in (torch.arange(60, 120), torch.arange(0, 60)):
            m.update(scores[part], classes[part], ids[part])
    for m, s in zip(metrics, shards, strict=True):
        a, b = m.compute(), s.compute()
        assert a.keys() == b.keys()
        for key in a:
            assert_close(a[key], b[key], equal_nan=True)
    auroc = metrics[0].compute()
    best, _ = best_feature_auroc(scores, classes[:, 0], 3)
    assert_close(auroc["shape"], best.mean())
    assert set(metrics[1].compute()) == {"shape/k1", "shape/k4", "side/k1", "side/k4"}
    report = ground_truth_report(scores, classes, factors, ids=ids, ks=(1, 4), top_k=8)
    assert report["factors"]["shape"]["values"][1]["best_feature"] == 0
    assert report["factors"]["shape"]["values"][1]["auroc"] == 1.0
    assert_close(torch.tensor(report["factors"]["side"]["dominance"], dtype=torch.float64),
                 metrics[2].compute()["side"])  # fmt: skip
    json.dumps(report, allow_nan=False)


# ---------------------------------------------------------------------------------------------- planted SAE
class PlantedAtlasModule(AtlasModule):
    """A fake SAE whose feature j is exactly the indicator of shape j (on every token), plus 2 silent features."""

    def predict_step(self, batch, batch_idx):
        _, labels = batch
        onehot = torch.nn.functional.one_hot(labels, self.sae.d_sae).float()  # [B, 5]
        return AtlasBatch(onehot[:, None, :].expand(-1, self.layout.tokens_per_image, -1).contiguous(), labels)


def test_planted_sae_scores_auroc_one(tmp_path, tiny_vit) -> None:
    dm = DSpritesDataModule(target="shape", cache=False, subset_size=192, val_fraction=0.5, test_fraction=0.0,
                            image_size=16, channels=3, batch_size=32)  # fmt: skip
    writer = AtlasWriter(str(tmp_path / "atlas"), top_k=8, site=False, neighbours=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])  # fmt: skip
    sae = SparseAutoencoder(SAEConfig(d_in=tiny_vit.cfg.d_model, d_sae=5, architecture="relu",
                                      hook_name="blocks.0.hook_resid_post"))  # fmt: skip
    trainer.predict(PlantedAtlasModule(sae, backbone=tiny_vit), datamodule=dm)
    report = json.loads((tmp_path / "atlas" / "ground_truth.json").read_text())
    shape = report["factors"]["shape"]
    assert [v["best_feature"] for v in shape["values"]] == [0, 1, 2]
    assert [v["auroc"] for v in shape["values"]] == [1.0, 1.0, 1.0]
    assert shape["mean_auroc"] == 1.0
    assert all(v["probe"]["1"] == 1.0 for v in shape["values"])
    assert shape["dominance"] == 1.0 and shape["n_eligible"] == 3  # the silent features are not eligible
    assert report["n_images"] == 96
    records = [json.loads(line) for line in (tmp_path / "atlas" / "features.jsonl").read_text().splitlines()]
    for j in range(3):
        assert records[j]["label_purity"] == 1.0
        assert {a["factors"]["shape"] for a in records[j]["activations"]} == {j}
        assert records[j]["frac_images"] == pytest.approx(sum(a == j for a in dm.val_set.labels) / 96, abs=1e-6)
    assert records[3]["activations"] == [] and records[3]["frac_nonzero"] == 0
