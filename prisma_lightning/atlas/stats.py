"""Streaming per-feature statistics and top-k images: memory ``O(d_sae x k)`` whatever the number of images.

:class:`FeatureAccumulator` consumes one batch of SAE features ``[B, T, d_sae]`` (dense, or sparse COO for SAEs
that select their features) at a time (``T``: the tokens the SAE reads per image) and keeps, per feature:

* counts and sums: firing tokens (``> 0``), firing images, the sum of activations (float64), the maximum, and a
  histogram of the firing activations over fixed log-spaced bins shared by all features (values below / above
  the range are counted in the first / last bin);
* the top-k images by **image score** (the feature's maximum over the image's tokens), each with the image id,
  its label and the feature's value on every patch token quantised to uint8 relative to that score
  (``round(255 * clamp(value / score, 0, 1))``);
* optionally, for ground-truth evaluation, the scores of every feature on the first ``gt_images`` images (by
  image id) and their factor classes (bounded by ``gt_images x d_sae`` floats).

Only firing entries are touched after one thresholding pass (``nonzero``), so sparse SAEs are cheap. Top-k
entries are ordered by an int64 key ``(float32 bits of the score) << 32 | (2^32 - 1 - image id)``: a strict total
order (higher score first, then lower image id), so merging is associative and commutative -- one process, DDP
ranks merged at the end, and a resumed run all give the same lists. While streaming, each feature's k slots are
an unordered pool: an image that beats the pool's worst entry takes that entry's slot, and only the entering
images' patch maps are written (from the batch's firing entries), so no map is ever copied or moved; the pools
are sorted for results and saved states. The top-k state takes ``d_sae x k x (16 + n_patches)`` bytes (e.g.
51 MB for 16,384 features, k = 16 and 196 patches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_ID_MASK = (1 << 32) - 1
_STAT_KEYS = ("n_images", "n_tokens", "fire_tokens", "fire_images", "act_sum", "act_max", "hist")
_TOP_KEYS = ("top_keys", "top_maps", "top_labels")
_GT_KEYS = ("gt_scores", "gt_classes", "gt_ids")


def hist_edges(bins: int = 64, log10_range: tuple[float, float] = (-4.0, 4.0)) -> Tensor:
    """The ``bins + 1`` log-spaced histogram edges ``10 ** linspace(lo, hi, bins + 1)`` (float64)."""
    lo, hi = log10_range
    return torch.logspace(lo, hi, bins + 1, dtype=torch.float64)


def encode_keys(scores: Tensor, ids: Tensor) -> Tensor:
    """Sortable int64 keys of positive ``scores [B, F]`` for image ``ids [B]``; -1 where the score is not > 0."""
    bits = scores.float().contiguous().view(torch.int32).to(torch.int64)
    keys = (bits << 32) | (_ID_MASK - ids.to(torch.int64))[:, None]
    return torch.where(scores > 0, keys, torch.full_like(keys, -1))


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`encode_keys`: ``(scores float32, ids int64)``; empty slots (-1) give score 0, id -1."""
    empty = keys < 0
    scores = (keys >> 32).to(torch.int32).view(torch.float32)
    ids = _ID_MASK - (keys & _ID_MASK)
    return torch.where(empty, torch.zeros_like(scores), scores), torch.where(empty, torch.full_like(ids, -1), ids)


def firing_entries(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices and values of the entries > 0 of a contiguous 1-D float32 tensor.

    ``nonzero`` costs about the same per element whatever the dtype, so on the CPU the float32 data is scanned as
    int64 words (two values each: half the elements), and the two halves of each non-zero word are checked.
    """
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.numel() % 2 == 0 and flat.is_contiguous():
        words = torch.nonzero(flat.view(torch.int64))  # [n, 1]
        idx = (words * 2 + torch.arange(2, device=flat.device)).view(-1)  # both halves of each word
    else:
        idx = torch.nonzero(flat).squeeze(1)
    vals = flat.index_select(0, idx)  # index_select: faster than advanced indexing for 1-D gathers
    keep = torch.nonzero(vals > 0).squeeze(1)  # -0.0 and negatives do not fire
    return idx.index_select(0, keep), vals.index_select(0, keep)


class FeatureAccumulator:
    """Streaming atlas statistics of ``d_sae`` features (see the module docstring).

    Args:
        d_sae: number of features.
        top_k: images kept per feature.
        n_patches: patch tokens per image whose values are kept for the top images (0: none, e.g. CLS SAEs).
        patch_start: index of the first patch token among the ``T`` tokens of a batch's features.
        hist_bins: histogram bins.
        hist_range: ``(lo, hi)`` log10 range of the histogram.
        gt_images: keep per-image scores of images with id below this (0: no ground-truth rows).
        n_factors: factor columns per image for ground truth.
        device: where the state lives (the features' device).
    """

    def __init__(
        self,
        d_sae: int,
        top_k: int = 16,
        n_patches: int = 0,
        patch_start: int = 0,
        hist_bins: int = 64,
        hist_range: tuple[float, float] = (-4.0, 4.0),
        gt_images: int = 0,
        n_factors: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if d_sae < 1 or top_k < 1 or hist_bins < 1:
            raise ValueError(f"d_sae, top_k and hist_bins must be >= 1, got {d_sae}, {top_k}, {hist_bins}.")
        if not hist_range[0] < hist_range[1]:
            raise ValueError(f"hist_range must be (lo, hi) with lo < hi (log10 units), got {hist_range}.")
        self.d_sae, self.top_k, self.n_patches, self.patch_start = d_sae, top_k, n_patches, patch_start
        self.hist_bins, self.hist_range = hist_bins, (float(hist_range[0]), float(hist_range[1]))
        self.gt_images, self.n_factors = gt_images, n_factors
        dev = torch.device(device) if device is not None else torch.device("cpu")
        i64 = {"dtype": torch.int64, "device": dev}
        self.n_images = torch.zeros((), **i64)
        self.n_tokens = torch.zeros((), **i64)
        self.fire_tokens = torch.zeros(d_sae, **i64)
        self.fire_images = torch.zeros(d_sae, **i64)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.act_max = torch.zeros(d_sae, dtype=torch.float32, device=dev)
        self.hist = torch.zeros(d_sae, hist_bins, **i64)
        self.top_keys = torch.full((d_sae, top_k), -1, **i64)
        self.top_maps = torch.zeros(d_sae, top_k, n_patches, dtype=torch.uint8, device=dev)
        self.top_labels = torch.full((d_sae, top_k), -1, **i64)
        self._gt: list[tuple[Tensor, Tensor, Tensor]] = []

    @property
    def device(self) -> torch.device:
        return self.top_keys.device

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self, features: Tensor, ids: Tensor, labels: Tensor | None = None, classes: Tensor | None = None
    ) -> Tensor:
        """Add one batch; returns the image scores ``[B, d_sae]``.

        Args:
            features: ``[B, T, d_sae]`` feature activations on the tokens the SAE reads, dense or a sparse COO
                tensor (entries listed once each, in any order).
            ids: ``[B]`` unique image ids (``< 2**32``).
            labels: ``[B]`` class labels (or None).
            classes: ``[B, n_factors]`` factor classes for ground truth (or None).
        """
        if features.ndim != 3 or features.shape[-1] != self.d_sae:
            raise ValueError(
                f"features must be [batch, tokens, d_sae={self.d_sae}], got shape {tuple(features.shape)}."
            )
        b, t, f = features.shape
        dev = self.device
        features = features.to(dev, torch.float32)
        ids = ids.to(dev, torch.int64).reshape(-1)
        if ids.shape[0] != b:
            raise ValueError(f"ids has {ids.shape[0]} entries for a batch of {b} images.")
        if features.layout == torch.sparse_coo:  # the active entries as they are (no dense pass)
            index, vals = features._indices(), features._values()
            keep = torch.nonzero(vals > 0).squeeze(1)
            index, vals = index.index_select(1, keep), vals.index_select(0, keep)
            idx = (index[0] * t + index[1]) * f + index[2]
        else:
            idx, vals = firing_entries(features.reshape(-1))  # the one pass over the dense features
        feat = idx % f  # idx = (image * t + token) * f + feature
        rest = torch.div(idx, f, rounding_mode="floor")
        img = torch.div(rest, t, rounding_mode="floor")
        tok = rest - img * t
        # index_add_ / scatter_reduce_ on the firing entries only (bincount would scan them twice more)
        ones = torch.ones_like(feat)
        self.n_images += b
        self.n_tokens += b * t
        self.fire_tokens.index_add_(0, feat, ones)
        self.act_sum.index_add_(0, feat, vals.double())
        self.act_max.scatter_reduce_(0, feat, vals, reduce="amax")
        lo, hi = self.hist_range
        per_log2 = self.hist_bins / (hi - lo) * math.log10(2.0)  # bins per factor of 2
        bins = vals.log2().mul_(per_log2).sub_(lo * self.hist_bins / (hi - lo)).floor_()
        bins = bins.clamp_(0, self.hist_bins - 1).long()  # values outside the range go to the end bins
        self.hist.view(-1).index_add_(0, feat * self.hist_bins + bins, ones)
        # Image scores, feature-major [F, B]: candidates then come out grouped by feature.
        pair = feat * b + img
        scores_t = torch.zeros(f * b, dtype=torch.float32, device=dev)
        scores_t.scatter_reduce_(0, pair, vals, reduce="amax")
        scores_t = scores_t.view(f, b)
        self.fire_images += (scores_t > 0).sum(1)
        self._update_top(scores_t, ids, labels, (pair, tok, vals))
        scores = scores_t.T
        if self.gt_images > 0 and classes is not None:
            keep = torch.nonzero(ids < self.gt_images).squeeze(1)
            if keep.numel():
                self._gt.append((scores[keep].cpu(), classes.to(dev)[keep].long().cpu(), ids[keep].cpu()))
        return scores

    def _update_top(
        self, scores_t: Tensor, ids: Tensor, labels: Tensor | None, entries: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        """Insert the images that beat a feature's k-th best (or fill its free slots) into its pool.

        ``scores_t [F, B]``: image scores, feature-major; ``entries``: ``(feature * B + image, token, value)`` of
        the batch's firing entries, from which the patch maps of the entering images are written.
        """
        f, b = scores_t.shape
        k, dev = self.top_k, self.device
        kth, _ = decode_keys(self.top_keys.amin(dim=1))  # [F] the k-th score, 0 while the pool has free slots
        floor = kth.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # and only firing images
        feat, img = torch.nonzero(scores_t >= floor).unbind(1)  # candidates, grouped by feature
        n = feat.numel()
        if n == 0:
            return
        keys = encode_keys(scores_t[feat, img][:, None], ids[img]).squeeze(1)
        counts = torch.zeros(f, dtype=torch.int64, device=dev).index_add_(0, feat, torch.ones_like(feat))
        touched = torch.nonzero(counts).squeeze(1)  # [R] features with candidates
        row = torch.cumsum(counts > 0, 0) - 1  # feature -> its row among the touched ones
        pos = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[feat]  # slot within the feature
        width = int(counts.max())
        pad_keys = torch.full((touched.numel(), width), -1, dtype=torch.int64, device=dev)
        pad_keys[row[feat], pos] = keys
        pad_img = torch.zeros(touched.numel(), width, dtype=torch.int64, device=dev)
        pad_img[row[feat], pos] = img
        if width > k:  # at most k candidates per feature can enter its pool
            pad_keys, sel = pad_keys.topk(k, dim=1)
            pad_img = pad_img.gather(1, sel)
        r, slot, cand = self._insert(touched, pad_keys)
        if r.numel() == 0:
            return
        image = pad_img[r, cand]
        if labels is not None:
            self.top_labels[touched[r], slot] = labels.to(dev, torch.int64).reshape(-1)[image]
        if self.n_patches:
            flat_slot = touched[r] * k + slot  # entering (feature, slot) as a row of top_maps.view(-1, P)
            maps = self.top_maps.view(-1, self.n_patches)
            maps[flat_slot] = 0
            lookup = torch.full((f * b,), -1, dtype=torch.int64, device=dev)  # (feature, image) -> map row
            lookup[touched[r] * b + image] = flat_slot
            pair, tok, vals = entries
            target = lookup.index_select(0, pair)
            patch = tok - self.patch_start
            keep = torch.nonzero((target >= 0) & (patch >= 0) & (patch < self.n_patches)).squeeze(1)
            pair, target, patch, vals = (x.index_select(0, keep) for x in (pair, target, patch, vals))
            ratio = vals / scores_t.view(-1).index_select(0, pair)
            maps.view(-1)[target * self.n_patches + patch] = ratio.clamp_(0, 1).mul_(255).round_().to(torch.uint8)

    def _insert(self, rows: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Put the best of the pools of features ``rows [R]`` and the candidate ``keys [R, m]`` (-1: none) into the
        pools, in place: an entering candidate takes the slot of an evicted entry (or a free slot), the other slots
        do not move. Returns the ``(row, slot, candidate)`` triplets of the entering candidates."""
        k = self.top_k
        old = self.top_keys[rows]  # [R, k]
        _, sel = torch.cat([old, keys], dim=1).topk(k, dim=1)
        kept = torch.zeros(rows.numel(), k + keys.shape[1], dtype=torch.bool, device=self.device)
        kept.scatter_(1, sel, True)
        enter = kept[:, k:] & (keys >= 0)
        n_enter = enter.sum(1)  # [R]; equals the number of evicted entries and free slots taken
        evicted = torch.argsort(kept[:, :k].to(torch.uint8), dim=1, stable=True)  # evicted / free slots first
        entering = torch.argsort((~enter).to(torch.uint8), dim=1, stable=True)  # entering candidates first
        width = min(k, keys.shape[1])
        r, j = torch.nonzero(torch.arange(width, device=self.device)[None, :] < n_enter[:, None]).unbind(1)
        slot, cand = evicted[r, j], entering[r, j]
        self.top_keys[rows[r], slot] = keys[r, cand]
        self.top_labels[rows[r], slot] = -1
        return r, slot, cand

    def _sort(self) -> None:
        """Order every pool best first (slots are unordered while streaming; this makes states canonical)."""
        self.top_keys, order = self.top_keys.sort(dim=1, descending=True, stable=True)
        self.top_labels = self.top_labels.gather(1, order)
        if self.n_patches:
            self.top_maps = self.top_maps.gather(1, order[..., None].expand(-1, -1, self.n_patches))
        empty = self.top_keys < 0
        self.top_labels.masked_fill_(empty, -1)
        self.top_maps.masked_fill_(empty[..., None], 0)

    # ------------------------------------------------------------------ merge / state
    def merge(self, other: FeatureAccumulator | dict[str, Any]) -> None:
        """Add another accumulator's state (e.g. another DDP rank's) into this one."""
        state = other.state_dict() if isinstance(other, FeatureAccumulator) else other
        dev = self.device
        for key in ("n_images", "n_tokens", "fire_tokens", "fire_images", "act_sum", "hist"):
            getattr(self, key).add_(state[key].to(dev))
        torch.maximum(self.act_max, state["act_max"].to(dev), out=self.act_max)
        rows = torch.arange(self.d_sae, device=dev)
        r, slot, cand = self._insert(rows, state["top_keys"].to(dev))
        self.top_labels[r, slot] = state["top_labels"].to(dev)[r, cand]
        if self.n_patches:
            self.top_maps[r, slot] = state["top_maps"].to(dev)[r, cand]
        if state["gt_ids"].numel():
            self._gt.append((state["gt_scores"].cpu(), state["gt_classes"].cpu(), state["gt_ids"].cpu()))

    def ground_truth_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """(scores ``[N, F]``, classes ``[N, n_factors]``, ids ``[N]``) of the kept images, sorted by id (CPU)."""
        if not self._gt:
            return (torch.zeros(0, self.d_sae), torch.zeros(0, self.n_factors, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64))  # fmt: skip
        scores, classes, ids = (torch.cat(parts) for parts in zip(*self._gt, strict=True))
        order = torch.argsort(ids, stable=True)
        self._gt = [(scores[order], classes[order], ids[order])]
        return self._gt[0]

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loadable with ``torch.load(weights_only=True)``), on the CPU; pools sorted best first."""
        self._sort()
        state = {key: getattr(self, key).cpu() for key in _STAT_KEYS + _TOP_KEYS}
        state.update(zip(_GT_KEYS, self.ground_truth_rows(), strict=True))
        state["config"] = self.config()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the configuration must match."""
        if state.get("config") != self.config():
            raise ValueError(
                f"The saved atlas state was made with {state.get('config')}, this run uses {self.config()}; "
                "delete the state folder or keep the original settings."
            )
        for key in _STAT_KEYS + _TOP_KEYS:
            setattr(self, key, state[key].to(self.device).clone())
        self._gt = [(state["gt_scores"], state["gt_classes"], state["gt_ids"])] if state["gt_ids"].numel() else []

    def config(self) -> dict[str, Any]:
        """The settings a saved state must share with the accumulator it is loaded into."""
        return {
            "d_sae": self.d_sae, "top_k": self.top_k, "n_patches": self.n_patches, "patch_start": self.patch_start,
            "hist_bins": self.hist_bins, "hist_range": list(self.hist_range), "gt_images": self.gt_images,
            "n_factors": self.n_factors,
        }  # fmt: skip

    # ------------------------------------------------------------------ results
    def top(self) -> tuple[Tensor, Tensor]:
        """(scores ``[F, k]`` float32, image ids ``[F, k]`` int64, -1 for empty slots), best first.

        Sorts the pools in place, so ``top_maps`` and ``top_labels`` are in the same order afterwards.
        """
        self._sort()
        return decode_keys(self.top_keys)

    def summary(self) -> dict[str, Tensor]:
        """Per-feature ``frac_nonzero`` (of tokens), ``frac_images``, ``mean_firing``, ``mean_all``, ``max`` (CPU)."""
        n_tok = max(int(self.n_tokens), 1)
        n_img = max(int(self.n_images), 1)
        fire = self.fire_tokens.double()
        mean_firing = torch.where(fire > 0, self.act_sum / fire.clamp_min(1), torch.full_like(fire, math.nan))
        return {
            "frac_nonzero": (fire / n_tok).cpu(),
            "frac_images": (self.fire_images.double() / n_img).cpu(),
            "mean_firing": mean_firing.cpu(),
            "mean_all": (self.act_sum / n_tok).cpu(),
            "max": self.act_max.double().cpu(),
        }


# ---------------------------------------------------------------------------------------------- DDP
def _all_gather(tensor: Tensor, world: int) -> list[Tensor]:
    """All-gather a tensor whose first dimension may differ between ranks (padded, then trimmed)."""
    import torch.distributed as dist

    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = max(1, *(int(s) for s in sizes))  # gloo dislikes empty tensors
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return [part[: int(size)] for part, size in zip(parts, sizes, strict=True)]


def all_gather_merge(acc: FeatureAccumulator) -> FeatureAccumulator:
    """Under ``torch.distributed``, every rank's state merged in rank order (identical on every rank).

    Returns ``acc`` itself when no process group is running or it has one process. Tensors travel on ``acc``'s
    device (CUDA for NCCL, CPU for gloo).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return acc
    world = dist.get_world_size()
    state = acc.state_dict()
    gathered: list[dict[str, Any]] = [{} for _ in range(world)]
    for key, value in state.items():
        if key == "config":
            continue
        value = value.to(acc.device)
        parts = _all_gather(value.reshape(1, *value.shape) if key not in _GT_KEYS else value, world)
        for rank, part in enumerate(parts):
            gathered[rank][key] = part if key in _GT_KEYS else part[0]
    merged = FeatureAccumulator(**{**acc.config(), "hist_range": tuple(acc.hist_range), "device": acc.device})
    for part in gathered:
        merged.merge(part)
    return merged
