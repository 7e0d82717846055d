"""SAE evaluation metrics as torchmetrics ``Metric``s: sums are accumulated, so DDP sync is exact.

Every metric here is a ratio of sums over the whole evaluation set (never a mean of per-batch ratios), so the
result does not depend on how the data was batched or sharded across processes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


class L0(Metric):
    """Mean number of active features per token: ``sum(feats != 0) / n_tokens``.

    ``update(feats [..., d_sae])`` or, for sparse codes, ``update_counts(l0 [...])`` with per-token counts.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("active", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, feats: Tensor) -> None:
        rows = _rows(feats)
        self.active += (rows.abs() > 0).sum().double()  # NaN is not active (a diverged SAE must not look sparse-ok)
        self.tokens += rows.shape[0]

    def update_counts(self, l0: Tensor) -> None:
        self.active += l0.double().sum()
        self.tokens += l0.numel()

    def compute(self) -> Tensor:
        return self.active / self.tokens.clamp_min(1)


class ExplainedVariance(Metric):
    """``1 - SSE / SST`` over the whole set: SSE = sum ||x - x_hat||^2, SST = sum ||x - mean(x)||^2.

    The mean is the mean over all tokens seen (accumulated as sums in float64), not per batch.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sse", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x_hat: Tensor, x: Tensor) -> None:
        x, x_hat = _rows(x).double(), _rows(x_hat).double()
        if x.shape != x_hat.shape:
            raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} must have the same shape.")
        if self.sum.numel() == 0:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.sse += (x - x_hat).pow(2).sum()
        self.sum_sq += x.pow(2).sum()
        self.sum += x.sum(0)
        self.n += x.shape[0]

    def compute(self) -> Tensor:
        n = self.n.clamp_min(1)
        sst = self.sum_sq - self.sum.pow(2).sum() / n
        return 1 - self.sse / sst.clamp_min(1e-30)


class MeanCosineSimilarity(Metric):
    """Mean over tokens of ``cos(x_i, x_hat_i)`` (each row compared with its own reconstruction)."""

    full_state_update = False

    def __init__(self, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = _rows(a).double(), _rows(b).double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=self.eps)  # over the feature axis
        self.total += cos.sum()
        self.n += cos.numel()

    def compute(self) -> Tensor:
        return self.total / self.n.clamp_min(1)


class CERecovered(Metric):
    """Cross-entropy with the clean model, with the SAE spliced in, and with the hook zero-ablated.

    ``compute()`` returns a dict: ``ce_clean``, ``ce_recon``, ``ce_zero`` (means over examples) and
    ``ce_recovered_pct = (ce_zero - ce_recon) / (ce_zero - ce_clean) * 100``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("clean", "recon", "zero", "n"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits_clean: Tensor, logits_recon: Tensor, logits_zero: Tensor, labels: Tensor) -> None:
        ce = torch.nn.functional.cross_entropy
        self.clean += ce(logits_clean.double(), labels, reduction="sum")
        self.recon += ce(logits_recon.double(), labels, reduction="sum")
        self.zero += ce(logits_zero.double(), labels, reduction="sum")
        self.n += labels.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        clean, recon, zero = self.clean / n, self.recon / n, self.zero / n
        return {
            "ce_clean": clean,
            "ce_recon": recon,
            "ce_zero": zero,
            "ce_recovered_pct": (zero - recon) / (zero - clean) * 100,
        }


class FeatureFiring(Metric):
    """How often each feature fires: counts ``[d_sae]`` over tokens.

    ``compute()`` returns a dict: ``firing_rate [d_sae]``, ``log10_density [d_sae]`` (log10 of the rate, with
    1e-10 for features that never fired), ``alive_pct`` (features that fired at least once), ``dead_count``
    (rate < ``dead_below``) and ``dense_count`` (rate > ``dense_above``).
    """

    full_state_update = False

    def __init__(self, d_sae: int, dead_below: float = 1e-8, dense_above: float = 1e-1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.d_sae, self.dead_below, self.dense_above = d_sae, dead_below, dense_above
        self.add_state("counts", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, feats: Tensor) -> None:
        rows = _rows(feats)
        if rows.shape[1] != self.d_sae:
            raise ValueError(f"Expected features of width d_sae={self.d_sae}, got {rows.shape[1]}.")
        self.counts += (rows.abs() > 0).sum(0).double()  # NaN never counts as firing
        self.tokens += rows.shape[0]

    def update_sparse(self, indices: Tensor, n_tokens: int) -> None:
        """From the flat ids of active entries (TopK family sparse codes)."""
        self.counts += torch.bincount(indices.flatten(), minlength=self.d_sae).double()
        self.tokens += n_tokens

    def compute(self) -> dict[str, Tensor]:
        rate = self.counts / self.tokens.clamp_min(1)
        return {
            "firing_rate": rate,
            "log10_density": torch.log10(rate.clamp_min(1e-10)),
            "alive_pct": (self.counts > 0).double().mean() * 100,
            "dead_count": (rate < self.dead_below).sum(),
            "dense_count": (rate > self.dense_above).sum(),
        }
