"""`ViTClassifierModule`: train a HookedViT image classifier ("ViT mice": small custom ViTs for interpretability).

The model comes in as a :class:`HookedViTConfig` (``--model.model.d_model`` etc. on the command line), a
:class:`HookedViT` object, or a registry name / saved folder resolved by ``load_hooked_model``. Attention-only
models are ``HookedViTConfig(attn_only=True)``; any depth, width or patch size works.

Optimisation: AdamW (weight decay on matrices only, not on biases, norms, tokens or position embeddings),
linear warm-up then cosine decay to ``min_lr_ratio * lr`` over the run, stepped every optimizer step.
Metrics: cross-entropy (optionally label-smoothed) and torchmetrics top-1 / top-5 accuracy per split
(``train/acc``, ``val/acc``, ``val/acc_top5``, ...). At the end of fit the trained model is written with
``HookedViT.save_pretrained`` (``config.json`` + ``model.safetensors``) to ``export_dir`` (default
``<log_dir>/model``) by rank 0; every rank resolves that folder in ``setup``, since finding the log folder is a
collective call under DDP.

Hyperparameters are stored as plain types (the model as ``cfg.to_dict()``), so checkpoints load with
``torch.load(weights_only=True)`` and ``ViTClassifierModule.load_from_checkpoint(path)`` rebuilds the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.hooked_vit import HookedViT

STAGES = ("train", "val", "test")


class ViTClassifierModule(pl.LightningModule):
    """Train a :class:`HookedViT` classifier from scratch (or fine-tune a loaded one).

    Args:
        model: the architecture as a :class:`HookedViTConfig` (its dict, as stored in checkpoints, also works),
            a :class:`HookedViT` object, or a registry name / ``save_pretrained`` folder for ``load_hooked_model``.
            Its head must be a classifier with ``n_classes`` outputs.
        pretrained: with a registry name, load its published weights (False: the architecture with random
            weights, offline). Folders always load their weights.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay, applied to weight matrices only.
        betas: AdamW betas.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many optimizer steps.
        max_steps: length of the schedule (warm-up included); default: the trainer's total optimizer steps
            (``max_steps``, or the steps of ``max_epochs`` epochs).
        min_lr_ratio: final learning rate of the cosine decay as a fraction of ``lr``.
        label_smoothing: label smoothing of the training cross-entropy (validation and test use none).
        export_dir: folder the trained model is written to at the end of fit (default: ``<log_dir>/model``).
        check_data: in ``setup``, fail early when the data module's ``num_classes``, ``channels`` or
            ``image_size`` disagree with the model config.
    """

    def __init__(
        self,
        model: HookedViTConfig | HookedViT | str,
        pretrained: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        export_dir: str | None = None,
        check_data: bool = True,
    ) -> None:
        super().__init__()
        self.check_arguments(lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio, label_smoothing)
        self.save_hyperparameters(ignore=["model"])
        self.model = self.build_model(model, pretrained)
        cfg = self.model.cfg
        if cfg.head != "classifier":
            raise ValueError(
                f"ViTClassifierModule needs a classifier head, but the model has head={cfg.head!r}; "
                "set head='classifier' and n_classes in the model config."
            )
        # Plain types only, so checkpoints load with torch.load(weights_only=True) and rebuild the model offline.
        self.hparams["model"] = cfg.to_dict()
        self.lr, self.weight_decay, self.betas = lr, weight_decay, (float(betas[0]), float(betas[1]))
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, min_lr_ratio
        self.label_smoothing, self.export_dir, self.check_data = label_smoothing, export_dir, check_data
        self._export_path: Path | None = None  # resolved in setup("fit")
        self.train_metrics = self.build_metrics(cfg.n_classes)
        self.val_metrics = self.build_metrics(cfg.n_classes)
        self.test_metrics = self.build_metrics(cfg.n_classes)

    @staticmethod
    def check_arguments(
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_steps: int,
        max_steps: int | None,
        min_lr_ratio: float,
        label_smoothing: float,
    ) -> None:
        """Raise ``ValueError`` naming the bad value and the valid range."""
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive number, got {lr!r}; small ViTs train well with 1e-3.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}; the usual value is (0.9, 0.999).")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None (the trainer's steps), got {max_steps!r}.")
        if max_steps is not None and warmup_steps > max_steps:
            raise ValueError(f"warmup_steps={warmup_steps} is longer than the schedule (max_steps={max_steps}).")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")

    # ------------------------------------------------------------------ construction (overridable)
    def build_model(self, model: HookedViTConfig | HookedViT | str | dict[str, Any], pretrained: bool) -> HookedViT:
        """The HookedViT to train, from a config (or its dict), a registry name or folder, or as given."""
        if isinstance(model, HookedViT):
            return model.train()
        if isinstance(model, dict):
            model = HookedViTConfig.from_dict(model)
        if isinstance(model, HookedViTConfig):
            return HookedViT(model)
        if isinstance(model, str | Path):
            from prisma_lightning.backbones.registry import load_hooked_model

            return load_hooked_model(str(model), pretrained=pretrained).train()
        raise TypeError(
            f"model must be a HookedViTConfig, a HookedViT or a registry name / folder, got {type(model).__name__}."
        )

    @staticmethod
    def build_metrics(n_classes: int) -> nn.ModuleDict:
        """Top-1 accuracy, and top-5 when there are at least 5 classes."""
        metrics = {"acc": MulticlassAccuracy(num_classes=n_classes, top_k=1, average="micro")}
        if n_classes >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes=n_classes, top_k=5, average="micro")
        return nn.ModuleDict(metrics)

    def metrics(self, stage: str) -> nn.ModuleDict:
        """The accuracy metrics of ``stage`` (``train``, ``val`` or ``test``), each kept apart so they reset apart."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}.")
        return getattr(self, f"{stage}_metrics")

    def setup(self, stage: str) -> None:
        if self._trainer is None:
            return
        if self.check_data:
            self.check_datamodule(getattr(self.trainer, "datamodule", None))
        if stage == "fit":
            # On every rank: under DDP, trainer.log_dir is a collective (rank 0's folder is broadcast).
            self._export_path = Path(self.export_dir) if self.export_dir else self.default_export_dir()

    def check_datamodule(self, datamodule: Any) -> None:
        """Fail before training when the data module's classes, channels or image size do not fit the model."""
        if datamodule is None:
            return
        cfg, name = self.model.cfg, type(datamodule).__name__
        n_classes = getattr(datamodule, "num_classes", None)
        if isinstance(n_classes, int) and n_classes != cfg.n_classes:
            raise ValueError(
                f"{name} has {n_classes} classes but the model's head has n_classes={cfg.n_classes}; "
                f"set --model.init_args.model.n_classes={n_classes} (model.init_args.model.n_classes in YAML)."
            )
        channels = getattr(datamodule, "channels", None)
        if isinstance(channels, int) and channels != cfg.in_channels:
            raise ValueError(
                f"{name} yields {channels}-channel images but the model has in_channels={cfg.in_channels}; "
                f"set the model's in_channels={channels} or the data module's channels={cfg.in_channels}."
            )
        size = getattr(datamodule, "image_size", None)
        if isinstance(size, int) and (size, size) != tuple(cfg.image_size) and not cfg.dynamic_img_size:
            raise ValueError(
                f"{name} yields {size}x{size} images but the model expects image_size={list(cfg.image_size)}; "
                "set the same size on both (or dynamic_img_size=true on the model)."
            )

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices (ndim >= 2, except tokens and position embeddings), none else."""
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            is_embedding = name in ("cls_token", "register_tokens", "pos_embed") or name.endswith(".probe")
            (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def total_steps(self) -> int | None:
        """Length of the schedule: ``max_steps``, else the trainer's total optimizer steps (None if unknown)."""
        if self.max_steps is not None:
            return self.max_steps
        if self._trainer is None:
            return None
        total = self.trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None

    def lr_lambda(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then cosine to ``min_lr_ratio``."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps()
        if total is None:
            return 1.0
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, n_classes]``."""
        return self.model(images)

    @staticmethod
    def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(images, labels)`` or images alone -> (images, labels or None)."""
        if isinstance(batch, list | tuple):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def compute_loss(self, logits: Tensor, labels: Tensor, stage: str) -> Tensor:
        """Cross-entropy; label smoothing during training only. Override to add a penalty."""
        smoothing = self.label_smoothing if stage == "train" else 0.0
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    def shared_step(self, batch: Any, stage: str) -> Tensor:
        images, labels = self.split_batch(batch)
        if labels is None:
            raise ValueError(f"The {stage} batches have no labels; the data module must yield (images, labels).")
        logits = self(images)
        loss = self.compute_loss(logits, labels, stage)
        train = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=train, on_epoch=not train, prog_bar=True, sync_dist=not train)
        for name, metric in self.metrics(stage).items():
            metric(logits.detach(), labels)
            self.log(f"{stage}/{name}", metric, on_step=train, on_epoch=not train, prog_bar=name == "acc")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.shared_step(batch, "train")
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``[B, n_classes]``."""
        images, _ = self.split_batch(batch)
        return self(images)

    # ------------------------------------------------------------------ export
    def export(self, folder: str | Path) -> Path:
        """Write the model with ``HookedViT.save_pretrained`` (``config.json`` + ``model.safetensors``)."""
        return self.model.save_pretrained(folder)

    def default_export_dir(self) -> Path:
        """``<log_dir>/model`` (``<default_root_dir>/model`` without a logger). A collective call under DDP."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "model"

    def on_fit_end(self) -> None:
        """Export the trained model on rank 0, to the folder every rank resolved in ``setup``."""
        folder = getattr(self, "_export_path", None)
        if folder is None:  # setup("fit") did not run (a custom loop): resolve now, on every rank
            folder = Path(self.export_dir) if self.export_dir else self.default_export_dir()
        if self.trainer.is_global_zero:
            self.export(folder)
