"""`SAEModule`: train a sparse autoencoder on a frozen backbone's activations (online) or on cached shards.

Online mode: each batch of images runs through the frozen backbone up to the hook (``stop_at_layer``, no grad,
eval mode); the selected tokens go into a :class:`MixingBuffer`, and whenever the buffer is full SAE steps are
taken on random rows until it is half empty. Cached mode: each batch is already ``[batch, d_in]`` rows.

Manual optimisation keeps the SAE-specific order of operations (decoder-gradient projection between backward
and step, renormalisation after it) and lets one image batch feed several SAE steps. Subclass and override
``select_tokens``, ``compute_loss`` or ``configure_optimizers`` to change one piece.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.activations import MixingBuffer, Tokens, select_tokens
from prisma_lightning.sae import SAEConfig, SAEOutput, SparseAutoencoder, make_optimizer
from prisma_lightning.sae.config import BATCH_TOPK_FAMILY

LRDecay = Literal["none", "cosine", "linear"]


def apply_backbone_transforms(datamodule: Any, backbone: nn.Module) -> None:
    """Give a data module that accepts them the backbone's eval preprocessing (resize, crop, mean/std)."""
    if datamodule is not None and getattr(datamodule, "accepts_backbone_transforms", False):
        transform = backbone.preprocess(train=False)
        datamodule.use_transforms(transform, transform)


class SAEModule(pl.LightningModule):
    """Train a :class:`SparseAutoencoder` (see the module docstring for online vs cached mode).

    Args:
        sae: the SAE config; or the path / Hugging Face repo of a trained SAE (evaluation, fine-tuning); or an
            SAE object when built in code.
        backbone: registry name of the frozen model (or a HookedViT object); None for cached activations.
        pretrained_backbone: load the backbone's pretrained weights (False: random weights, offline).
        hook_name: hook to train on; defaults to ``sae.hook_name``.
        tokens: which tokens become rows (``all``, ``cls``, ``patches``); defaults to ``sae.tokens``.
        lr: peak Adam learning rate.
        betas: Adam betas.
        lr_warmup_steps: linear warm-up from 0 over this many SAE steps.
        lr_decay: ``none``, ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr`` after warm-up.
        lr_decay_steps: length of the decay; defaults to the trainer's ``max_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        l1_warmup_steps: sparsity-coefficient warm-up (overrides ``sae.l1_warmup_steps`` when set).
        buffer_tokens: mixing-buffer capacity in tokens (online mode); 0 disables mixing (tokens in order).
        batch_tokens: SAE batch size in tokens (online mode; cached mode uses the data module's batches).
        init_tokens: tokens used to fit the activation normalisation and initialise ``b_dec``.
        max_grad_norm: clip the gradient norm (None: no clipping).
        checkpoint_buffer: store the buffer's contents in checkpoints so a resumed run continues exactly.
        export_dir: folder the trained SAE is exported to at the end of fit (default: ``<log_dir>/sae``); on every
            checkpoint the SAE is also exported beside the checkpoint file (``<checkpoint dir>/sae``).
        backbone_transforms: give image / video data modules the backbone's own ``preprocess()`` (online mode).
    """

    def __init__(
        self,
        sae: SAEConfig | str | SparseAutoencoder,
        backbone: str | nn.Module | None = None,
        pretrained_backbone: bool = True,
        hook_name: str | None = None,
        tokens: Tokens | None = None,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        lr_decay: LRDecay = "none",
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        l1_warmup_steps: int | None = None,
        buffer_tokens: int = 65536,
        batch_tokens: int = 4096,
        init_tokens: int = 16384,
        max_grad_norm: float | None = None,
        checkpoint_buffer: bool = True,
        export_dir: str | None = None,
        backbone_transforms: bool = True,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}; a typical SAE learning rate is 4e-4.")
        if batch_tokens <= 0 or init_tokens <= 0 or buffer_tokens < 0:
            raise ValueError(
                f"batch_tokens ({batch_tokens}) and init_tokens ({init_tokens}) must be positive and "
                f"buffer_tokens ({buffer_tokens}) >= 0."
            )
        if buffer_tokens and buffer_tokens < 2 * batch_tokens:
            raise ValueError(
                f"buffer_tokens={buffer_tokens} must hold at least two batches (2 * batch_tokens = "
                f"{2 * batch_tokens}) to mix tokens; raise it or set buffer_tokens=0 to disable mixing."
            )
        if lr_decay not in ("none", "cosine", "linear"):
            raise ValueError(f"lr_decay must be 'none', 'cosine' or 'linear', got {lr_decay!r}.")
        self.save_hyperparameters(ignore=["sae", "backbone"])
        self.sae_source: str | None = None
        self.sae = self.build_sae(sae)
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.hparams["sae"] = self.sae.cfg.to_dict()
        self.hparams["backbone"] = backbone if isinstance(backbone, str) else None
        if l1_warmup_steps is not None:
            self.sae.cfg.l1_warmup_steps = l1_warmup_steps
        self.hook_name = hook_name or self.sae.cfg.hook_name
        self.tokens: Tokens = tokens or self.sae.cfg.tokens
        self.lr, self.betas = lr, tuple(betas)
        self.lr_warmup_steps, self.lr_decay = lr_warmup_steps, lr_decay
        self.lr_decay_steps, self.min_lr_ratio = lr_decay_steps, min_lr_ratio
        self.buffer_tokens, self.batch_tokens, self.init_tokens = buffer_tokens, batch_tokens, init_tokens
        self.max_grad_norm, self.checkpoint_buffer, self.export_dir = max_grad_norm, checkpoint_buffer, export_dir
        self.pretrained_backbone, self.backbone_transforms = pretrained_backbone, backbone_transforms
        self._backbone_spec = backbone
        self._backbone: nn.Module | None = None  # kept out of the module tree: frozen, never checkpointed
        self.buffer: MixingBuffer | None = None
        self._pending_init: list[Tensor] = []
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        # A loaded (trained) SAE keeps its normalisation and b_dec; a fresh one is initialised from data.
        self.register_buffer("initialized", torch.tensor(self.sae_source is not None))
        self.automatic_optimization = False

    # ------------------------------------------------------------------ construction (overridable)
    def build_sae(self, sae: SAEConfig | SparseAutoencoder | dict[str, Any] | str) -> SparseAutoencoder:
        """The SAE to train: from a config (or its dict, as stored in checkpoints), as given, or loaded from a
        trained folder / Hugging Face repo id (a string; used by ``prisma validate`` to evaluate an SAE)."""
        if isinstance(sae, str):
            self.sae_source = sae
            if Path(sae).exists():
                return SparseAutoencoder.load(sae)
            return SparseAutoencoder.from_pretrained(sae)
        if isinstance(sae, dict):
            sae = SAEConfig.from_dict(sae)
        return sae if isinstance(sae, SparseAutoencoder) else SparseAutoencoder(sae)

    def sae_folder(self) -> Path:
        """Where this SAE's files (and ``eval.json``) live: the folder it was loaded from, or its export folder."""
        source = getattr(self, "sae_source", None)
        if source is not None and Path(source).is_dir():
            return Path(source)
        if self.export_dir:
            return Path(self.export_dir)
        if self._trainer is not None:
            return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "sae"
        return Path("sae")

    @property
    def backbone(self) -> nn.Module | None:
        """The frozen backbone (online mode), built on first use and moved to this module's device."""
        if self._backbone is None and self._backbone_spec is not None:
            spec = self._backbone_spec
            if isinstance(spec, str):
                from prisma_lightning.backbones import load_hooked_model

                spec = load_hooked_model(spec, pretrained=self.pretrained_backbone)
            spec.eval().requires_grad_(False)
            object.__setattr__(self, "_backbone", spec)  # not a submodule: no optimizer, no checkpoint
        if self._backbone is not None and self._backbone_device() != self.device:
            self._backbone.to(self.device)
        return self._backbone

    def _backbone_device(self) -> torch.device:
        return next(self._backbone.parameters()).device

    @property
    def online(self) -> bool:
        return self._backbone_spec is not None

    def setup(self, stage: str) -> None:
        if self.online:
            self.check_hook()
            if self.backbone_transforms:
                apply_backbone_transforms(self.trainer.datamodule if self._trainer is not None else None, self.backbone)

    def on_fit_start(self) -> None:
        # BatchTopK picks k x (global batch) activations: under DDP the selection spans every rank's rows.
        if self._world() > 1 and torch.distributed.is_initialized() and self.sae.cfg.architecture in BATCH_TOPK_FAMILY:
            self.sae.batch_topk_group = torch.distributed.group.WORLD

    def check_hook(self) -> None:
        """Fail early, naming both widths, when the hook does not exist or ``d_in`` does not match it."""
        model = self.backbone
        for name in self.hook_names():
            width = model.hook_width(name)  # KeyError listing close names for unknown hooks
            expected = self.sae.d_in if name == self.hook_name else self.sae.d_out
            if width != expected:
                raise ValueError(
                    f"The SAE expects width {expected} (d_in/d_out) but hook {name!r} of the backbone "
                    f"{model.cfg.model_name!r} has width {width}; set d_in={width} or pick another hook."
                )

    def hook_names(self) -> list[str]:
        return [self.hook_name]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.sae, lr=self.lr, betas=self.betas)  # fused Adam where available
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_lambda(self, step: int) -> float:
        """Learning-rate multiplier at SAE step ``step``: linear warm-up, then constant / cosine / linear decay."""
        if self.lr_warmup_steps and step < self.lr_warmup_steps:
            return (step + 1) / self.lr_warmup_steps
        if self.lr_decay == "none":
            return 1.0
        total = self.lr_decay_steps or (self.trainer.max_steps if self._trainer is not None else -1)
        if total is None or total <= 0:
            return 1.0
        progress = min(1.0, max(0.0, (step - self.lr_warmup_steps) / max(1, total - self.lr_warmup_steps)))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    # ------------------------------------------------------------------ data -> rows
    def select_tokens(self, acts: Tensor) -> Tensor:
        """``[B, T, d]`` hook activations -> ``[N, d]`` training rows (see ``tokens``)."""
        model = self.backbone
        return select_tokens(acts, self.tokens, model.cfg.n_prefix_tokens, has_cls=model.cfg.class_token)

    def activations(self, batch: Any) -> Tensor:
        """Rows ``[N, width]`` from a batch: backbone activations (online) or the batch itself (cached)."""
        if not self.online:
            return batch
        images = batch[0] if isinstance(batch, list | tuple) else batch
        model = self.backbone
        names = self.hook_names()
        with torch.no_grad():
            _, cache = model.run_with_cache(
                images.to(self.device), names_filter=names, stop_at_layer=model.stop_layer_for_all(names)
            )
        return torch.cat([self.select_tokens(cache[n]) for n in names], dim=-1)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows -> (SAE input, target or None). Transcoders override this."""
        return rows, None

    def _check_finite(self, rows: Tensor) -> None:
        if not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows)).sum().item()
            raise ValueError(
                f"{bad} non-finite activations (NaN/inf) at hook {self.hook_name!r}, step {self.global_step}; "
                "check the backbone's inputs and dtype (float16 overflow?)."
            )

    # ------------------------------------------------------------------ training
    def compute_loss(self, x: Tensor, target: Tensor | None) -> SAEOutput:
        """The SAE forward with its losses; override to add a penalty (return ``out._replace(loss=...)``)."""
        return self.sae(x, step=self.global_step, return_feats=False)

    @torch.no_grad()
    def initialize_sae(self, rows: Tensor) -> None:
        """Fit the activation normalisation and initialise ``b_dec`` from a sample of rows."""
        x, target = self.split(rows)
        if self.sae.cfg.normalize_activations == "expected_norm":
            self.sae.fit_normalization(x) if target is None else self.sae.fit_normalization(x, target)
        self.sae.initialize_b_dec(x if target is None else target)
        self.initialized.fill_(True)

    def sae_step(self, rows: Tensor) -> SAEOutput:
        """One optimisation step on ``rows``: forward, manual backward, decoder processing, Adam, scheduler."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        x, target = self.split(rows)
        out = self.compute_loss(x, target)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(out.loss)
        self.sae.before_optimizer_step()
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        self.sae.after_optimizer_step()
        self._sync_sae_state()
        scheduler.step()
        self.tokens_seen += rows.shape[0]
        self.log_step(x, target, out)
        return out

    # ------------------------------------------------------------------ DDP
    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _gather(self, rows: Tensor) -> Tensor:
        """Rows of every rank (the same initialisation sample everywhere, as in a one-process run)."""
        if self._world() == 1:
            return rows
        return self.all_gather(rows).reshape(-1, rows.shape[-1])

    @torch.no_grad()
    def _sync_sae_state(self) -> None:
        """Make the SAE's training statistics global, so every rank (and a one-process run) agrees.

        A feature fired if it fired on any rank (``steps_since_fired``: min over ranks); the BatchTopK running
        threshold is averaged. Parameters need no sync: DDP averages their gradients.
        """
        if self._world() == 1 or not torch.distributed.is_initialized():
            return
        torch.distributed.all_reduce(self.sae.steps_since_fired, op=torch.distributed.ReduceOp.MIN)
        threshold = getattr(self.sae, "running_threshold", None)
        if threshold is not None:
            torch.distributed.all_reduce(threshold, op=torch.distributed.ReduceOp.SUM)
            threshold.div_(self._world())

    def log_step(self, x: Tensor, target: Tensor | None, out: SAEOutput) -> None:
        y = x if target is None else target
        with torch.no_grad():
            sse = (out.recon.detach() - y).pow(2).sum()
            sst = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
            dead = (self.sae.steps_since_fired >= self.sae.cfg.dead_feature_window).float().mean()
        metrics = {
            "train/loss": out.loss.detach(),
            "train/mse_loss": out.mse_loss.detach(),
            "train/sparsity_loss": out.sparsity_loss.detach(),
            "train/aux_loss": out.aux_loss.detach(),
            "train/l0": out.l0.detach().float().mean(),
            "train/explained_variance": 1 - sse / sst,
            "train/dead_fraction": dead,
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "train/tokens_seen": self.tokens_seen.float(),
        }
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", metrics["train/loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)

    def _steps_left(self) -> bool:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return max_steps is None or max_steps < 0 or self.global_step < max_steps

    def training_step(self, batch: Any, batch_idx: int) -> None:
        rows = self.activations(batch)
        self._check_finite(rows)
        if not bool(self.initialized):
            self._pending_init.append(rows)
            if sum(r.shape[0] for r in self._pending_init) < self.init_tokens and self.online:
                return None
            sample = torch.cat(self._pending_init)
            self._pending_init = []
            self.initialize_sae(self._gather(sample[: self.init_tokens]))
            rows = sample
        if not self.online:
            self.sae_step(rows)
            return None
        self._online_steps(rows)
        return None

    def _online_steps(self, rows: Tensor) -> None:
        if not self.buffer_tokens:  # no mixing: consecutive batches of rows, remainder carried over
            if self.buffer is None:
                self.buffer = _Carry()
            for chunk in self.buffer.chunks(rows, self.batch_tokens):
                if self._steps_left():
                    self.sae_step(chunk)
            return
        if self.buffer is None:
            self.buffer = MixingBuffer(self.buffer_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device,
                                       seed=self.sae.cfg.seed)  # fmt: skip
        while rows.shape[0]:
            taken = self.buffer.add(rows)
            rows = rows[taken:]
            if self.buffer.full:
                while self.buffer.size > self.buffer.capacity // 2 and self._steps_left():
                    self.sae_step(self.buffer.pop(self.batch_tokens))
                if not self._steps_left():
                    return

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sae_config"] = self.sae.cfg.to_dict()
        checkpoint["sae_class"] = type(self.sae).__name__
        checkpoint["sae_norm_fitted"] = self.sae._norm_fitted
        if self.checkpoint_buffer and self.buffer is not None:
            checkpoint["mixing_buffer"] = self.buffer.state_dict()
        if self._trainer is not None and self.trainer.is_global_zero:
            callback = self.trainer.checkpoint_callback
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                self.export(Path(dirpath) / "sae")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.sae._norm_fitted = bool(checkpoint.get("sae_norm_fitted", True))
        state = checkpoint.get("mixing_buffer")
        if state is not None:
            data = state["data"]
            if isinstance(state.get("size"), int) and "carry" in state:
                self.buffer = _Carry()
                self.buffer.load_state_dict(state)
            else:
                self.buffer = MixingBuffer(self.buffer_tokens, data.shape[1], dtype=data.dtype, device=data.device)
                self.buffer.load_state_dict(state)

    def export(self, folder: str | Path) -> Path:
        """Write the SAE in its native (SAELens-compatible) folder format."""
        return self.sae.save(folder)

    def on_fit_end(self) -> None:
        self.sae.batch_topk_group = None  # the SAE may be used outside this process group from now on
        folder = self.sae_folder()  # on every rank: trainer.log_dir is a collective call under DDP
        if self.trainer.is_global_zero:
            self.export(folder)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not bool(self.initialized):  # e.g. the sanity check before the first step: nothing to measure yet
            return None
        rows = self.activations(batch)
        x, target = self.split(rows)
        with torch.no_grad():
            out = self.sae(x, return_feats=False)
        y = x if target is None else target
        self.log("val/mse_loss", out.mse_loss, sync_dist=True)
        self.log("val/l0", out.l0.float().mean(), sync_dist=True)
        self.log(
            "val/explained_variance", 1 - (out.recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum(), sync_dist=True
        )


class _Carry:
    """Pass-through 'buffer' without mixing: yields full batches in order and keeps the remainder."""

    def __init__(self) -> None:
        self.rest: Tensor | None = None

    def chunks(self, rows: Tensor, size: int):
        if self.rest is not None and self.rest.shape[0]:
            rows = torch.cat([self.rest, rows])
        n_full = rows.shape[0] // size
        for i in range(n_full):
            yield rows[i * size : (i + 1) * size]
        self.rest = rows[n_full * size :]

    def state_dict(self) -> dict[str, Any]:
        rest = self.rest if self.rest is not None else torch.empty(0)
        return {"data": rest, "size": int(rest.shape[0]), "carry": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rest = state["data"]
