"""Ground-truth evaluation of SAE features against known generative factors (e.g. dSprites' shape, scale, ...).

The inputs are **image-level feature scores** ``scores [N, F]`` (one row per image, one column per SAE feature)
and the images' **factor classes** ``classes [N, n_factors]`` (0-based class index of each factor value, like
``DSpritesGrid.latents_classes`` without the constant colour column). How an image's score is made from its
tokens is the caller's choice; the atlas uses the maximum of the feature over the tokens the SAE was trained on
(the class token alone for a ``tokens='cls'`` SAE).

Three measures, each for every value ``v`` of every factor (a one-vs-rest task: "does the image have value v"):

* **Best single-feature AUROC** (:func:`factor_auroc`, :func:`best_feature_auroc`): the area under the ROC curve
  of each feature's score as a detector of ``v`` (the Mann-Whitney U statistic divided by ``n_pos * n_neg``,
  ties counted as 1/2), maximised over features. 1 means some feature is higher on every image with ``v`` than on
  every image without; 0.5 is chance. Only the direction "fires for v" is scored (no ``1 - AUROC``).
* **Sparse probing** (:func:`sparse_probe`): the images (ordered by image id when ids are given, so the result
  does not depend on how they were sharded) are split by a seeded permutation into a train part
  (``train_fraction``) and a held-out part. On the train part the features are ranked by mean difference
  ``mean(score | v) - mean(score | not v)`` (descending); for each ``k`` in ``ks`` a logistic regression on the
  top-``k`` features (standardised with train statistics, class-balanced sample weights, L2 penalty ``l2`` on the
  weights, fit with Newton's method in float64) predicts ``v`` on the held-out part. Reported: the **balanced
  accuracy** (mean of the true-positive and true-negative rates, so chance is 0.5 for every value however rare)
  and the plain accuracy.
* **Dominance** (:func:`factor_dominance`): a feature's top-activating images are *dominated* by one value of a
  factor when at least ``threshold`` (default 90%) of them share it. Reported per factor: the fraction of the
  features with at least ``min_images`` top images (default: the full top-k) that are dominated.

The torchmetrics classes (:class:`FactorAUROC`, :class:`SparseProbingAccuracy`, :class:`FactorDominance`) keep
the scores, classes and ids as concatenated states, so under DDP they are all-gathered and every rank computes
the same result as one process would (memory: ``N x F`` floats; evaluate on a few thousand images). ``compute()``
returns a flat ``dict[str, Tensor]`` of scalars (ready to log, e.g. as SAE evaluator columns);
:func:`ground_truth_report` returns the full per-value table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DSPRITES_FACTORS: dict[str, int] = {"shape": 3, "scale": 6, "orientation": 40, "posX": 32, "posY": 32}
"""dSprites' factors (without the constant colour) and their number of values on DeepMind's grid."""


# ---------------------------------------------------------------------------------------------- checks
def _check_scores(scores: Tensor, classes: Tensor | None = None, n_factors: int | None = None) -> None:
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a 2-D tensor [n_images, n_features], got {got}.")
    if classes is None:
        return
    want = (scores.shape[0],) if n_factors is None else (scores.shape[0], n_factors)
    if tuple(classes.shape) != want:
        raise ValueError(
            f"classes must have shape {want} (one row per image of scores {tuple(scores.shape)}), "
            f"got {tuple(classes.shape)}."
        )


# ---------------------------------------------------------------------------------------------- AUROC
def average_ranks(scores: Tensor, chunk: int = 256) -> Tensor:
    """1-based ranks of each column of ``scores [N, F]`` with ties given their average rank -> ``[F, N]`` float64.

    Args:
        scores: one column per feature.
        chunk: features ranked at once (bounds the temporary memory).
    """
    _check_scores(scores)
    out = torch.empty(scores.shape[1], scores.shape[0], dtype=torch.float64, device=scores.device)
    for start in range(0, scores.shape[1], chunk):
        cols = scores[:, start : start + chunk].T.contiguous()  # [f, N], compared in its own dtype
        srt = cols.sort(dim=1).values
        lo = torch.searchsorted(srt, cols, right=False)  # elements strictly below
        hi = torch.searchsorted(srt, cols, right=True)  # elements below or equal
        out[start : start + chunk] = (lo + hi + 1).double() / 2
    return out


def rank_sums(scores: Tensor, onehot: Tensor, chunk: int = 256) -> Tensor:
    """Sum of each feature's average ranks over the positives of each column of ``onehot [N, V]`` -> ``[F, V]``
    float64, a chunk of features at a time (the ``[F, N]`` ranks are never held at once)."""
    onehot = onehot.to(torch.float64)
    out = torch.empty(scores.shape[1], onehot.shape[1], dtype=torch.float64, device=scores.device)
    for start in range(0, scores.shape[1], chunk):
        out[start : start + chunk] = average_ranks(scores[:, start : start + chunk], chunk) @ onehot
    return out


def _auroc_from_rank_sums(rank_sum: Tensor, onehot: Tensor) -> Tensor:
    """rank sums ``[F, V]``, positives ``onehot [N, V]`` -> AUROC ``[F, V]`` (Mann-Whitney U / (n_pos n_neg))."""
    n_pos = onehot.to(torch.float64).sum(0)  # [V]
    n_neg = onehot.shape[0] - n_pos
    u = rank_sum - n_pos * (n_pos + 1) / 2
    denom = n_pos * n_neg
    return torch.where(denom > 0, u / denom.clamp_min(1), torch.full_like(u, float("nan")))


def binary_auroc(scores: Tensor, target: Tensor) -> Tensor:
    """AUROC of every column of ``scores [N, F]`` for the boolean ``target [N]`` -> ``[F]`` (ties count 1/2).

    NaN when ``target`` has no positive or no negative.
    """
    _check_scores(scores, target)
    onehot = target.reshape(-1, 1).bool()
    return _auroc_from_rank_sums(rank_sums(scores, onehot), onehot).squeeze(1)


def _onehot(classes: Tensor, n_values: int) -> Tensor:
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= n_values):
        raise ValueError(
            f"classes must lie in [0, {n_values}) for a factor with n_values={n_values}, "
            f"got values in [{int(classes.min())}, {int(classes.max())}]."
        )
    return torch.nn.functional.one_hot(classes.long(), n_values)


def factor_auroc(scores: Tensor, classes: Tensor, n_values: int) -> Tensor:
    """AUROC of every feature for every value of one factor: ``scores [N, F]``, ``classes [N]`` -> ``[V, F]``.

    Args:
        scores: image-level feature scores.
        classes: the factor's class index (``0 .. n_values - 1``) of each image.
        n_values: number of values of the factor.
    """
    return multi_factor_auroc(scores, classes.reshape(-1, 1), [n_values])[0]


def multi_factor_auroc(scores: Tensor, classes: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """:func:`factor_auroc` of several factors at once (the features are ranked once): ``classes [N, n_factors]``,
    ``sizes`` values per factor -> one ``[V, F]`` tensor per factor."""
    _check_scores(scores, classes, len(sizes))
    onehot = torch.cat([_onehot(classes[:, j], int(v)) for j, v in enumerate(sizes)], dim=1)  # [N, sum V]
    auc = _auroc_from_rank_sums(rank_sums(scores, onehot), onehot).T  # [sum V, F]
    return [part.contiguous() for part in auc.split([int(v) for v in sizes])]


def _best(auc: Tensor) -> tuple[Tensor, Tensor]:
    filled = torch.nan_to_num(auc, nan=-1.0)
    best, feature = filled.max(dim=1)
    missing = torch.isnan(auc).all(dim=1)
    best = torch.where(missing, torch.full_like(best, float("nan")), best)
    return best, torch.where(missing, torch.full_like(feature, -1), feature)


def best_feature_auroc(scores: Tensor, classes: Tensor, n_values: int) -> tuple[Tensor, Tensor]:
    """For each value of a factor: the best single feature's AUROC and its index -> ``([V] float64, [V] int64)``.

    A value that no image (or every image) has gets AUROC NaN and feature -1.
    """
    return _best(factor_auroc(scores, classes, n_values))


# ---------------------------------------------------------------------------------------------- probing
class SparseProbeResult(NamedTuple):
    """What :func:`sparse_probe` returns (``K = len(ks)``, ``V`` values of the factor)."""

    balanced_accuracy: Tensor
    """``[K, V]`` held-out balanced accuracy (mean of the true-positive and true-negative rates); NaN when the
    held-out part lacks positives or negatives."""
    accuracy: Tensor
    """``[K, V]`` held-out accuracy."""
    features: Tensor
    """``[V, max(ks)]`` features ranked by train mean difference, best first."""


def split_train(n: int, train_fraction: float, seed: int, ids: Tensor | None = None) -> Tensor:
    """Boolean ``[n]`` train mask: a seeded permutation of the rows (sorted by ``ids`` first when given)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}.")
    order = torch.arange(n) if ids is None else torch.argsort(ids.cpu(), stable=True)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(n * train_fraction))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[perm[:n_train]]] = True
    return mask


def _fit_logistic(x: Tensor, y: Tensor, w: Tensor, l2: float, iters: int, tol: float = 1e-7) -> Tensor:
    """Batched weighted logistic regression by Newton's method: ``x [P, n, d]`` (a bias column appended here),
    ``y, w [P, n]`` -> coefficients ``[P, d + 1]`` (bias last; the bias is not penalised)."""
    p, n, d = x.shape
    xb = torch.cat([x, x.new_ones(p, n, 1)], dim=2)  # [P, n, d + 1]
    xt = xb.transpose(1, 2)  # [P, d + 1, n]
    beta = x.new_zeros(p, d + 1, 1)
    ridge = torch.full((d + 1,), l2, dtype=x.dtype, device=x.device)
    ridge[-1] = 1e-8
    ridge = torch.diag(ridge)
    for _ in range(iters):
        prob = torch.sigmoid(torch.bmm(xb, beta))  # [P, n, 1]
        grad = torch.bmm(xt, w[..., None] * (prob - y[..., None])) + ridge @ beta
        hess = torch.bmm(xt, xb * (w[..., None] * prob * (1 - prob))) + ridge
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if float(step.abs().max()) < tol * (1 + float(beta.abs().max())):
            break
    return beta.squeeze(-1)


def sparse_probe(
    scores: Tensor,
    classes: Tensor,
    n_values: int,
    ks: Sequence[int] = (1, 4, 16),
    train_fraction: float = 0.5,
    seed: int = 0,
    ids: Tensor | None = None,
    l2: float = 1.0,
    iters: int = 25,
    chunk: int = 1024,
) -> SparseProbeResult:
    """Sparse probing of every value of one factor with the top-``k`` features (see the module docstring).

    Args:
        scores: image-level feature scores ``[N, F]``.
        classes: the factor's class index of each image ``[N]``.
        n_values: number of values of the factor.
        ks: numbers of features to probe with (each at most ``F``).
        train_fraction: fraction of the images used for ranking and fitting; the rest is held out.
        seed: seed of the train / held-out split.
        ids: image ids ``[N]``; when given the split follows the ids, not the row order.
        l2: L2 penalty on the (standardised) weights of the summed, class-balanced log loss.
        iters: maximum Newton iterations.
        chunk: features ranked at once (bounds the temporary memory).
    """
    _check_scores(scores, classes)
    n, f = scores.shape
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > f:
        raise ValueError(f"ks must be numbers of features in [1, {f}] (the SAE width), got {ks}.")
    device = scores.device
    train = split_train(n, train_fraction, seed, ids).to(device)
    test = ~train
    onehot = torch.nn.functional.one_hot(classes.long(), n_values).double()  # [N, V]
    yt = onehot[train]
    n_pos = yt.sum(0)  # [V]
    n_neg = yt.shape[0] - n_pos
    # Mean difference in float64, a chunk of features at a time (no [N, F] float64 copy).
    diff = torch.empty(n_values, f, dtype=torch.float64, device=device)
    for start in range(0, f, chunk):
        xt = scores[train, start : start + chunk].double()
        sums = yt.T @ xt  # [V, c]
        diff[:, start : start + chunk] = (
            sums / n_pos.clamp_min(1)[:, None] - (xt.sum(0)[None, :] - sums) / n_neg.clamp_min(1)[:, None]
        )
    ranked = torch.argsort(diff, dim=1, descending=True, stable=True)[:, : max(ks)]  # [V, kmax]
    # Only the selected features are standardised (train statistics) and probed.
    used, where = torch.unique(ranked, return_inverse=True)  # where: [V, kmax] positions in `used`
    sub = scores[:, used].double()  # [N, U]
    mu, sd = sub[train].mean(0), sub[train].std(0, unbiased=False).clamp_min(1e-12)
    z_all = (sub - mu) / sd
    w_pos = (yt.shape[0] / (2 * n_pos.clamp_min(1)))[None, :]  # balanced weights [1, V]
    w_neg = (yt.shape[0] / (2 * n_neg.clamp_min(1)))[None, :]
    weights = (yt * w_pos + (1 - yt) * w_neg).T  # [V, n_train]
    y_test = onehot[test].T.bool()  # [V, n_test]
    z_train, z_test = z_all[train], z_all[test]
    bal, acc = [], []
    for k in ks:
        feats = where[:, :k]  # [V, k] columns of z
        x_train = z_train[:, feats].permute(1, 0, 2)  # [V, n_train, k]
        beta = _fit_logistic(x_train, yt.T, weights, l2, iters)
        x_test = z_test[:, feats].permute(1, 0, 2)  # [V, n_test, k]
        logits = torch.einsum("pnd,pd->pn", x_test, beta[:, :-1]) + beta[:, -1:]
        pred = logits > 0
        tp = (pred & y_test).sum(1).double()
        tn = (~pred & ~y_test).sum(1).double()
        pos, neg = y_test.sum(1).double(), (~y_test).sum(1).double()
        b = (tp / pos.clamp_min(1) + tn / neg.clamp_min(1)) / 2
        bal.append(torch.where((pos > 0) & (neg > 0), b, torch.full_like(b, float("nan"))))
        acc.append((tp + tn) / y_test.shape[1] if y_test.shape[1] else torch.full_like(b, float("nan")))
    return SparseProbeResult(torch.stack(bal), torch.stack(acc), ranked)


# ---------------------------------------------------------------------------------------------- dominance
class DominanceResult(NamedTuple):
    """What :func:`factor_dominance` returns, per feature (``F`` features)."""

    dominated: Tensor
    """``[F]`` bool: eligible and at least ``threshold`` of its top images share one value."""
    share: Tensor
    """``[F]`` float64: the largest fraction of its top images sharing one value (NaN without top images)."""
    value: Tensor
    """``[F]`` int64: that most common value (-1 without top images)."""
    eligible: Tensor
    """``[F]`` bool: the feature has at least ``min_images`` top images."""

    @property
    def fraction(self) -> float:
        """Fraction of the eligible features that are dominated (NaN when none is eligible)."""
        n = int(self.eligible.sum())
        return float(self.dominated.sum()) / n if n else float("nan")


def factor_dominance(
    top_classes: Tensor, n_values: int, threshold: float = 0.9, min_images: int | None = None
) -> DominanceResult:
    """Whether each feature's top images are dominated by one value of a factor.

    Args:
        top_classes: ``[F, k]`` the factor's class of each feature's top images, -1 for an empty slot.
        n_values: number of values of the factor.
        threshold: share of the top images that must have the same value.
        min_images: top images a feature needs to be counted (default ``k``: a full top-k list).
    """
    if top_classes.ndim != 2:
        raise ValueError(f"top_classes must be [n_features, k], got shape {tuple(top_classes.shape)}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    f, k = top_classes.shape
    min_images = k if min_images is None else min_images
    valid = top_classes >= 0
    counts = torch.zeros(f, n_values + 1, dtype=torch.int64, device=top_classes.device)
    counts.scatter_add_(1, torch.where(valid, top_classes.long(), n_values), torch.ones_like(top_classes).long())
    counts = counts[:, :n_values]
    n = valid.sum(1)
    best, value = counts.max(dim=1)
    share = torch.where(n > 0, best.double() / n.clamp_min(1), torch.full((f,), float("nan"), dtype=torch.float64))
    eligible = (n >= max(1, min_images)) & (n > 0)
    dominated = eligible & (best.double() >= threshold * n.double() - 1e-9)
    return DominanceResult(dominated, share, torch.where(n > 0, value, -1), eligible)


def top_images(scores: Tensor, k: int) -> Tensor:
    """Row indices of each feature's ``k`` highest positive scores -> ``[F, k]`` int64 (-1 where fewer fire).

    Ties are broken by the lower row index.
    """
    _check_scores(scores)
    k_eff = min(k, scores.shape[0])
    order = torch.argsort(scores.T, dim=1, descending=True, stable=True)[:, :k_eff]  # [F, k]
    fired = torch.gather(scores.T, 1, order) > 0
    out = torch.full((scores.shape[1], k), -1, dtype=torch.int64, device=scores.device)
    out[:, :k_eff] = torch.where(fired, order, -1)
    return out


# ---------------------------------------------------------------------------------------------- report
def ground_truth_report(
    scores: Tensor,
    classes: Tensor,
    factors: Mapping[str, int] = DSPRITES_FACTORS,
    ids: Tensor | None = None,
    top_classes: Tensor | None = None,
    ks: Sequence[int] = (1, 4, 16),
    top_k: int = 16,
    threshold: float = 0.9,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Every ground-truth measure, per factor and value, as plain Python values (JSON-ready).

    Args:
        scores: image-level feature scores ``[N, F]``.
        classes: factor classes ``[N, n_factors]``, columns in the order of ``factors``.
        factors: factor name -> number of values.
        ids: image ids ``[N]`` (the probe split follows them; see :func:`sparse_probe`).
        top_classes: ``[F, k, n_factors]`` factor classes of each feature's top images (-1 empty) for dominance;
            None takes each feature's ``top_k`` highest-scoring images among ``scores``.
        ks: feature counts of the sparse probes (clipped to ``F``).
        top_k: top images per feature for dominance when ``top_classes`` is None.
        threshold: dominance threshold.
        train_fraction: probe train fraction.
        seed: probe split seed.

    Returns:
        ``{"factors": {name: {"values": [{"value", "n_images", "best_feature", "auroc", "probe": {k: balanced
        accuracy}}...], "mean_auroc", "mean_probe": {k: ...}, "dominance"}}, "n_images", "n_features", "ks",
        "threshold"}``; NaN is written as None.
    """
    names = list(factors)
    _check_scores(scores, classes, len(names))
    ks = sorted({min(int(k), scores.shape[1]) for k in ks})
    if top_classes is None:
        rows = top_images(scores, top_k)  # [F, k]
        top_classes = torch.where(rows[..., None] >= 0, classes[rows.clamp_min(0)], -1)  # [F, k, nf]
    aucs = multi_factor_auroc(scores, classes, [int(factors[n]) for n in names])  # features ranked once
    out: dict[str, Any] = {
        "n_images": int(scores.shape[0]),
        "n_features": int(scores.shape[1]),
        "ks": ks,
        "threshold": threshold,
        "factors": {},
    }
    for j, name in enumerate(names):
        n_values = int(factors[name])
        col = classes[:, j].long()
        auc, feat = _best(aucs[j])
        probe = sparse_probe(scores, col, n_values, ks, train_fraction, seed, ids)
        dom = factor_dominance(top_classes[..., j], n_values, threshold)
        counts = torch.bincount(col, minlength=n_values)
        values = [
            {
                "value": v,
                "n_images": int(counts[v]),
                "best_feature": int(feat[v]),
                "auroc": _num(auc[v]),
                "probe": {str(k): _num(probe.balanced_accuracy[i, v]) for i, k in enumerate(ks)},
            }
            for v in range(n_values)
        ]
        out["factors"][name] = {
            "values": values,
            "mean_auroc": _num(_nanmean(auc)),
            "mean_probe": {str(k): _num(_nanmean(probe.balanced_accuracy[i])) for i, k in enumerate(ks)},
            "dominance": _num(torch.tensor(dom.fraction)),
            "n_dominated": int(dom.dominated.sum()),
            "n_eligible": int(dom.eligible.sum()),
        }
    return out


def _nanmean(x: Tensor) -> Tensor:
    x = x.double()
    keep = ~torch.isnan(x)
    return x[keep].mean() if keep.any() else torch.tensor(float("nan"), dtype=torch.float64)


def _num(x: Tensor | float) -> float | None:
    value = float(x)
    return None if value != value else value


# ---------------------------------------------------------------------------------------------- Metrics
class _FactorScores(Metric):
    """Keeps image-level scores, factor classes and image ids (concatenated states, all-gathered under DDP)."""

    full_state_update = False

    def __init__(self, factors: Mapping[str, int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factors = dict(DSPRITES_FACTORS if factors is None else factors)
        if not self.factors or any(int(v) < 1 for v in self.factors.values()):
            raise ValueError(f"factors must map factor names to value counts >= 1, got {self.factors}.")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("classes", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, classes: Tensor, ids: Tensor | None = None) -> None:
        """Add images: ``scores [B, F]`` (e.g. each feature's max over an image's tokens), ``classes [B, n_factors]``
        (columns in the order of ``factors``), ``ids [B]`` (unique image ids; default: running row numbers, which
        are only unique within one process)."""
        _check_scores(scores, classes, len(self.factors))
        if ids is None:
            seen = sum(int(s.shape[0]) for s in self.scores) if isinstance(self.scores, list) else 0
            ids = torch.arange(seen, seen + scores.shape[0], device=scores.device)
        self.scores.append(scores.detach().float())
        self.classes.append(classes.detach().long())
        self.ids.append(ids.detach().long().reshape(-1))

    def _state(self) -> tuple[Tensor, Tensor, Tensor]:
        scores, classes, ids = (dim_zero_cat(s) for s in (self.scores, self.classes, self.ids))
        order = torch.argsort(ids, stable=True)  # the same rows in the same order however they were sharded
        return scores[order], classes[order], ids[order]


class FactorAUROC(_FactorScores):
    """Best single-feature AUROC per factor value; ``compute()`` -> ``{"<factor>": mean over its values, "mean":
    mean over factors}``.

    Args:
        factors: factor name -> number of values (default: dSprites without colour).
    """

    def compute(self) -> dict[str, Tensor]:
        scores, classes, _ = self._state()
        aucs = multi_factor_auroc(scores, classes, [int(v) for v in self.factors.values()])
        out = {}
        for name, auc in zip(self.factors, aucs, strict=True):
            out[name] = _nanmean(_best(auc)[0])
        out["mean"] = _nanmean(torch.stack(list(out.values())))
        return out


class SparseProbingAccuracy(_FactorScores):
    """Held-out balanced accuracy of sparse probes; ``compute()`` -> ``{"<factor>/k<k>": mean over values}``.

    Args:
        factors: factor name -> number of values (default: dSprites without colour).
        ks: numbers of features per probe.
        train_fraction: fraction of images for ranking and fitting.
        seed: split seed.
    """

    def __init__(
        self,
        factors: Mapping[str, int] | None = None,
        ks: Sequence[int] = (1, 4, 16),
        train_fraction: float = 0.5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(factors, **kwargs)
        self.ks, self.train_fraction, self.seed = [int(k) for k in ks], train_fraction, seed

    def compute(self) -> dict[str, Tensor]:
        scores, classes, ids = self._state()
        ks = sorted({min(k, scores.shape[1]) for k in self.ks})
        out = {}
        for j, (name, n_values) in enumerate(self.factors.items()):
            res = sparse_probe(scores, classes[:, j], int(n_values), ks, self.train_fraction, self.seed, ids)
            for i, k in enumerate(ks):
                out[f"{name}/k{k}"] = _nanmean(res.balanced_accuracy[i])
        return out


class FactorDominance(_FactorScores):
    """Fraction of features whose top-``top_k`` images share one factor value (>= ``threshold``);
    ``compute()`` -> ``{"<factor>": fraction}``.

    Args:
        factors: factor name -> number of values (default: dSprites without colour).
        top_k: top images per feature (highest positive scores; ties to the lower image id).
        threshold: required share of one value.
        min_images: top images a feature needs to count (default ``top_k``).
    """

    def __init__(
        self,
        factors: Mapping[str, int] | None = None,
        top_k: int = 16,
        threshold: float = 0.9,
        min_images: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(factors, **kwargs)
        self.top_k, self.threshold, self.min_images = top_k, threshold, min_images

    def compute(self) -> dict[str, Tensor]:
        scores, classes, _ = self._state()
        rows = top_images(scores, self.top_k)
        out = {}
        for j, (name, n_values) in enumerate(self.factors.items()):
            top = torch.where(rows >= 0, classes[rows.clamp_min(0), j], -1)
            dom = factor_dominance(top, int(n_values), self.threshold, self.min_images)
            out[name] = torch.tensor(dom.fraction, dtype=torch.float64)
        return out


class GroundTruthReport(_FactorScores):
    """Every measure at once; ``compute()`` -> :func:`ground_truth_report`'s dict (per factor and value, JSON-ready).

    Args:
        factors: factor name -> number of values (default: dSprites without colour).
        ks: numbers of features per sparse probe.
        top_k: top images per feature for dominance.
        threshold: dominance threshold.
        train_fraction: probe train fraction.
        seed: probe split seed.
    """

    def __init__(
        self,
        factors: Mapping[str, int] | None = None,
        ks: Sequence[int] = (1, 4, 16),
        top_k: int = 16,
        threshold: float = 0.9,
        train_fraction: float = 0.5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(factors, **kwargs)
        self.ks, self.top_k, self.threshold = [int(k) for k in ks], int(top_k), float(threshold)
        self.train_fraction, self.seed = float(train_fraction), int(seed)

    @property
    def n_images(self) -> int:
        """Images added on this process so far."""
        return sum(int(s.shape[0]) for s in self.scores) if isinstance(self.scores, list) else int(self.scores.shape[0])

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        scores, classes, ids = self._state()
        return ground_truth_report(
            scores.cpu(), classes.cpu(), self.factors, ids.cpu(), ks=self.ks, top_k=self.top_k,
            threshold=self.threshold, train_fraction=self.train_fraction, seed=self.seed,
        )  # fmt: skip
