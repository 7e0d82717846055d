"""`AtlasModule`: ``prisma predict`` runs a frozen backbone and an SAE and yields each batch's features.

Pair it with the :class:`~prisma_lightning.callbacks.AtlasWriter` callback, which accumulates what
``predict_step`` returns into the feature atlas (statistics, top images, static site, ``features.jsonl``)::

    prisma predict --config configs/atlas/quickstart.yaml

The module also answers the questions the atlas asks about the model: the token layout (which tokens the SAE
reads, where the patches are), the decoder directions (nearest features), and for CLIP backbones with a
zero-shot classifier file the class names closest to each feature's decoder direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.activations import Tokens, select_tokens


class AtlasBatch(NamedTuple):
    """What :meth:`AtlasModule.predict_step` returns for one batch."""

    features: Tensor
    """``[B, T, d_sae]`` the SAE's features on the tokens it reads (``T``: all tokens, the patches, or 1 (CLS)):
    dense, or a sparse COO tensor of the active entries (``.to_dense()`` gives the dense one)."""
    labels: Tensor | None
    """``[B]`` int64 class labels of the images, when the data provides them."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the patches are among the ``tokens_per_image`` tokens of :attr:`AtlasBatch.features`."""

    tokens_per_image: int
    """Tokens per image the SAE reads."""
    patch_start: int
    """Index of the first patch token among them."""
    n_patches: int
    """Patch tokens among them (0 for a class-token SAE)."""
    grid: tuple[int, int, int]
    """``(time steps, rows, columns)`` of the patch grid (1 time step for images), row-major, time-major."""


class AtlasModule(pl.LightningModule):
    """Frozen backbone + SAE -> :class:`AtlasBatch` per predict batch.

    Args:
        sae: folder of a trained SAE (or a Hugging Face repo id), or an SAE object built in code.
        backbone: registry name or folder of the model the SAE was trained on (or a HookedViT object); None uses
            the SAE's ``cfg.model_name``.
        pretrained_backbone: load the backbone's pretrained weights (False: random weights, offline).
        hook_name: hook to read; defaults to the SAE's ``cfg.hook_name``.
        tokens: tokens the SAE reads (``all``, ``cls``, ``patches``); defaults to the SAE's ``cfg.tokens``.
        zero_shot: a :class:`~prisma_lightning.backbones.ZeroShotClassifier` file (CLIP backbones with a
            projection head): the atlas then lists the class names closest to each feature's decoder direction.
    """

    def __init__(
        self,
        sae: str | nn.Module,
        backbone: str | nn.Module | None = None,
        pretrained_backbone: bool = True,
        hook_name: str | None = None,
        tokens: Tokens | None = None,
        zero_shot: str | None = None,
    ) -> None:
        super().__init__()
        ignore = [name for name, value in (("sae", sae), ("backbone", backbone)) if isinstance(value, nn.Module)]
        self.save_hyperparameters(ignore=ignore)
        self.sae_source = str(sae) if isinstance(sae, str | Path) else None
        if isinstance(sae, str | Path):
            from prisma_lightning.sae import SparseAutoencoder

            path = Path(sae).expanduser()
            sae = SparseAutoencoder.load(path) if path.exists() else SparseAutoencoder.from_pretrained(str(sae))
        cfg = sae.cfg
        self.hook_name = hook_name or getattr(cfg, "hook_name", "")
        self.tokens: Tokens = tokens or getattr(cfg, "tokens", "all")
        if not self.hook_name:
            raise ValueError("The SAE's cfg.hook_name is empty; pass hook_name= (e.g. 'blocks.1.hook_resid_post').")
        if backbone is None:
            backbone = getattr(cfg, "model_name", "") or None
            if backbone is None:
                raise ValueError("The SAE's cfg.model_name is empty; pass backbone= (a registry name or folder).")
        if isinstance(backbone, str | Path):
            from prisma_lightning.backbones import load_hooked_model

            backbone = load_hooked_model(str(backbone), pretrained=pretrained_backbone)
        self.backbone = backbone.eval().requires_grad_(False)
        self.sae = sae.eval().requires_grad_(False)
        width = self.backbone.hook_width(self.hook_name)  # KeyError naming the closest hooks for a typo
        if width != self.sae.d_in:
            raise ValueError(
                f"The SAE reads d_in={self.sae.d_in} but {self.hook_name} of {self.backbone.cfg.model_name!r} is "
                f"{width} wide; pass the backbone the SAE was trained on."
            )
        self.zero_shot_path = zero_shot
        self.skip_batches = 0
        """Batches already in a resumed atlas: ``predict_step`` returns None for them (set by AtlasWriter)."""
        self.display_mean: Tensor | None = None
        self.display_std: Tensor | None = None

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        """Give a data module that accepts them the backbone's eval preprocessing (and remember its mean/std)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "accepts_backbone_transforms", False):
            transform = self.backbone.preprocess(train=False)
            datamodule.use_transforms(transform, transform)
            pre = getattr(self.backbone, "preprocess_config", None)  # what the transform normalises with
            pre = pre() if callable(pre) else pre
            if pre is not None and not getattr(pre, "rescale_offset", False):
                self.display_mean = torch.tensor(pre.mean, dtype=torch.float32)
                self.display_std = torch.tensor(pre.std, dtype=torch.float32)

    def display_images(self, images: Tensor) -> Tensor:
        """Model inputs ``[N, C, H, W]`` (video: ``[N, T, C, H, W]``, the middle frame is shown) -> ``[0, 1]``.

        Undoes the backbone's normalisation when this module applied it; otherwise images already in [0, 1]
        are kept and others are min-max scaled per image.
        """
        x = images.detach().float().cpu()
        if x.ndim == 5:
            x = x[:, x.shape[1] // 2]
        if self.display_mean is not None and x.shape[1] == self.display_mean.numel():
            x = x * self.display_std[:, None, None] + self.display_mean[:, None, None]
        elif x.numel() and (x.min() < 0 or x.max() > 1):
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-12)
        return x.clamp(0, 1)

    # ------------------------------------------------------------------ features
    @property
    def layout(self) -> TokenLayout:
        """Token layout of :attr:`AtlasBatch.features`."""
        cfg = self.backbone.cfg
        frames = max(1, cfg.num_frames // max(1, cfg.tubelet_size))
        grid = (frames, *cfg.grid_size)
        n_patches = cfg.n_patches
        if self.tokens == "cls":
            return TokenLayout(1, 0, 0, grid)
        if self.tokens == "patches":
            return TokenLayout(n_patches, 0, n_patches, grid)
        return TokenLayout(cfg.n_tokens, cfg.n_prefix_tokens, n_patches, grid)

    def activations(self, images: Tensor) -> Tensor:
        """Images -> the hook's activations ``[B, T, d_in]`` on the tokens the SAE reads."""
        cfg = self.backbone.cfg
        stop = self.backbone.stop_layer_for_all([self.hook_name])
        _, cache = self.backbone.run_with_cache(images, names_filter=[self.hook_name], stop_at_layer=stop)
        acts = cache[self.hook_name]
        if acts.ndim == 4:  # per-head hooks [B, T, h, d_head]
            acts = acts.flatten(2)
        rows = select_tokens(acts, self.tokens, cfg.n_prefix_tokens, has_cls=cfg.class_token)
        return rows.reshape(images.shape[0], -1, rows.shape[-1])

    def encode(self, acts: Tensor) -> Tensor:
        """Activations ``[B, T, d_in]`` -> features ``[B, T, d_sae]``: a sparse COO tensor of the active entries for
        SAEs that select their features (``sparse_codes``: no dense ``[B, T, d_sae]`` tensor is made), else dense."""
        if getattr(self.sae, "sparse_codes", False):
            return self.sae.encode_sparse(acts)
        return self.sae.encode(acts)

    @staticmethod
    def batch_labels(batch: Any) -> Tensor | None:
        """Integer class labels ``[B]`` of a ``(images, target)`` batch, or None."""
        if isinstance(batch, list | tuple) and len(batch) > 1 and isinstance(batch[1], Tensor):
            target = batch[1]
            if target.ndim == 1 and not target.is_floating_point():
                return target.long()
        return None

    def predict_step(self, batch: Any, batch_idx: int) -> AtlasBatch | None:
        if batch_idx < self.skip_batches:
            return None  # already in the saved atlas state
        images = batch[0] if isinstance(batch, list | tuple) else batch
        with torch.no_grad():
            features = self.encode(self.activations(images))
        return AtlasBatch(features, self.batch_labels(batch))

    # ------------------------------------------------------------------ directions
    def decoder_directions(self) -> Tensor:
        """``[d_sae, d]`` decoder rows (float32, detached)."""
        return torch.as_tensor(self.sae.W_dec).detach().float()

    def describe(self) -> dict[str, Any]:
        """What the atlas records about the model and the SAE."""
        cfg = self.backbone.cfg
        return {
            "modelId": cfg.model_name or str(self.hparams.get("backbone") or ""),
            "layer": self.hook_name,
            "tokens": self.tokens,
            "d_sae": int(self.sae.d_sae),
            "d_in": int(self.sae.d_in),
            "sae": self.sae_source or "",
            "n_prefix_tokens": int(cfg.n_prefix_tokens),
            "patch_size": list(cfg.patch_size),
            "image_size": list(cfg.image_size),
        }

    def text_similarity(self, top: int = 5, chunk: int = 4096) -> dict[str, Any] | None:
        """Class names closest to (and farthest from) each feature's decoder direction in the text space.

        The direction goes through the linear part of the backbone's final norms (centring and the norm's
        weight: ``ln_final`` and ``fc_norm`` when present) and the projection head, and is compared by cosine
        with the zero-shot classifier's class embeddings. None without ``zero_shot`` or a projection head.

        Returns:
            ``{"names": [...], "pos": (index [F, top], cosine [F, top]), "neg": (index, cosine)}``.
        """
        if self.zero_shot_path is None:
            return None
        from prisma_lightning.backbones import HookedViT

        cfg = self.backbone.cfg
        if not isinstance(self.backbone, HookedViT):  # the mapping reads HookedViT's final norms and head
            raise ValueError(
                f"zero_shot needs a HookedViT backbone (its final norms and projection head map decoder directions "
                f"into text space); got {type(self.backbone).__name__}. Drop zero_shot for this backbone."
            )
        if cfg.head != "projection" or self.backbone.head is None:
            raise ValueError(
                f"zero_shot={self.zero_shot_path!r} needs a CLIP backbone with a projection head; "
                f"{cfg.model_name!r} has head={cfg.head!r}. Drop zero_shot for this backbone."
            )
        from prisma_lightning.backbones import ZeroShotClassifier

        clf = ZeroShotClassifier.load(self.zero_shot_path)
        weights = clf.weights.detach().float().cpu()  # [d_embed, C]
        head = self.backbone.head.weight.detach().float().cpu()  # [d_embed, d]
        if head.shape[0] != weights.shape[0]:
            raise ValueError(
                f"The zero-shot file {self.zero_shot_path} has {weights.shape[0]}-dim class embeddings but the "
                f"backbone projects to {head.shape[0]}; build the classifier from the same CLIP model."
            )
        top = min(top, weights.shape[1])
        direction = self.decoder_directions().cpu()
        norms = [n for n in (self.backbone.ln_final, self.backbone.fc_norm) if n is not None]
        pos_i, pos_v, neg_i, neg_v = [], [], [], []
        for start in range(0, direction.shape[0], chunk):
            d = direction[start : start + chunk]
            for norm in norms:
                d = d - d.mean(dim=1, keepdim=True)
                if getattr(norm, "weight", None) is not None:
                    d = d * norm.weight.detach().float().cpu()
            emb = torch.nn.functional.normalize(d @ head.T, dim=1)  # [f, d_embed]
            cos = emb @ weights  # [f, C]
            v, i = cos.topk(top, dim=1)
            pos_i.append(i), pos_v.append(v)
            v, i = cos.topk(top, dim=1, largest=False)
            neg_i.append(i), neg_v.append(v)
        return {
            "names": list(clf.class_names),
            "pos": (torch.cat(pos_i), torch.cat(pos_v)),
            "neg": (torch.cat(neg_i), torch.cat(neg_v)),
        }
