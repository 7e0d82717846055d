"""torchmetrics Metrics for SAE evaluation (L0, explained variance, cosine similarity, CE recovered, firing) and
ground-truth scores against known generative factors (AUROC, sparse probing, dominance)."""

from prisma_lightning.metrics.ground_truth import (
    DSPRITES_FACTORS,
    FactorAUROC,
    FactorDominance,
    GroundTruthReport,
    SparseProbingAccuracy,
    ground_truth_report,
)
from prisma_lightning.metrics.sae_metrics import L0, CERecovered, ExplainedVariance, FeatureFiring, MeanCosineSimilarity

__all__ = [
    "CERecovered",
    "DSPRITES_FACTORS",
    "ExplainedVariance",
    "FactorAUROC",
    "FactorDominance",
    "FeatureFiring",
    "GroundTruthReport",
    "L0",
    "MeanCosineSimilarity",
    "SparseProbingAccuracy",
    "ground_truth_report",
]
