"""torchmetrics Metrics for SAE evaluation (L0, explained variance, cosine similarity, CE recovered, firing)."""

from prisma_lightning.metrics.sae_metrics import L0, CERecovered, ExplainedVariance, FeatureFiring, MeanCosineSimilarity

__all__ = ["CERecovered", "ExplainedVariance", "FeatureFiring", "L0", "MeanCosineSimilarity"]
