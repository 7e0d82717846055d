"""`SAEEvaluator`: the SAE evaluation table (ViT-Prisma's columns, computed correctly), logged and saved.

On validation batches the backbone runs three times on the same images: clean (caching the hook), with the SAE's
reconstruction spliced in at the hook (only at the token positions the SAE was trained on), and with those
positions zero-ablated. From these:

- explained variance % (1 - SSE/SST over the whole set), avg L0 per token, avg L0 of the CLS token,
  cos sim (per token, x vs x_hat), recon cos sim (per example, the model's final output with vs without the SAE),
- CE clean / with SAE / zero-ablated and % CE recovered = (CE_zero - CE_recon) / (CE_zero - CE_clean) * 100,
- % alive features (fired at least once on the evaluation set) and the log10 feature densities.

CE needs class logits: the backbone's classifier head, a CLIP ``ZeroShotClassifier`` file, or a linear probe
(safetensors with ``weight [n_classes, d]`` and ``bias``) applied to the model's output. Without one the table
says why CE is absent. Transcoders are spliced at ``hook_name_out``. In cached mode (no backbone) only the
reconstruction columns are computed. All metrics are torchmetrics: DDP-synchronised sums.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.metrics import L0, CERecovered, ExplainedVariance, FeatureFiring, MeanCosineSimilarity
from prisma_lightning.utils import atomic_path

CESource = Literal["auto", "head", "zero_shot", "linear_probe", "none"]

TABLE_COLUMNS = [
    ("explained_variance_pct", "Explained variance %"),
    ("l0", "Avg L0"),
    ("cls_l0", "Avg CLS L0"),
    ("cos_sim", "Cos sim"),
    ("recon_cos_sim", "Recon cos sim"),
    ("ce_clean", "CE"),
    ("ce_recon", "Recon CE"),
    ("ce_zero", "Zero abl CE"),
    ("ce_recovered_pct", "% CE recovered"),
    ("alive_pct", "% Alive features"),
]


class LinearProbe(nn.Module):
    """``logits = features @ weight.T + bias`` from a safetensors file (keys ``weight``, optional ``bias``)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise ValueError(f"Cannot read the linear probe {path} as safetensors ({err}).") from err
        if "weight" not in state or state["weight"].ndim != 2:
            raise ValueError(f"Linear probe {path} needs a 2-D 'weight' [n_classes, d]; found keys {sorted(state)}.")
        self.register_buffer("weight", state["weight"].float())
        self.register_buffer("bias", state.get("bias", torch.zeros(state["weight"].shape[0])).float())

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight.T + self.bias


class SAEEvaluator(pl.Callback):
    """Fill the evaluation table on validation batches; log it, print it and write ``eval.json``.

    Args:
        every_n_steps: during fit, evaluate only when at least this many steps passed since the last evaluation
            (None: at every validation run).
        n_batches: validation batches per evaluation (None: all of them).
        ce_source: ``auto`` (head if the backbone has a classifier, else the zero-shot / probe file if given),
            ``head``, ``zero_shot``, ``linear_probe`` or ``none``.
        zero_shot: path of a ``ZeroShotClassifier`` safetensors file (CLIP models).
        linear_probe: path of a linear-probe safetensors file.
        write_json: write ``eval.json`` (and ``sparsity.safetensors``) beside the exported SAE.
        print_table: print the table when an evaluation finishes (rank 0).
        evaluate_at_end: at the end of fit, evaluate once more on the validation data unless the last step was
            just evaluated (so every run ends with the table of its final SAE).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        n_batches: int | None = 8,
        ce_source: CESource = "auto",
        zero_shot: str | None = None,
        linear_probe: str | None = None,
        write_json: bool = True,
        print_table: bool = True,
        evaluate_at_end: bool = True,
    ) -> None:
        if ce_source not in ("auto", "head", "zero_shot", "linear_probe", "none"):
            raise ValueError(f"ce_source must be auto, head, zero_shot, linear_probe or none, got {ce_source!r}.")
        if ce_source == "zero_shot" and zero_shot is None:
            raise ValueError("ce_source='zero_shot' needs zero_shot=<path of a ZeroShotClassifier file>.")
        if ce_source == "linear_probe" and linear_probe is None:
            raise ValueError("ce_source='linear_probe' needs linear_probe=<path of a safetensors probe>.")
        self.every_n_steps, self.n_batches, self.ce_source = every_n_steps, n_batches, ce_source
        self.zero_shot_path, self.linear_probe_path = zero_shot, linear_probe
        self.write_json, self.print_table, self.evaluate_at_end = write_json, print_table, evaluate_at_end
        self._last_step: int | None = None
        self._active = False
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _classifier(self, pl_module: pl.LightningModule) -> tuple[nn.Module | None, str]:
        """The CE source and a note saying which one (or why there is none)."""
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None:
            return None, "no backbone (cached activations): CE needs images, evaluate in online mode"
        source = self.ce_source
        has_head = backbone.cfg.head == "classifier" and backbone.cfg.head_act == "none"
        if source == "auto":
            source = "head" if has_head else "zero_shot" if self.zero_shot_path else (
                "linear_probe" if self.linear_probe_path else "none")  # fmt: skip
        if source == "none":
            return None, ("the backbone has no classifier head and no zero_shot / linear_probe file was given"
                          if self.ce_source == "auto" else "ce_source='none'")  # fmt: skip
        if source == "head":
            if not has_head:
                raise ValueError("ce_source='head' but the backbone has no classifier head; use zero_shot or a probe.")
            return nn.Identity(), "backbone classifier head"
        if source == "zero_shot":
            from prisma_lightning.backbones import ZeroShotClassifier

            return ZeroShotClassifier.load(self.zero_shot_path), f"zero-shot classifier {self.zero_shot_path}"
        return LinearProbe(self.linear_probe_path), f"linear probe {self.linear_probe_path}"

    def _reset(self, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        sae = pl_module.sae
        self.metrics = {
            "ev": ExplainedVariance(),
            "l0": L0(),
            "cls_l0": L0(),
            "cos": MeanCosineSimilarity(),
            "recon_cos": MeanCosineSimilarity(),
            "ce": CERecovered(),
            "firing": FeatureFiring(sae.d_sae),
        }
        for metric in self.metrics.values():
            metric.to(device)
        self.classifier, self.ce_note = self._classifier(pl_module)
        if self.classifier is not None:
            self.classifier.to(device)
        self._batches = 0
        self._has_cls_rows = False

    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit" or self.every_n_steps is None or self._last_step is None:
            return True
        return trainer.global_step - self._last_step >= self.every_n_steps

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self._should_run(trainer)
        if self._active:
            self._reset(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A final evaluation of the trained SAE, run outside Lightning's validation loop."""
        if not self.evaluate_at_end or self._last_step == trainer.global_step:
            return
        loaders = _validation_loaders(trainer)
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        if loader is None or isinstance(loader, list | tuple):
            return
        self._active = True
        self._reset(pl_module)
        for batch in loader:
            if self.n_batches is not None and self._batches >= self.n_batches:
                break
            self._evaluate_batch(pl_module, _to_device(batch, pl_module.device))
        self._finish(trainer, pl_module, log_in_loop=False)

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not self._active or (self.n_batches is not None and self._batches >= self.n_batches):
            return
        self._evaluate_batch(pl_module, batch)

    @torch.no_grad()
    def _evaluate_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        self._batches += 1
        was_training = pl_module.sae.training
        pl_module.sae.eval()
        try:
            if getattr(pl_module, "online", False):
                self._evaluate_online(pl_module, batch)
            else:
                self._evaluate_rows(pl_module, pl_module.activations(batch))
        finally:
            pl_module.sae.train(was_training)

    def _sae_pass(self, pl_module: pl.LightningModule, x: Tensor, target: Tensor | None) -> Tensor:
        """Reconstruction of rows, updating the reconstruction metrics."""
        sae = pl_module.sae
        out = sae(x, target, return_feats=True) if target is not None else sae(x, return_feats=True)
        y = x if target is None else target
        self.metrics["ev"].update(out.recon, y)
        self.metrics["cos"].update(y, out.recon)
        self.metrics["l0"].update(out.feats)
        self.metrics["firing"].update(out.feats)
        return out.recon

    def _evaluate_rows(self, pl_module: pl.LightningModule, rows: Tensor) -> None:
        x, target = pl_module.split(rows)
        self._sae_pass(pl_module, x, target)

    def _evaluate_online(self, pl_module: pl.LightningModule, batch: Any) -> None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        labels = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        images = images.to(pl_module.device)
        model = pl_module.backbone
        cfg = model.cfg
        hook_in = pl_module.hook_name
        hook_out = getattr(pl_module, "hook_name_out", None) or hook_in
        positions = token_positions(pl_module.tokens, cfg)

        clean_out, cache = model.run_with_cache(images, names_filter=list({hook_in, hook_out}))
        acts_in = cache[hook_in]
        x = pl_module.select_tokens(acts_in)
        target = pl_module.select_tokens(cache[hook_out]) if hook_out != hook_in else None
        recon = self._sae_pass(pl_module, x, target)
        if cfg.class_token and pl_module.tokens in ("all", "cls") and acts_in.ndim == 3:
            first = pl_module.sae.encode(acts_in[:, 0])
            self.metrics["cls_l0"].update(first)
            self._has_cls_rows = True
        recon_acts = recon.reshape(*cache[hook_out][:, positions].shape) if acts_in.ndim == 3 else recon

        def splice(value: Tensor, hook: Any) -> Tensor:
            value = value.clone()
            if value.ndim == 3:
                value[:, positions] = recon_acts.to(value.dtype)
            else:
                value[:] = recon_acts.to(value.dtype)
            return value

        def zero(value: Tensor, hook: Any) -> Tensor:
            value = value.clone()
            if value.ndim == 3:
                value[:, positions] = 0
            else:
                value.zero_()
            return value

        recon_out = model.run_with_hooks(images, fwd_hooks=[(hook_out, splice)])
        self.metrics["recon_cos"].update(clean_out.flatten(1), recon_out.flatten(1))
        if self.classifier is not None and labels is not None:
            zero_out = model.run_with_hooks(images, fwd_hooks=[(hook_out, zero)])
            logits = [self.classifier(o) for o in (clean_out, recon_out, zero_out)]
            self.metrics["ce"].update(*logits, labels.to(pl_module.device).long())
        elif self.classifier is not None:
            self.ce_note = "the validation batches carry no labels"
            self.classifier = None

    # ------------------------------------------------------------------ results
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active and self._batches:
            self._finish(trainer, pl_module, log_in_loop=True)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_in_loop: bool) -> None:
        self._active = False
        self._last_step = trainer.global_step
        m = self.metrics
        firing = m["firing"].compute()
        results: dict[str, Any] = {
            "explained_variance_pct": float(m["ev"].compute()) * 100,
            "l0": float(m["l0"].compute()),
            "cls_l0": float(m["cls_l0"].compute()) if self._has_cls_rows else None,
            "cos_sim": float(m["cos"].compute()),
            "recon_cos_sim": float(m["recon_cos"].compute()) if getattr(pl_module, "online", False) else None,
            "alive_pct": float(firing["alive_pct"]),
            "dead_features": int(firing["dead_count"]),
            "dense_features": int(firing["dense_count"]),
            "ce_source": self.ce_note,
        }
        ce = {k: float(v) for k, v in m["ce"].compute().items()} if self.classifier is not None else {}
        for key in ("ce_clean", "ce_recon", "ce_zero", "ce_recovered_pct"):
            value = ce.get(key)
            results[key] = None if value is None or math.isnan(value) else value
        backbone = getattr(pl_module, "backbone", None)
        results.update(
            hook_name=pl_module.hook_name,
            hook_name_out=getattr(pl_module, "hook_name_out", None),
            tokens=pl_module.tokens,
            global_step=trainer.global_step,
            model_name=backbone.cfg.model_name if backbone is not None else None,
        )
        self.results = results
        loggable = {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float) and not math.isnan(v)}
        if loggable and log_in_loop:
            pl_module.log_dict({k: float(v) for k, v in loggable.items()}, sync_dist=False, rank_zero_only=True)
        elif loggable and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({k: float(v) for k, v in loggable.items()}, step=trainer.global_step)
        # Resolved on every rank: the folder may come from trainer.log_dir, a collective call under DDP.
        folder = pl_module.sae_folder() if hasattr(pl_module, "sae_folder") else Path("sae")
        if trainer.is_global_zero:
            if self.write_json:
                self._write(folder, results, firing["log10_density"].float().cpu())
            if self.print_table:
                print(format_table(results))

    def _write(self, folder: Path, results: dict[str, Any], log10_density: Tensor) -> None:
        from prisma_lightning.sae import save_sparsity

        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "eval.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")
        save_sparsity(folder, log10_density, d_sae=log10_density.numel())


def _validation_loaders(trainer: pl.Trainer) -> Any:
    """The validation data of a fit, also when Lightning skipped its validation loop (``limit_val_batches=0``)."""
    if trainer.datamodule is not None:
        return trainer.datamodule.val_dataloader()
    if trainer.val_dataloaders is not None:
        return trainer.val_dataloaders
    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # the loaders passed to fit()
    return source.dataloader() if source.is_defined() else None


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def token_positions(tokens: str, cfg: Any) -> slice | list[int]:
    """Token positions an SAE trained on ``tokens`` reads (and is spliced back into)."""
    if tokens == "cls":
        return [0]
    if tokens == "patches":
        return slice(cfg.n_prefix_tokens, None)
    return slice(None)


def format_table(results: dict[str, Any]) -> str:
    """The evaluation table as markdown (the columns of ViT-Prisma's SAE table)."""

    def fmt(value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    rule = "|" + " --- |" * len(TABLE_COLUMNS)
    row = "| " + " | ".join(fmt(results.get(key)) for key, _ in TABLE_COLUMNS) + " |"
    note = f"\nCE source: {results.get('ce_source')}" if results.get("ce_recon") is None else ""
    return (
        f"\nSAE evaluation ({results.get('hook_name')}, step {results.get('global_step')})\n{head}\n{rule}\n{row}{note}"
    )
