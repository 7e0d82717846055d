"""`SAEEvaluator`: the SAE evaluation table (ViT-Prisma's columns, computed correctly), logged and saved.

On validation batches the backbone runs once clean (caching every hook the SAEs read), then, for every SAE, once
with the SAE's reconstruction spliced in at its hook (only at the token positions it was trained on), and once per
hook with those positions zero-ablated. From these, per SAE:

- explained variance % (1 - SSE/SST over the whole set), avg L0 per token, avg L0 of the CLS token,
  cos sim (per token, x vs x_hat), recon cos sim (per example, the model's final output with vs without the SAE),
- CE clean / with SAE / zero-ablated and % CE recovered = (CE_zero - CE_recon) / (CE_zero - CE_clean) * 100,
- % alive features (fired at least once on the evaluation set) and the log10 feature densities.

CE needs class logits: the backbone's classifier head, a CLIP ``ZeroShotClassifier`` file, or a linear probe
(safetensors with ``weight [n_classes, d]`` and ``bias``) applied to the model's output; both files are checked at
setup (readable, the right width). Without one the table says why CE is absent. Transcoders are spliced at
``hook_name_out``. In cached mode (no backbone) only the reconstruction columns are computed. All metrics are
torchmetrics: DDP-synchronised sums.

Outputs: one table with a row per SAE (printed, and ``eval_table.md`` / ``eval_table.csv`` in the run folder);
per SAE ``eval.json`` (strict JSON: a value that could not be computed is ``null`` with the reason under
``notes``) and ``sparsity.safetensors`` -- beside the exported SAE during ``fit``, under ``<run>/eval/`` for
``prisma validate``. An input folder (a trained SAE being evaluated) is never written to.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.metrics import (
    DSPRITES_FACTORS,
    L0,
    CERecovered,
    ExplainedVariance,
    FeatureFiring,
    GroundTruthReport,
    MeanCosineSimilarity,
)
from prisma_lightning.utils import atomic_write_text, run_dir

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

GROUND_TRUTH_COLUMNS = [
    ("gt_auroc", "GT AUROC"),
    ("gt_probe_k1", "GT probe@1"),
    ("gt_probe_k16", "GT probe@16"),
    ("gt_dominance_pct", "GT dominated %"),
]
"""Shown when the validation data carries generative factors (``DSpritesDataModule(factors=True)``): the mean over
factors of the best single feature's AUROC per factor value, of the sparse probes' balanced accuracy with the top 1
and 16 features, and of the percentage of features whose top images share one factor value (see
:mod:`prisma_lightning.metrics.ground_truth`)."""


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
        bias = state.get("bias", torch.zeros(state["weight"].shape[0]))
        if bias.shape != (state["weight"].shape[0],):
            raise ValueError(f"Linear probe {path}: 'bias' has shape {list(bias.shape)}, expected [n_classes].")
        self.register_buffer("weight", state["weight"].float())
        self.register_buffer("bias", bias.float())
        self.path = path

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight.T + self.bias


class _SAEMetrics:
    """The metrics of one SAE."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.ev = ExplainedVariance().to(device)
        self.l0 = L0().to(device)
        self.cls_l0 = L0().to(device)
        self.cos = MeanCosineSimilarity().to(device)
        self.recon_cos = MeanCosineSimilarity().to(device)
        self.ce = CERecovered().to(device)
        self.firing = FeatureFiring(d_sae).to(device)
        self.ground_truth: GroundTruthReport | None = None
        self.has_cls = False
        self.has_splice = False
        self.non_finite = 0
        self.splice_note: str | None = None


class SAEEvaluator(pl.Callback):
    """Fill the evaluation table on validation batches; log it, print it and write ``eval.json`` per SAE.

    Args:
        every_n_steps: during fit, evaluate only when at least this many steps passed since the last evaluation
            (None: at every validation run).
        n_batches: validation batches per evaluation (None: all of them; at least 1).
        ce_source: ``auto`` (head if the backbone has a classifier, else the zero-shot / probe file if given),
            ``head``, ``zero_shot``, ``linear_probe`` or ``none``.
        zero_shot: path of a ``ZeroShotClassifier`` safetensors file (CLIP models).
        linear_probe: path of a linear-probe safetensors file.
        write_json: write ``eval.json`` (and ``sparsity.safetensors``) per SAE and the combined table files.
        print_table: print the table when an evaluation finishes (rank 0).
        evaluate_at_end: at the end of fit, evaluate once more on the validation data unless the last step was
            just evaluated (so every run ends with the table of its final SAEs).
        ground_truth: add the ground-truth columns (:data:`GROUND_TRUTH_COLUMNS`, and the per-factor report under
            ``ground_truth`` in eval.json) scored on the evaluated images: ``None`` when the validation batches carry
            generative factors (``DSpritesDataModule(factors=True)``), ``True`` to require them, ``False`` never.
            An image's score of a feature is its maximum over the tokens the SAE reads.
        ground_truth_factors: factor name -> number of values, in the order of the batches' ``factors`` columns
            (default: dSprites' shape, scale, orientation, posX, posY).
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
        ground_truth: bool | None = None,
        ground_truth_factors: dict[str, int] | None = None,
    ) -> None:
        if ce_source not in ("auto", "head", "zero_shot", "linear_probe", "none"):
            raise ValueError(f"ce_source must be auto, head, zero_shot, linear_probe or none, got {ce_source!r}.")
        if ce_source == "zero_shot" and zero_shot is None:
            raise ValueError("ce_source='zero_shot' needs zero_shot=<path of a ZeroShotClassifier file>.")
        if ce_source == "linear_probe" and linear_probe is None:
            raise ValueError("ce_source='linear_probe' needs linear_probe=<path of a safetensors probe>.")
        if n_batches is not None and (isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1):
            raise ValueError(f"n_batches={n_batches!r} must be a positive number of batches, or null for all of them.")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive number of steps, or null.")
        self.every_n_steps, self.n_batches, self.ce_source = every_n_steps, n_batches, ce_source
        self.zero_shot_path, self.linear_probe_path = zero_shot, linear_probe
        self.write_json, self.print_table, self.evaluate_at_end = write_json, print_table, evaluate_at_end
        if ground_truth not in (None, True, False):
            raise ValueError(f"ground_truth={ground_truth!r} must be true, false or null (when the data has factors).")
        self.ground_truth, self.ground_truth_factors = ground_truth, dict(ground_truth_factors or DSPRITES_FACTORS)
        GroundTruthReport(self.ground_truth_factors)  # validates the factors now, not after training
        self._last_step: int | None = None
        self._active = False
        self.classifier: nn.Module | None = None
        self.ce_note = ""
        self.results_by_sae: dict[str, dict[str, Any]] = {}
        """The last table: SAE name -> its row (``results`` for a single SAE)."""
        self._folders: dict[str, Path] = {}
        self._table_dir: Path | None = None

    @property
    def results(self) -> dict[str, Any]:
        """The last row of a single-SAE run (``{name: row}`` for several SAEs)."""
        if len(self.results_by_sae) == 1:
            return next(iter(self.results_by_sae.values()))
        return self.results_by_sae

    # ------------------------------------------------------------------ setup: everything that could fail later
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):
            self._check_validation_data(trainer)
            if self.ground_truth and getattr(trainer.datamodule, "factors", None) is False:
                raise ValueError(
                    "SAEEvaluator(ground_truth=True) needs validation batches with generative factors, but the data "
                    f"module {type(trainer.datamodule).__name__} has factors=False: set its factors: true."
                )
        self.classifier, self.ce_note = self._classifier(pl_module)
        # trainer.log_dir / run folders are collective under DDP: resolve every path here, on every rank.
        base = run_dir(trainer)
        names = list(getattr(pl_module, "saes", {"sae": None}))
        if stage == "fit" and hasattr(pl_module, "sae_folder"):
            self._folders = {name: Path(pl_module.sae_folder(name)) for name in names}
            self._table_dir = base
        else:
            single = getattr(pl_module, "single", True)
            self._folders = {name: base / "eval" if single else base / "eval" / name for name in names}
            self._table_dir = base / "eval"
        if trainer.is_global_zero and self.write_json:
            from prisma_lightning.modules.sae_module import _check_writable

            for folder in {*self._folders.values(), self._table_dir}:
                _check_writable(folder)

    @staticmethod
    def _check_validation_data(trainer: pl.Trainer) -> None:
        """Fail before training, not after it, when there is nothing to evaluate on."""
        try:
            loaders = _validation_loaders(trainer)
        except Exception:  # noqa: BLE001 (the data is not set up yet: Lightning reports that itself)
            return
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        empty = loader is None or isinstance(loader, list | tuple)
        if not empty:
            try:
                empty = len(loader) == 0
            except TypeError:
                empty = False
        if empty:
            raise ValueError(
                "SAEEvaluator has no validation data to evaluate on: the data module's validation split is empty. "
                "Raise val_fraction (or the dataset size), or remove SAEEvaluator from the callbacks."
            )

    def _classifier(self, pl_module: pl.LightningModule) -> tuple[nn.Module | None, str]:
        """The CE source and a note saying which one (or why there is none); width errors are raised here."""
        backbone = getattr(pl_module, "backbone", None) if getattr(pl_module, "online", True) else None
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
        width = _output_width(backbone)
        if source == "zero_shot":
            from prisma_lightning.backbones import ZeroShotClassifier

            clf = ZeroShotClassifier.load(self.zero_shot_path)
            got = int(clf.weights.shape[0])  # weights [embed_dim, n_classes]
            if got is not None and width is not None and got != width:
                raise ValueError(
                    f"The zero-shot classifier {self.zero_shot_path} embeds classes in {got} dimensions but the "
                    f"backbone {backbone.cfg.model_name!r} outputs {width}; build it from the same CLIP model."
                )
            return clf, f"zero-shot classifier {self.zero_shot_path}"
        probe = LinearProbe(self.linear_probe_path)
        if width is not None and probe.in_features != width:
            raise ValueError(
                f"The linear probe {self.linear_probe_path} takes {probe.in_features} features but the backbone "
                f"{backbone.cfg.model_name!r} outputs {width}; train the probe on this model's output."
            )
        return probe, f"linear probe {self.linear_probe_path}"

    def _reset(self, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self.metrics = {name: _SAEMetrics(sae.d_sae, device) for name, sae in _saes(pl_module).items()}
        if self.classifier is not None:
            self.classifier.to(device)
        self._batches = 0
        self._labels_missing = False

    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit" or self.every_n_steps is None or self._last_step is None:
            return True
        return trainer.global_step - self._last_step >= self.every_n_steps

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self._should_run(trainer) and bool(getattr(pl_module, "initialized", True))
        if self._active:
            self._reset(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A final evaluation of the trained SAEs, outside Lightning's validation loop (after their export)."""
        if callable(getattr(pl_module, "export_all", None)):
            pl_module.export_all()  # the export comes first: nothing optional below may cost it
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
        saes = _saes(pl_module)
        modes = {name: sae.training for name, sae in saes.items()}
        for sae in saes.values():
            sae.eval()
        try:
            if getattr(pl_module, "online", False):
                self._evaluate_online(pl_module, batch)
            else:
                rows = pl_module.rows_from_batch(batch)
                for name in saes:
                    with pl_module.stepping(name):
                        x, target = pl_module.split(rows[pl_module.group_of(name).key])
                        self._sae_pass(pl_module, name, x, target)
        finally:
            for name, sae in saes.items():
                sae.train(modes[name])

    def _sae_pass(
        self, pl_module: pl.LightningModule, name: str, x: Tensor, target: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Reconstruction and features of one SAE's rows, updating its reconstruction metrics."""
        sae = pl_module.sae
        out = sae(x, target, return_feats=True) if target is not None else sae(x, return_feats=True)
        m = self.metrics[name]
        finite = torch.isfinite(out.recon).all(-1) & torch.isfinite(out.feats).all(-1)
        if not bool(finite.all()):
            m.non_finite += int((~finite).sum())
        y = x if target is None else target
        m.ev.update(out.recon, y)
        m.cos.update(y, out.recon)
        m.l0.update(out.feats)
        m.firing.update(out.feats)
        return out.recon, out.feats

    def _evaluate_online(self, pl_module: pl.LightningModule, batch: Any) -> None:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        labels = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        images = images.to(pl_module.device)
        model = pl_module.backbone
        cfg = model.cfg
        names = pl_module.hook_names()
        clean_out, cache = model.run_with_cache(images, names_filter=names)
        rows = pl_module.rows_from_cache(cache, check_finite=False)
        zero_logits: dict[Any, Tensor] = {}
        clean_logits = self.classifier(clean_out) if self.classifier is not None and labels is not None else None
        if self.classifier is not None and labels is None:
            self._labels_missing = True
        factors = self._factors_of(batch, images.shape[0])
        for name in _saes(pl_module):
            group = pl_module.group_of(name)
            m = self.metrics[name]
            with pl_module.stepping(name):
                x, target = pl_module.split(rows[group.key])
                recon, feats = self._sae_pass(pl_module, name, x, target)
                if factors is not None:
                    self._score_factors(m, feats, factors, images.shape[0], pl_module.sae.d_sae)
                acts_in = cache[group.hook_in]
                if cfg.class_token and acts_in.ndim == 3 and group.positions is not None and 0 in group.positions:
                    m.cls_l0.update(pl_module.sae.encode(acts_in[:, 0]))
                    m.has_cls = True
            hook_out = group.hook_out or group.hook_in
            if group.positions is None and cache[hook_out].ndim == 3:
                m.splice_note = "select_tokens does not keep a subset of token positions: no splicing"
                continue
            m.has_splice = True
            positions = group.positions if cache[hook_out].ndim == 3 else None
            recon_out = model.run_with_hooks(images, fwd_hooks=[(hook_out, _splicer(positions, recon))])
            m.recon_cos.update(clean_out.flatten(1), recon_out.flatten(1))
            if clean_logits is not None:
                key = (hook_out, tuple(positions) if positions is not None else None)
                if key not in zero_logits:
                    zero_out = model.run_with_hooks(images, fwd_hooks=[(hook_out, _zeroer(positions))])
                    zero_logits[key] = self.classifier(zero_out)
                m.ce.update(clean_logits, self.classifier(recon_out), zero_logits[key], labels.to(images.device).long())

    def _factors_of(self, batch: Any, n_images: int) -> dict[str, Tensor] | None:
        """The batch's ``{"factors": [B, n_factors], "index": [B]}`` when ground truth is scored, else None."""
        if self.ground_truth is False:
            return None
        extra = batch[2] if isinstance(batch, list | tuple) and len(batch) > 2 else None
        if not (isinstance(extra, Mapping) and "factors" in extra and "index" in extra):
            if self.ground_truth:
                raise ValueError(
                    "SAEEvaluator(ground_truth=True): the validation batches carry no generative factors (expected "
                    "[images, labels, {'factors': [B, n], 'index': [B]}], e.g. DSpritesDataModule(factors=True))."
                )
            return None
        factors, index = extra["factors"], extra["index"]
        if tuple(factors.shape) != (n_images, len(self.ground_truth_factors)):
            raise ValueError(
                f"The batch's factors have shape {list(factors.shape)} but SAEEvaluator expects [{n_images}, "
                f"{len(self.ground_truth_factors)}] for ground_truth_factors {list(self.ground_truth_factors)}."
            )
        return {"factors": factors, "index": index}

    def _score_factors(self, m: _SAEMetrics, feats: Tensor, factors: dict[str, Tensor], n_images: int,
                       d_sae: int) -> None:  # fmt: skip
        if m.ground_truth is None:
            m.ground_truth = GroundTruthReport(self.ground_truth_factors).to(feats.device)
        scores = feats.reshape(n_images, -1, d_sae).amax(dim=1)  # each feature's max over the image's tokens
        m.ground_truth.update(scores, factors["factors"].to(feats.device), factors["index"].to(feats.device))

    # ------------------------------------------------------------------ results
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, log_in_loop=True)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_in_loop: bool) -> None:
        self._active = False
        batches = torch.tensor(float(self._batches), device=pl_module.device)
        if trainer.world_size > 1:
            batches = trainer.strategy.reduce(batches, reduce_op="sum")
        if float(batches) == 0:
            raise ValueError(
                "SAEEvaluator evaluated no batches: the validation data is empty (check val_fraction / the "
                "validation split, limit_val_batches and n_batches)."
            )
        self._last_step = trainer.global_step
        online = getattr(pl_module, "online", False)
        densities: dict[str, Tensor] = {}
        self.results_by_sae = {}
        for name, sae in _saes(pl_module).items():
            row, densities[name] = self._row(pl_module, name, sae, online, trainer.global_step)
            self.results_by_sae[name] = row
        self._log(trainer, pl_module, log_in_loop)
        if trainer.is_global_zero:
            if self.write_json:
                self._write(densities)
            if self.print_table:
                print(format_table(self.results_by_sae, where=self._where() if self.write_json else None))

    def _row(
        self, pl_module: pl.LightningModule, name: str, sae: Any, online: bool, step: int
    ) -> tuple[dict[str, Any], Tensor]:
        m = self.metrics[name]
        firing = m.firing.compute()  # all-gathers under DDP: every rank computes every metric
        values = {
            "explained_variance_pct": float(m.ev.compute()) * 100,
            "l0": float(m.l0.compute()),
            "cls_l0": float(m.cls_l0.compute()) if m.has_cls else None,
            "cos_sim": float(m.cos.compute()),
            "recon_cos_sim": float(m.recon_cos.compute()) if online and m.has_splice else None,
            "alive_pct": float(firing["alive_pct"]),
            "dead_features": int(firing["dead_count"]),
            "dense_features": int(firing["dense_count"]),
        }
        notes: dict[str, str] = {}
        ce = {k: float(v) for k, v in m.ce.compute().items()} if self.classifier is not None else {}
        for key in ("ce_clean", "ce_recon", "ce_zero", "ce_recovered_pct"):
            values[key] = ce.get(key)
        non_finite = m.non_finite
        if non_finite:
            for key in ("explained_variance_pct", "l0", "cls_l0", "cos_sim", "recon_cos_sim", "alive_pct",
                        "ce_recon", "ce_recovered_pct"):  # fmt: skip
                values[key] = None
                notes[key] = f"the SAE produced NaN or infinite values on {non_finite} tokens (a diverged SAE)"
        for key, value in list(values.items()):
            if isinstance(value, float) and not math.isfinite(value):
                values[key] = None
                notes.setdefault(key, "not computable on this data (e.g. a constant input or CE_zero == CE_clean)")
        if self.classifier is None:
            for key in ("ce_clean", "ce_recon", "ce_zero", "ce_recovered_pct"):
                notes[key] = self.ce_note
        elif self._labels_missing:
            for key in ("ce_clean", "ce_recon", "ce_zero", "ce_recovered_pct"):
                values[key] = None
                notes[key] = "the validation batches carry no labels"
        if m.splice_note:
            for key in ("recon_cos_sim", "ce_recon", "ce_zero", "ce_recovered_pct"):
                values[key] = None
                notes[key] = m.splice_note
        # every process reads the same kind of batches, so all or none have factors (compute() all-gathers)
        report = m.ground_truth.compute() if m.ground_truth is not None else None
        if report is not None:
            values.update(_ground_truth_columns(report))
        if values["cls_l0"] is None and "cls_l0" not in notes:
            notes["cls_l0"] = "the SAE does not read the class token"
        backbone = getattr(pl_module, "backbone", None) if online else None
        group = pl_module.group_of(name) if hasattr(pl_module, "group_of") else None
        row: dict[str, Any] = {
            "name": name,
            **values,
            "hook_name": group.hook_in if group else sae.cfg.hook_name,
            "hook_name_out": group.hook_out if group else None,
            "tokens": group.tokens if group else sae.cfg.tokens,
            "architecture": sae.cfg.architecture,
            "d_sae": sae.d_sae,
            "global_step": step,
            "model_name": backbone.cfg.model_name if backbone is not None else sae.cfg.model_name or None,
            "ce_source": self.ce_note,
            "n_batches": self._batches,
            "notes": notes,
        }
        if report is not None:
            row["ground_truth"] = report
        return row, firing["log10_density"].float().cpu()

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_in_loop: bool) -> None:
        single = len(self.results_by_sae) == 1
        loggable: dict[str, float] = {}
        for name, row in self.results_by_sae.items():
            prefix = "eval/" if single else f"eval/{name}/"
            for key, value in row.items():
                if key in ("global_step", "d_sae", "n_batches"):
                    continue  # provenance, not a metric
                if isinstance(value, int | float) and not isinstance(value, bool):
                    loggable[prefix + key] = float(value)
            if row["explained_variance_pct"] is not None:
                key = "val/explained_variance" if single else f"val/{name}/explained_variance"
                loggable[key] = row["explained_variance_pct"] / 100
        if not loggable:
            return
        if log_in_loop:
            pl_module.log_dict(loggable, sync_dist=False, rank_zero_only=True)
        elif trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(loggable, step=trainer.global_step)

    def _where(self) -> str:
        folders = sorted({str(f) for f in self._folders.values()})
        return folders[0] if len(folders) == 1 else str(self._table_dir)

    def _write(self, densities: dict[str, Tensor]) -> None:
        from prisma_lightning.sae import save_sparsity

        for name, row in self.results_by_sae.items():
            folder = self._folders.get(name)
            if folder is None:
                continue
            atomic_write_text(folder / "eval.json", json.dumps(row, indent=2, allow_nan=False) + "\n")
            save_sparsity(folder, densities[name], d_sae=densities[name].numel())
        if self._table_dir is not None and len(self.results_by_sae) > 1:
            atomic_write_text(self._table_dir / "eval_table.md", format_table(self.results_by_sae).strip() + "\n")
            atomic_write_text(self._table_dir / "eval_table.csv", table_csv(self.results_by_sae))


def _saes(pl_module: pl.LightningModule) -> dict[str, Any]:
    saes = getattr(pl_module, "saes", None)
    return dict(saes.items()) if saes is not None else {"sae": pl_module.sae}


def _splicer(positions: list[int] | None, recon: Tensor) -> Any:
    def splice(value: Tensor, hook: Any) -> Tensor:
        value = value.clone()
        if positions is None:
            value[:] = recon.reshape(value.shape).to(value.dtype)
        else:
            value[:, positions] = recon.reshape(value.shape[0], len(positions), -1).to(value.dtype)
        return value

    return splice


def _zeroer(positions: list[int] | None) -> Any:
    def zero(value: Tensor, hook: Any) -> Tensor:
        value = value.clone()
        if positions is None:
            value.zero_()
        else:
            value[:, positions] = 0
        return value

    return zero


def _output_width(backbone: Any) -> int | None:
    """Width of the backbone's output (what a probe or zero-shot classifier reads)."""
    try:
        with torch.no_grad():
            return int(backbone(backbone.example_input(1).to(next(backbone.parameters()).device)).shape[-1])
    except Exception:  # noqa: BLE001 (a backbone without example_input: skip the width check)
        return None


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
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def token_positions(tokens: str, cfg: Any) -> slice | list[int]:
    """Token positions an SAE trained on ``tokens`` reads (and is spliced back into)."""
    if tokens == "cls":
        return [0]
    if tokens == "patches":
        return slice(cfg.n_prefix_tokens, None)
    return slice(None)


def _ground_truth_columns(report: dict[str, Any]) -> dict[str, float | None]:
    """The table's ground-truth columns from a :func:`ground_truth_report` (means over factors; None if none)."""
    factors = list(report["factors"].values())

    def mean(values: list[float | None], scale: float = 1.0) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) * scale if kept else None

    ks = [str(k) for k in report["ks"]]
    return {
        "gt_auroc": mean([f["mean_auroc"] for f in factors]),
        "gt_probe_k1": mean([f["mean_probe"].get(ks[0]) for f in factors]),
        "gt_probe_k16": mean([f["mean_probe"].get(ks[-1]) for f in factors]),
        "gt_dominance_pct": mean([f["dominance"] for f in factors], 100.0),
    }


def _columns(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    has_gt = any(row.get("gt_auroc") is not None for row in rows.values())
    return TABLE_COLUMNS + (GROUND_TRUTH_COLUMNS if has_gt else [])


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(results: dict[str, Any], where: str | None = None) -> str:
    """The evaluation table as markdown (ViT-Prisma's columns), one row per SAE; ``results`` is one row or
    ``{name: row}``."""
    rows = results if results and all(isinstance(v, dict) for v in results.values()) else {"sae": results}
    multi = len(rows) > 1
    columns = _columns(rows)
    labels = (["SAE"] if multi else []) + [label for _, label in columns]
    head = "| " + " | ".join(labels) + " |"
    rule = "|" + " --- |" * len(labels)
    lines = []
    for name, row in rows.items():
        cells = ([name] if multi else []) + [_fmt(row.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    title = (
        f"\nSAE evaluation ({first.get('hook_name')}, step {first.get('global_step')})"
        if not multi
        else f"\nSAE evaluation ({len(rows)} SAEs, step {first.get('global_step')})"
    )
    notes = sorted({f"{key}: {note}" for row in rows.values() for key, note in (row.get("notes") or {}).items()
                    if key in ("ce_recon", "recon_cos_sim", "explained_variance_pct")})  # fmt: skip
    text = f"{title}\n{head}\n{rule}\n" + "\n".join(lines)
    if notes:
        text += "\n" + "\n".join(f"n/a {n}" for n in notes)
    if where:
        text += f"\nWritten to {where}"
    return text


def table_csv(results: dict[str, dict[str, Any]]) -> str:
    """The table (every numeric column and the provenance) as CSV, one row per SAE."""
    keys = ["name", *[k for k, _ in _columns(results)], "dead_features", "dense_features", "hook_name", "hook_name_out",
            "tokens", "architecture", "d_sae", "global_step", "model_name"]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(keys)
    for row in results.values():
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
    return buf.getvalue()
