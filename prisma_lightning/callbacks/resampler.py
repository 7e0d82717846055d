"""`DeadFeatureResampler`: Anthropic's dead-feature resampling ("Towards Monosemanticity", 2023) as a callback.

Every ``every_n_steps`` SAE steps, features that have not fired for ``window`` steps are re-initialised:

1. Firing is read from the SAE's own ``steps_since_fired`` buffer, which every training-mode forward updates (reset
   to 0 when a feature fires in the batch, +1 otherwise). That costs nothing extra and counts exactly the batches the
   SAE was trained on. A feature is dead when ``steps_since_fired >= window``.
2. A pool of ``n_samples`` training rows per hook group is collected from the SAE steps that follow the due step
   (the rows those steps trained on: nothing is recomputed).
3. Each row's squared reconstruction error ``||y - y_hat||^2`` (normalised space) is computed; rows are drawn with
   probability proportional to the *square* of that loss (Anthropic's recipe), one per dead feature.
4. Decoder row := the drawn row minus ``b_dec``, unit-normalised (normalised input space). Encoder row := the same
   direction (for transcoders: the input row minus the input bias) scaled to ``scale`` x the mean encoder norm of
   the alive features. The architecture writes them (``SparseAutoencoder.resample_features``): per-feature biases
   := 0, per-feature state such as JumpReLU thresholds back to its initial value.
5. Adam's ``exp_avg`` / ``exp_avg_sq`` are zeroed for exactly the touched entries of every per-feature parameter
   (the architecture's ``feature_parameters``: name -> feature axis), and ``steps_since_fired`` is reset.

DDP: ``steps_since_fired`` is local to each rank (ranks see different rows), so the dead mask is all-reduced: a
feature is dead only when it is dead on every rank (the sum over ranks of "fired within the window" is 0). The rows
are drawn on rank 0 and broadcast, so every rank writes bit-identical parameters and the replicas stay in sync.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

log = logging.getLogger(__name__)

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class DeadFeatureResampler(pl.Callback):
    """Re-initialise dead SAE features from high-loss inputs (see the module docstring for the recipe).

    Args:
        every_n_steps: resample at every multiple of this many SAE (optimizer) steps.
        window: a feature is dead when it has not fired for this many SAE steps; default: the SAE's own
            ``dead_feature_window`` (the definition AuxK, ghost grads and ``train/dead_fraction`` use).
        n_samples: rows in the pool the replacement directions are drawn from (their losses are computed on it).
        scale: new encoder rows get norm ``scale`` x the mean encoder norm of the alive features.
        max_step: stop resampling after this step (None: never stop); Anthropic stops well before the end of training
            so the last resampled features can settle.
        chunk_size: rows per SAE forward when computing the pool's losses (bounds memory for wide SAEs).
        seed: seed of the draw (combined with the step, so every resampling draws differently but reproducibly).
    """

    def __init__(
        self,
        every_n_steps: int = 25000,
        window: int | None = None,
        n_samples: int = 16384,
        scale: float = 0.2,
        max_step: int | None = None,
        chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive number of steps, got {every_n_steps}.")
        if window is not None and window <= 0:
            raise ValueError(f"window must be a positive number of steps (or None for the default), got {window}.")
        if n_samples <= 0 or chunk_size <= 0:
            raise ValueError(f"n_samples ({n_samples}) and chunk_size ({chunk_size}) must be positive.")
        if not scale > 0:
            raise ValueError(f"scale must be positive (Anthropic uses 0.2), got {scale}.")
        self.every_n_steps, self.window, self.n_samples, self.scale = every_n_steps, window, n_samples, scale
        self.max_step, self.chunk_size, self.seed = max_step, chunk_size, seed
        self.last_step = 0
        """Step of the last resampling (checkpointed: a resumed run does not resample the same period twice)."""
        self.total_resampled = 0
        self._pools: dict[str, list[Tensor]] = {}
        self._pool_rows = 0

    # ------------------------------------------------------------------ schedule
    def dead_window(self, sae: Any) -> int:
        """Steps without firing after which a feature counts as dead."""
        return self.window if self.window is not None else int(sae.cfg.dead_feature_window)

    def due(self, step: int) -> bool:
        """Whether a resampling is owed at ``step`` (a multiple of ``every_n_steps`` was passed since the last one)."""
        if step <= 0 or (self.max_step is not None and step > self.max_step):
            return False
        return step // self.every_n_steps > self.last_step // self.every_n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_resampled": self.total_resampled}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict.get("last_step", 0))
        self.total_resampled = int(state_dict.get("total_resampled", 0))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.due(step):
            return
        # Only rank 0's pool is sampled from (its draw is broadcast), so only rank 0 collects and decides.
        if trainer.is_global_zero:
            self._collect(pl_module, batch)
        ready = trainer.strategy.broadcast(self._pool_rows >= self.n_samples, src=0)
        if not ready:
            return
        pools = {key: torch.cat(parts) for key, parts in self._pools.items()} if self._pools else {}
        self._pools, self._pool_rows = {}, 0
        counts = {}
        for name in _names(pl_module):
            with _stepping(pl_module, name):
                key = pl_module.group_of(name).key if hasattr(pl_module, "group_of") else "*"
                counts[name] = self.resample(trainer, pl_module, pools.get(key))
        n = sum(counts.values())
        self.last_step = step
        self.total_resampled += n
        single = len(counts) == 1
        for name, count in counts.items():
            prefix = "resampler/" if single else f"resampler/{name}/"
            pl_module.log(prefix + "n_resampled", float(count), on_step=True, on_epoch=False, rank_zero_only=True)
        pl_module.log("resampler/total_resampled", float(self.total_resampled), on_step=True, on_epoch=False,
                      rank_zero_only=True)  # fmt: skip
        if trainer.is_global_zero and n:
            log.info("Step %d: resampled %d dead features (%d in total).", step, n, self.total_resampled)

    def _collect(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Keep this batch's training rows of every hook group (the SAE step's rows), up to ``n_samples``."""
        with torch.no_grad():
            if isinstance(batch, dict) and hasattr(pl_module, "groups") and set(batch) <= set(pl_module.groups):
                rows = batch  # online: the SAE step's rows per group
            elif hasattr(pl_module, "rows_from_batch") and not getattr(pl_module, "online", False):
                rows = pl_module.rows_from_batch(batch)
            else:
                rows = {"*": batch}
        take = self.n_samples - self._pool_rows
        for key, r in rows.items():
            self._pools.setdefault(key, []).append(r.detach()[:take])
        self._pool_rows += min(take, min(r.shape[0] for r in rows.values()))

    # ------------------------------------------------------------------ resampling
    def dead_mask(self, trainer: pl.Trainer, sae: Any) -> Tensor:
        """``[d_sae]`` bool: features dead on every rank (sum over ranks of "fired within the window" is 0)."""
        fired = (sae.steps_since_fired < self.dead_window(sae)).to(torch.float32)
        fired = trainer.strategy.reduce(fired.clone(), reduce_op="sum")
        return fired == 0

    @torch.no_grad()
    def resample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pool: Tensor | None) -> int:
        """Resample the dead features from ``pool`` (rank 0's rows; None on other ranks). Returns their number."""
        sae = pl_module.sae
        dead = self.dead_mask(trainer, sae).nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return 0
        directions = None
        if trainer.is_global_zero:
            split = getattr(pl_module, "split", lambda rows: (rows, None))
            directions = tuple(d.cpu() for d in self.directions(sae, *split(pool.to(sae.W_dec.device)), n_dead,
                                                                 trainer.global_step))  # fmt: skip
        dec_dirs, enc_dirs = trainer.strategy.broadcast(directions, src=0)
        self.apply(sae, dead, dec_dirs.to(sae.W_dec), enc_dirs.to(sae.W_dec), trainer.optimizers)
        return n_dead

    def row_losses(self, sae: Any, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row squared reconstruction error ``[n]`` and the normalised input / target rows.

        The SAE runs in eval mode, so this pass neither updates ``steps_since_fired`` nor BatchTopK's threshold.
        """
        was_training = sae.training
        sae.eval()
        losses, xs, ys = [], [], []
        try:
            for i in range(0, x.shape[0], self.chunk_size):
                xc = x[i : i + self.chunk_size].to(sae.W_dec.dtype)
                yc = xc if target is None else target[i : i + self.chunk_size].to(sae.W_dec.dtype)
                out = sae(xc, return_feats=False) if target is None else sae(xc, yc, return_feats=False)
                # Normalised space (the loss the SAE is trained on); layer_norm uses the input rows' statistics.
                x_n, stats = sae._normalize_input(xc)
                y_n = sae._normalize_target(yc, stats)
                losses.append((sae._normalize_target(out.recon, stats) - y_n).pow(2).sum(-1).float())
                xs.append(x_n)
                ys.append(y_n)
        finally:
            sae.train(was_training)
        return torch.cat(losses), torch.cat(xs), torch.cat(ys)

    def directions(self, sae: Any, x: Tensor, target: Tensor | None, n_dead: int, step: int) -> tuple[Tensor, Tensor]:
        """Unit decoder directions ``[n_dead, d_out]`` and encoder directions ``[n_dead, d_in]`` for the dead features.

        Rows are drawn with probability proportional to their squared loss (without replacement when the pool has
        enough rows with non-zero loss).
        """
        losses, x_n, y_n = self.row_losses(sae, x, target)
        weights = losses.double().pow(2)
        if not torch.isfinite(weights).all() or not (weights > 0).any():
            weights = torch.ones_like(weights)  # a perfect (or broken) reconstruction: draw uniformly
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        replacement = int((weights > 0).sum()) < n_dead
        picks = torch.multinomial(weights.cpu(), n_dead, replacement=replacement, generator=gen).to(x_n.device)
        dec = y_n[picks] - sae.b_dec
        b_in = sae._input_bias()
        if target is None and sae.d_in == sae.d_out:
            enc = dec  # an SAE: encoder and decoder get the same direction
        else:
            enc = x_n[picks] - (b_in if b_in is not None else 0)
        return _unit(dec), _unit(enc)

    def apply(self, sae: Any, dead: Tensor, dec_dirs: Tensor, enc_dirs: Tensor, optimizers: list[Any]) -> None:
        """Write the new rows of features ``dead`` (the architecture's ``resample_features``) and reset their Adam
        moments along each per-feature parameter's feature axis (the architecture's ``feature_parameters``)."""
        sae.resample_features(dead, dec_dirs, enc_dirs, self.scale)
        params = {
            id(getattr(sae, name)): axis
            for name, axis in sae.feature_parameters.items()
            if isinstance(getattr(sae, name, None), torch.nn.Parameter)
        }
        for optimizer in optimizers:
            for param, state in optimizer.state.items():
                axis = params.get(id(param))
                if axis is None:
                    continue
                index = (slice(None),) * axis + (dead,)
                for key in ADAM_MOMENTS:
                    if key in state and state[key].shape == param.shape:
                        state[key][index] = 0


def _names(pl_module: Any) -> list[str]:
    saes = getattr(pl_module, "saes", None)
    return list(saes) if saes is not None else ["sae"]


def _stepping(pl_module: Any, name: str) -> Any:
    import contextlib

    stepping = getattr(pl_module, "stepping", None)
    return stepping(name) if callable(stepping) and getattr(pl_module, "saes", None) is not None else (
        contextlib.nullcontext())  # fmt: skip


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
