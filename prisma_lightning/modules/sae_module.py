"""`SAEModule`: train one or many sparse autoencoders on a frozen backbone's activations (online) or on shards.

One run may hold many SAEs -- every layer, every hook type, a sweep of coefficients -- fed by one backbone pass per
image batch (see :mod:`~prisma_lightning.modules.sae_specs` for ``sae`` / ``hooks`` / ``sweep`` / ``saes``).
SAEs that read the same rows (same hook, output hook and token selection) form a *group*: one mixing buffer per
group, so the SAEs of a sweep see identical batches. Every SAE has its own parameter group in one fused Adam
(its own learning rate, schedule and moments), its own warm-ups, initialisation, firing statistics and resampling.
The single-SAE run is the one-element case, with the names and folders of earlier versions (``<run>/sae``,
``train/loss``).

Online mode: Lightning iterates an :class:`~prisma_lightning.modules.activation_stream.ActivationStream`, which
runs the backbone up to the deepest requested hook (``stop_at_layer``), caches only the requested hooks, fills the
buffers and yields one SAE step per Lightning batch -- so ``max_steps``, ``every_n_train_steps`` checkpoints, the
progress bar and the logs count SAE steps. Cached mode: each batch is rows (``[n, d]``, or ``{hook: rows}`` from
several hooks' shards in lockstep). Validation batches are images (online) or rows (cached).

Subclass and override ``select_tokens``, ``compute_loss`` or ``configure_optimizers`` to change one piece:

* ``select_tokens(acts)`` turns a hook's ``[B, T, d]`` activations into ``[N, d]`` rows for the group being filled
  (``self.tokens`` and ``self.hook_name`` name it). To be spliced back for evaluation the rows must be a subset of
  token positions, the same for every image, image-major (``acts[:, positions].reshape(-1, d)``); the module
  checks that at setup and otherwise evaluates without splicing (reconstruction metrics only), saying why.
* ``compute_loss(x, target)`` is the SAE forward with its losses for the SAE being stepped (``self.sae`` is that
  SAE, ``self.sae_name`` its name); return ``out._replace(loss=...)`` to add a penalty.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from prisma_lightning.activations import MixingBuffer, Tokens, select_tokens, tokens_per_image
from prisma_lightning.modules.activation_stream import ActivationStream, steps_per_image_epoch
from prisma_lightning.modules.sae_specs import TRAINING_FIELDS, SAESpec, expand_specs
from prisma_lightning.sae import SAEOutput, SparseAutoencoder, config_union, transcoder_config_union
from prisma_lightning.utils import run_dir

log = logging.getLogger(__name__)

LRDecay = Literal["none", "cosine", "linear"]
SAEConfigs = config_union()
"""Any registered architecture's config (jsonargparse picks the class from ``architecture``)."""
TranscoderConfigs = transcoder_config_union()


def apply_backbone_transforms(datamodule: Any, backbone: nn.Module) -> None:
    """Give a data module that accepts them the backbone's eval preprocessing (resize, crop, mean/std)."""
    if datamodule is not None and getattr(datamodule, "accepts_backbone_transforms", False):
        transform = backbone.preprocess(train=False)
        datamodule.use_transforms(transform, transform)


@dataclass
class Group:
    """The SAEs that read the same rows: same input hook, output hook (transcoders) and token selection."""

    key: str
    hook_in: str
    hook_out: str | None
    tokens: str
    width_in: int
    width_out: int
    names: list[str] = field(default_factory=list)
    buffer: Any = None
    draining: bool = False
    tokens_seen: int = 0
    pending: Any = None
    """Rows of the last image batch that did not fit into the buffer yet (checkpointed with it)."""
    dropped_rows: int = 0
    positions: Any = None
    """Token positions the rows come from (``slice`` / list), or None when ``select_tokens`` is not a subset."""

    @property
    def width(self) -> int:
        return self.width_in + (self.width_out if self.hook_out else 0)


class SAEModule(pl.LightningModule):
    """Train sparse autoencoders (one or many) on a frozen backbone's activations or on cached shards.

    Args:
        sae: the SAE config (with ``saes`` / ``hooks`` / ``sweep``: the template every SAE starts from); or the
            folder / Hugging Face repo of a trained SAE (evaluation, fine-tuning; a folder of SAE folders loads
            them all); or an SAE object in code.
        saes: explicit SAEs, each a mapping of config fields over ``sae`` plus optional ``name``, per-SAE training
            options (``lr``, ``betas``, ``lr_warmup_steps``, ``lr_decay``, ``lr_decay_steps``, ``min_lr_ratio``,
            ``max_grad_norm``) or ``path`` (a trained SAE folder).
        hooks: hook-name patterns, one SAE per hook: ``blocks.{0..11}.hook_resid_post``.
        sweep: ``{field: [values]}``; every combination becomes an SAE (config fields or training options).
        hook_overrides: ``{hook: {field: value}}`` set for every SAE on that hook (e.g. one layer's coefficient).
        backbone: registry name (or folder, or HookedViT object) of the frozen model; None for cached activations.
        pretrained_backbone: load the backbone's pretrained weights (False: random weights, offline).
        hook_name: sets ``hook_name`` of every new SAE (a trained SAE must match it).
        tokens: sets ``tokens`` of every new SAE (``all``, ``cls``, ``patches``; a trained SAE must match it).
        lr: peak Adam learning rate (per-SAE ``lr`` overrides it).
        betas: Adam betas.
        lr_warmup_steps: linear warm-up from 0 over this many SAE steps.
        lr_decay: ``none``, ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr`` after warm-up.
        lr_decay_steps: length of the decay; defaults to the trainer's ``max_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``, in [0, 1].
        l1_warmup_steps: sets the sparsity-coefficient warm-up of every new SAE.
        buffer_tokens: mixing-buffer capacity per hook group, in tokens (online mode); 0 disables mixing.
        batch_tokens: SAE batch size in tokens per process (online mode; cached mode uses the data module's batches).
        init_tokens: tokens (of all DDP processes together) used to fit the activation normalisation and initialise
            ``b_dec``: the first rows of the training data (both modes).
        max_grad_norm: clip each SAE's gradient norm (None: no clipping).
        checkpoint_buffer: store the buffers' contents in checkpoints so a resumed run continues exactly.
        export_dir: folder the trained SAEs are exported to at the end of fit (one SAE: the SAE folder; several:
            ``<export_dir>/<name>``). Default: ``<run>/sae`` or ``<run>/saes/<name>``, ``<run>`` being the run's log
            folder whatever the logger. An input folder (a trained SAE being fine-tuned) is never written to.
        export_on_checkpoint: also export the SAEs beside every checkpoint (``<checkpoint dir>/sae(s)``).
        backbone_transforms: give image / video data modules the backbone's own ``preprocess()`` (online mode).
        memory_budget_gb: fail at setup when buffers + SAEs + optimizer state exceed this (default: the device's
            free memory; 0 disables the check).
    """

    def __init__(
        self,
        sae: SAEConfigs | str | SparseAutoencoder | None = None,
        saes: list[dict[str, Any]] | None = None,
        hooks: str | list[str] | None = None,
        sweep: dict[str, list[Any]] | None = None,
        hook_overrides: dict[str, dict[str, Any]] | None = None,
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
        export_on_checkpoint: bool = True,
        backbone_transforms: bool = True,
        memory_budget_gb: float | None = None,
    ) -> None:
        super().__init__()
        self.check_arguments(lr, lr_warmup_steps, lr_decay, min_lr_ratio, buffer_tokens, batch_tokens, init_tokens,
                             max_grad_norm)  # fmt: skip
        self.save_hyperparameters(ignore=["sae", "saes", "backbone", "export_dir"])
        self._hook_overrides = hook_overrides
        specs, self.single = self.expand(sae, saes, hooks, sweep, hook_name, tokens, l1_warmup_steps)
        self.specs: dict[str, SAESpec] = {s.name: s for s in specs}
        self.saes = nn.ModuleDict({s.name: self.build_sae(s) for s in specs})
        for spec in specs:  # a loaded SAE trains on in its training form (an expected_norm factor unfolded)
            self.saes[spec.name].unfold_activation_norm()
        self._store_sae_hparams(sae, saes, specs, backbone)
        self.lr, self.betas = lr, tuple(betas)
        self.lr_warmup_steps, self.lr_decay = lr_warmup_steps, lr_decay
        self.lr_decay_steps, self.min_lr_ratio = lr_decay_steps, min_lr_ratio
        self.buffer_tokens, self.batch_tokens, self.init_tokens = buffer_tokens, batch_tokens, init_tokens
        self.max_grad_norm, self.checkpoint_buffer, self.export_dir = max_grad_norm, checkpoint_buffer, export_dir
        self.export_on_checkpoint, self.memory_budget_gb = export_on_checkpoint, memory_budget_gb
        self.pretrained_backbone, self.backbone_transforms = pretrained_backbone, backbone_transforms
        self._backbone_spec = backbone
        self._backbone: nn.Module | None = None  # kept out of the module tree: frozen, never checkpointed
        self.groups: dict[str, Group] = {}
        self._current: str | None = None
        self._current_group: Group | None = None
        self._exported_step: int | None = None
        self._stream: ActivationStream | None = None
        self._buffer_states: dict[str, Any] | None = None
        self.register_buffer("initialized", torch.tensor(all(s.config is None for s in specs)))
        self.automatic_optimization = False

    # ------------------------------------------------------------------ construction (overridable)
    @staticmethod
    def check_arguments(
        lr: float, lr_warmup_steps: int, lr_decay: str, min_lr_ratio: float, buffer_tokens: int, batch_tokens: int,
        init_tokens: int, max_grad_norm: float | None,
    ) -> None:  # fmt: skip
        """``ValueError`` naming the value and the fix for every out-of-range training option."""
        finite = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not finite(lr) or lr <= 0:
            raise ValueError(f"lr={lr!r} must be a positive finite number; a typical SAE learning rate is 4e-4.")
        if not finite(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1] (the final fraction of lr).")
        if lr_decay not in ("none", "cosine", "linear"):
            raise ValueError(f"lr_decay must be 'none', 'cosine' or 'linear', got {lr_decay!r}.")
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0.")
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
        if max_grad_norm is not None and (not finite(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a positive number or null.")

    def expand(
        self, sae: Any, saes: Any, hooks: Any, sweep: Any, hook_name: Any, tokens: Any, l1_warmup_steps: Any
    ) -> tuple[list[SAESpec], bool]:
        """The SAEs of this run (see :mod:`~prisma_lightning.modules.sae_specs`)."""
        if isinstance(sae, dict) and "architecture" in sae or isinstance(sae, dict) and not saes:
            sae = dict(sae)
        overrides = {"hook_name": hook_name, "tokens": tokens, "l1_warmup_steps": l1_warmup_steps}
        return expand_specs(sae, saes, hooks, sweep, overrides, transcoder=self.transcoders,
                            hook_overrides=getattr(self, "_hook_overrides", None))  # fmt: skip

    transcoders = False
    """Whether this module trains transcoders (``TranscoderModule``)."""

    def build_sae(self, spec: SAESpec) -> SparseAutoencoder:
        """The SAE of one spec: the object given, the loaded trained SAE, or a new one from its config."""
        if spec.sae is not None:
            return spec.sae
        return SparseAutoencoder(spec.config)

    def _store_sae_hparams(self, sae: Any, saes: Any, specs: list[SAESpec], backbone: Any) -> None:
        """Plain types only (checkpoints load with ``weights_only=True``); trained sources become their configs."""
        if any(s.config is None for s in specs):
            entries = [{"name": s.name, **self.saes[s.name].cfg.to_dict(), **s.training} for s in specs]
            self.hparams["sae"] = entries[0] if self.single else None
            if self.single:
                self.hparams["sae"].pop("name")
            self.hparams["saes"] = None if self.single else entries
            self.hparams["hooks"] = self.hparams["sweep"] = None
        else:
            self.hparams["sae"] = sae.to_dict() if hasattr(sae, "to_dict") else sae
            self.hparams["saes"] = saes
        self.hparams["backbone"] = backbone if isinstance(backbone, str) else None
        if any(s.config is None for s in specs):
            self.hparams["hook_overrides"] = None

    # ------------------------------------------------------------------ the SAEs
    @property
    def sae(self) -> SparseAutoencoder:
        """The SAE being stepped (inside ``compute_loss`` and the per-SAE hooks), or the run's only SAE."""
        if self._current is not None:
            return self.saes[self._current]
        if len(self.saes) == 1:
            return next(iter(self.saes.values()))
        raise AttributeError(
            f"This run trains {len(self.saes)} SAEs; use `self.saes[name]` (names: {list(self.saes)}), or "
            "`self.sae` inside compute_loss, where it is the SAE being stepped."
        )

    @property
    def sae_name(self) -> str:
        """Name of the SAE being stepped (or of the only SAE)."""
        return self._current if self._current is not None else next(iter(self.saes))

    def items(self) -> Iterator[tuple[str, SparseAutoencoder]]:
        """``(name, sae)`` of every SAE, in order."""
        return iter(self.saes.items())

    @contextlib.contextmanager
    def stepping(self, name: str) -> Iterator[SparseAutoencoder]:
        """Within the block, ``self.sae`` is SAE ``name`` and ``self.hook_name`` / ``self.tokens`` its group's."""
        previous, previous_group = self._current, self._current_group
        self._current = name
        self._current_group = self.group_of(name) if self.groups else previous_group
        try:
            yield self.saes[name]
        finally:
            self._current, self._current_group = previous, previous_group

    @property
    def hook_name(self) -> str:
        """Hook of the group being processed (or of the only SAE)."""
        if self._current_group is not None:
            return self._current_group.hook_in
        return self.sae.cfg.hook_name

    @property
    def hook_name_out(self) -> str | None:
        if self._current_group is not None:
            return self._current_group.hook_out
        return self.sae.cfg.hook_name_out if self.transcoders else None

    @property
    def tokens(self) -> str:
        """Token selection of the group being processed (or of the only SAE)."""
        if self._current_group is not None:
            return self._current_group.tokens
        return self.sae.cfg.tokens

    @property
    def tokens_seen(self) -> int | dict[str, int]:
        """Training rows seen (over all ranks): an int for one SAE, ``{name: rows}`` for several."""
        counts = {name: self.group_of(name).tokens_seen if self.groups else 0 for name in self.saes}
        return next(iter(counts.values())) if self.single else counts

    @property
    def buffer(self) -> Any:
        """The mixing buffer of the only hook group (single-SAE runs)."""
        if len(self.groups) != 1:
            raise AttributeError(f"This run has {len(self.groups)} hook groups; see `self.groups[key].buffer`.")
        return next(iter(self.groups.values())).buffer

    def group_of(self, name: str) -> Group:
        for group in self.groups.values():
            if name in group.names:
                return group
        raise KeyError(name)

    def build_groups(self) -> dict[str, Group]:
        """Group the SAEs by (input hook, output hook, tokens); widths from the SAEs."""
        groups: dict[str, Group] = {}
        for name, sae in self.saes.items():
            cfg = sae.cfg
            hook_out = cfg.hook_name_out if sae.is_transcoder else None
            key = f"{cfg.hook_name}" + (f"->{hook_out}" if hook_out else "") + f":{cfg.tokens}"
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(key, cfg.hook_name, hook_out, cfg.tokens, sae.d_in, sae.d_out)
            elif (group.width_in, group.width_out) != (sae.d_in, sae.d_out):
                raise ValueError(
                    f"SAEs {group.names[0]!r} and {name!r} read {key} but expect different widths "
                    f"({group.width_in} vs {sae.d_in}); fix d_in of one of them."
                )
            group.names.append(name)
        return groups

    # ------------------------------------------------------------------ backbone
    @property
    def backbone(self) -> nn.Module | None:
        """The frozen backbone (online mode), built on first use and moved to this module's device."""
        if self._backbone is None and self._backbone_spec is not None:
            spec = self._backbone_spec
            if isinstance(spec, str):
                from prisma_lightning.backbones import load_hooked_model

                spec = load_hooked_model(spec, pretrained=self.pretrained_backbone)
            from prisma_lightning.backbones.protocol import HookedBackbone

            if not isinstance(spec, HookedBackbone):
                raise TypeError(
                    f"The backbone must provide the HookedBackbone interface (prisma_lightning.backbones.protocol), "
                    f"got a {type(spec).__name__}; convert it with prisma_lightning.convert_model or pass a registry "
                    "name."
                )
            spec.eval().requires_grad_(False)
            object.__setattr__(self, "_backbone", spec)  # not a submodule: no optimizer, no checkpoint
        if self._backbone is not None and next(self._backbone.parameters()).device != self.device:
            self._backbone.to(self.device)
        return self._backbone

    @property
    def online(self) -> bool:
        return self._backbone_spec is not None

    def hook_names(self) -> list[str]:
        """Every hook the backbone pass must cache."""
        names: list[str] = []
        for group in self.groups.values() or self.build_groups().values():
            for hook in (group.hook_in, group.hook_out):
                if hook and hook not in names:
                    names.append(hook)
        return names

    def check_hooks(self) -> None:
        """Fail early, naming the SAE and both widths, when a hook does not exist or ``d_in`` does not match it."""
        model = self.backbone
        for group in self.groups.values():
            for hook, width in ((group.hook_in, group.width_in), (group.hook_out, group.width_out)):
                if not hook:
                    continue
                try:
                    actual = model.hook_width(hook)  # KeyError listing close names for unknown hooks
                except KeyError as err:
                    raise KeyError(f"SAE {group.names[0]!r}: {err.args[0] if err.args else err}") from None
                if actual != width:
                    raise ValueError(
                        f"SAE {group.names[0]!r} expects width {width} at hook {hook!r}, but the backbone "
                        f"{model.cfg.model_name!r} has width {actual} there; set d_in={actual} or pick another hook."
                    )

    def check_hook(self) -> None:  # the single-SAE name of earlier versions
        self.groups = self.groups or self.build_groups()
        self.check_hooks()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        self.groups = self.build_groups()
        if self.online:
            self.check_hooks()
            self.check_token_selection()
            if self.backbone_transforms:
                apply_backbone_transforms(self.trainer.datamodule if self._trainer is not None else None, self.backbone)
        if stage == "fit":
            self.check_export_folders()
            self.check_memory()
            self.report_groups()

    def check_token_selection(self) -> None:
        """Find which token positions ``select_tokens`` keeps (for splicing SAEs back into the model).

        Runs it on an activation whose entries encode (image, position); a selection that is a subset of
        positions, the same for every image, image-major, is recorded as the group's ``positions``.
        """
        model = self.backbone
        n_tokens = model.cfg.n_tokens
        for group in self.groups.values():
            group.positions = None
            d = max(4, group.width_in)
            acts = torch.randn(3, n_tokens, d, generator=torch.Generator().manual_seed(0))
            acts[:, :, 0] = torch.arange(n_tokens, dtype=torch.float32)
            acts[:, :, 1] = torch.arange(3, dtype=torch.float32)[:, None]
            self._current_group = group
            try:
                rows = self.select_tokens(acts)
            except Exception as err:  # noqa: BLE001 (an override that cannot run on a probe: no splicing)
                log.warning("select_tokens failed on a probe activation (%s); evaluation will not splice.", err)
                continue
            finally:
                self._current_group = None
            if rows.ndim != 2 or rows.shape[0] % 3:
                continue
            per_image = rows.view(3, -1, rows.shape[-1])
            positions = per_image[0, :, 0]
            same = all(torch.equal(per_image[b, :, 0], positions) for b in range(3))
            images_ok = torch.equal(per_image[:, :, 1], torch.arange(3.0)[:, None].expand_as(per_image[:, :, 1]))
            kept = [int(p) for p in positions.tolist()] if torch.equal(positions, positions.round()) else None
            if kept is not None and not all(0 <= p < n_tokens for p in kept):
                kept = None
            # the rows must be those positions' activations, every channel (not e.g. a mean that lands on one)
            if same and images_ok and kept is not None and torch.equal(rows, acts[:, kept].reshape(-1, d)):
                group.positions = kept
            else:
                log.warning(
                    "select_tokens of group %s does not return a subset of token positions (the same for every image, "
                    "image-major); evaluation reports reconstruction metrics only (no splicing into the model).",
                    group.key,
                )

    def check_export_folders(self) -> None:
        """Fail at setup (not after training) when an export folder cannot be written or is an input folder."""
        sources = {Path(s.source).resolve() for s in self.specs.values() if s.source and Path(s.source).exists()}
        for name in self.saes:
            folder = self.export_folder(name)
            resolved = folder.resolve()
            if resolved in sources or any(resolved == p or p in resolved.parents for p in sources):
                raise ValueError(
                    f"The export folder of SAE {name!r} ({folder}) is the trained SAE it was loaded from; outputs "
                    "never overwrite an input folder: set export_dir to another folder."
                )
            if self._trainer is None or self.trainer.is_global_zero:
                _check_writable(folder)

    def check_memory(self) -> None:
        """Fail at setup with the numbers when buffers + SAEs + optimizer state do not fit the memory budget."""
        need = self.memory_needed()
        total = sum(need.values())
        budget = self.memory_budget_gb
        if budget == 0:
            return
        if budget is None:
            budget_bytes = _free_memory(self.device)
            if budget_bytes is None:
                return
        else:
            budget_bytes = budget * 2**30
        if total > budget_bytes:
            lines = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in need.items())
            raise MemoryError(
                f"This run needs about {total / 2**30:.2f} GiB ({lines}) but only {budget_bytes / 2**30:.2f} GiB "
                f"{'are free on ' + str(self.device) if budget is None else 'are allowed (memory_budget_gb)'}; lower "
                "buffer_tokens, train fewer or narrower SAEs per run, or raise memory_budget_gb."
            )

    def memory_needed(self) -> dict[str, int]:
        """Bytes the run holds: mixing buffers, SAE parameters with gradients and Adam moments, one step's features."""
        buffers = 0
        if self.online and self.buffer_tokens:
            buffers = sum(self.buffer_tokens * g.width * 4 for g in self.groups.values())
        params = sum(p.numel() * p.element_size() for p in self.saes.parameters())
        widest = max((s.d_sae for s in self.saes.values()), default=0)
        step = 3 * self.batch_tokens * widest * 4
        return {"buffers": buffers, "SAEs + gradients + Adam": 4 * params, "one step's activations": step}

    def report_groups(self) -> None:
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        need = self.memory_needed()
        if len(self.saes) > 1 or self.online:
            log.info(
                "Training %d SAE(s) on %d hook group(s); buffers %.1f MiB in all (%s tokens per group), SAE state "
                "%.1f MiB.", len(self.saes), len(self.groups), need["buffers"] / 2**20, f"{self.buffer_tokens:,}",
                need["SAEs + gradients + Adam"] / 2**20,
            )  # fmt: skip
        if self.online:
            rates = {g.key: self._rows_per_image(g) for g in self.groups.values()}
            if len(set(rates.values())) > 1:
                log.warning(
                    "Hook groups give different numbers of rows per image (%s): SAEs step together, so the groups "
                    "with more rows keep a random subsample of them.", rates,
                )  # fmt: skip

    def _rows_per_image(self, group: Group) -> int:
        cfg = self.backbone.cfg
        if group.positions is not None:
            return len(group.positions)
        return tokens_per_image(cfg.n_tokens, group.tokens, cfg.n_prefix_tokens)  # type: ignore[arg-type]

    def on_fit_start(self) -> None:
        if self._world() > 1 and torch.distributed.is_initialized():
            for sae in self.saes.values():
                sae.set_process_group(torch.distributed.group.WORLD)
        if self.online:
            self._install_stream()
        if not bool(self.initialized):
            self.initialize_from_data()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def initialize_from_data(self) -> None:
        """Fit each SAE's normalisation, ``b_dec`` and data-driven state on the first ``init_tokens`` rows of
        the training data of its group (all ranks' rows under DDP, as one process would see them)."""
        samples = self.init_samples()
        for name in self.saes:
            group = self.group_of(name)
            if self.specs[name].config is None:
                continue  # a trained SAE keeps what it learned
            rows = self._gather(samples[group.key][: -(-self.init_tokens // self._world())])
            with self.stepping(name):
                self.initialize_sae(rows)
        self.initialized.fill_(True)

    def initialize_sae(self, rows: Tensor) -> None:
        """Initialise the SAE being stepped from a sample of its group's rows (override to change the recipe)."""
        x, target = self.split(rows)
        self.sae.initialize_from_data(x, target)

    def init_samples(self) -> dict[str, Tensor]:
        """The first ``init_tokens / world_size`` rows per group of this rank's training data (a fresh pass); the
        ranks' samples are gathered afterwards, in the order of one process's batches."""
        loader = self._train_source()
        per_rank = -(-self.init_tokens // self._world())
        need = {key: per_rank for key in self.groups}
        parts: dict[str, list[Tensor]] = {key: [] for key in self.groups}
        for batch in loader:
            rows = self.rows_from_images(batch) if self.online else self.rows_from_batch(batch)
            for key, r in rows.items():
                if need[key] > 0:
                    parts[key].append(r[: need[key]].detach().clone())
                    need[key] -= parts[key][-1].shape[0]
            if all(n <= 0 for n in need.values()):
                break
        empty = [k for k, p in parts.items() if not p]
        if empty:
            raise ValueError(f"The training data gave no rows for {empty}; check the data module.")
        return {k: torch.cat(p) for k, p in parts.items()}

    def _train_source(self) -> Any:
        """A fresh training loader of the data (not the one Lightning iterates)."""
        if self._stream_source is not None:
            return self._stream_source()
        return self.trainer.fit_loop._data_source.dataloader()

    _stream_source: Any = None

    # ------------------------------------------------------------------ online data: the activation stream
    def _install_stream(self) -> None:
        """Make Lightning iterate SAE steps (an ActivationStream over the image loader) instead of image batches."""
        from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource

        fit_loop = self.trainer.fit_loop
        source = fit_loop._data_source
        if isinstance(source.instance, ActivationStream):
            return
        original = _DataLoaderSource(source.instance, source.name)

        def make_loader() -> Any:
            from lightning.pytorch.trainer.states import RunningStage

            loader = original.dataloader()
            prepare = getattr(self.trainer._data_connector, "_prepare_dataloader", None)
            if prepare is not None and isinstance(loader, torch.utils.data.DataLoader):
                loader = prepare(loader, shuffle=True, mode=RunningStage.TRAINING)
            return loader

        self._stream_source = make_loader
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0:
            length = max_steps
        else:
            rates = [self._rows_per_image(g) for g in self.groups.values()]
            length = steps_per_image_epoch(make_loader(), min(rates), self.batch_tokens)
        self._stream = ActivationStream(self, make_loader, length)
        fit_loop._data_source = _DataLoaderSource(self._stream, "train_dataloader")

    @torch.no_grad()
    def rows_from_images(self, batch: Any) -> dict[str, Tensor]:
        """One backbone pass over an image batch: ``{group: rows}`` (transcoder groups: input and target rows
        side by side), via ``select_tokens``."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        model = self.backbone
        names = self.hook_names()
        _, cache = model.run_with_cache(
            images.to(self.device), names_filter=names, stop_at_layer=model.stop_layer_for_all(names)
        )
        return self.rows_from_cache(cache)

    def rows_from_cache(self, cache: Any, check_finite: bool = True) -> dict[str, Tensor]:
        """Each hook group's ``select_tokens`` rows (``[N, d_in]``, or ``[N, d_in + d_out]`` for a transcoder's
        input and target side by side) from a backbone cache; the evaluator reads its rows the same way."""
        out: dict[str, Tensor] = {}
        for key, group in self.groups.items():
            self._current_group = group
            try:
                rows = self.select_tokens(cache[group.hook_in])
                if group.hook_out:
                    rows = torch.cat([rows, self.select_tokens(cache[group.hook_out])], dim=-1)
            finally:
                self._current_group = None
            if check_finite:
                self._check_finite(rows, group)
            out[key] = rows
        return out

    def rows_from_batch(self, batch: Any) -> dict[str, Tensor]:
        """Cached mode: rows of each group from a data-module batch (``[n, d]``, ``{hook: [n, d]}``, or
        ``(x, y)`` for transcoders)."""
        out: dict[str, Tensor] = {}
        for key, group in self.groups.items():
            if isinstance(batch, dict):
                missing = [h for h in (group.hook_in, group.hook_out) if h and h not in batch]
                if missing:
                    raise KeyError(
                        f"The activation batches hold hooks {sorted(batch)}, not {missing} (SAE "
                        f"{group.names[0]!r}); cache them with `prisma predict` and list them in the data module."
                    )
                rows = batch[group.hook_in]
                if group.hook_out:
                    rows = torch.cat([rows, batch[group.hook_out]], dim=-1)
            elif isinstance(batch, list | tuple):
                rows = torch.cat(list(batch[:2]), dim=-1) if group.hook_out else batch[0]
            else:
                rows = batch
            if len(self.groups) > 1 and not isinstance(batch, dict):
                raise ValueError(
                    f"{len(self.groups)} hook groups need activations of several hooks: give the activation data "
                    "module `hooks` so each batch holds one tensor per hook."
                )
            if rows.shape[-1] != group.width:
                raise ValueError(
                    f"SAE {group.names[0]!r} expects rows of width {group.width}, but the activation batches have "
                    f"width {rows.shape[-1]}; check d_in and the shard folder."
                )
            self._check_finite(rows, group)
            out[key] = rows
        return out

    def fill(self, batch: Any) -> None:
        """Online: one backbone pass over an image batch; its rows wait in each group's ``pending`` rows."""
        for key, rows in self.rows_from_images(batch).items():
            group = self.groups[key]
            group.pending = rows if group.pending is None else torch.cat([group.pending, rows])

    def absorb(self) -> None:
        """Move pending rows into the buffers as far as they fit (a full buffer starts draining)."""
        for group in self.groups.values():
            if group.pending is None:
                continue
            if group.buffer is None:
                group.buffer = self._new_buffer(group)
            if not self.buffer_tokens:
                group.buffer.append(group.pending)
                group.pending = None
                continue
            taken = group.buffer.add(group.pending)
            group.pending = group.pending[taken:] if taken < group.pending.shape[0] else None
            if group.buffer.full:
                group.draining = True

    def drop_blocked(self) -> None:
        """Drop the pending rows of full buffers waiting for other groups (groups with more rows per image are
        subsampled so that all SAEs step together)."""
        for group in self.groups.values():
            if group.pending is not None:
                group.dropped_rows += int(group.pending.shape[0])
                group.pending = None

    def _new_buffer(self, group: Group) -> Any:
        if not self.buffer_tokens:
            return _Carry(self.batch_tokens)
        # The same seed for the same group whatever else the run trains: an SAE of a multi-SAE run sees exactly the
        # batches it would see alone.
        seed = self.saes[group.names[0]].cfg.seed * 1_000_003 + sum(map(ord, group.key))
        dtype = next(self.saes[group.names[0]].parameters()).dtype
        return MixingBuffer(self.buffer_tokens, group.width, dtype=dtype, device=self.device, seed=seed)

    def ready(self) -> bool:
        """Whether every group can give one SAE batch (a buffer is filled, then drained to half: mixing)."""
        for group in self.groups.values():
            buf = group.buffer
            if buf is None or buf.size < self.batch_tokens:
                return False
            if not self.buffer_tokens:
                continue
            if not group.draining:
                return False
            if buf.size <= buf.capacity // 2:
                group.draining = False
                return False
        return True

    def pop_step(self) -> dict[str, Tensor]:
        """One SAE step's rows from every group's buffer."""
        out = {}
        for key, group in self.groups.items():
            out[key] = group.buffer.pop(self.batch_tokens)
            if self.buffer_tokens and group.buffer.size <= group.buffer.capacity // 2:
                group.draining = False
        return out

    # ------------------------------------------------------------------ data -> rows (overridable)
    def select_tokens(self, acts: Tensor) -> Tensor:
        """``[B, T, d]`` hook activations -> ``[N, d]`` rows of the group being filled (``self.tokens``)."""
        model = self.backbone
        return select_tokens(acts, self.tokens, model.cfg.n_prefix_tokens, has_cls=model.cfg.class_token)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows -> (SAE input, target or None) for the SAE being stepped (transcoders: input | target)."""
        sae = self.sae
        if sae.is_transcoder:
            return rows[:, : sae.d_in], rows[:, sae.d_in :]
        return rows, None

    def activations(self, batch: Any) -> Tensor:
        """Rows of the only group (single-SAE compatibility): from images (online) or the batch (cached)."""
        rows = self.rows_from_images(batch) if self.online else self.rows_from_batch(batch)
        return next(iter(rows.values()))

    def _check_finite(self, rows: Tensor, group: Group) -> None:
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).sum())
            raise ValueError(
                f"{bad} non-finite activations (NaN/inf) at hook {group.hook_in!r}, step {self.global_step}; check "
                "the backbone's inputs and dtype (float16 overflow?) or the cached shards."
            )

    # ------------------------------------------------------------------ optimisation
    def training_option(self, name: str, option: str) -> Any:
        """SAE ``name``'s value of a training option (its own, or the module's)."""
        value = self.specs[name].training.get(option)
        return getattr(self, option) if value is None else value

    def configure_optimizers(self) -> dict[str, Any]:
        """One fused Adam with one parameter group per SAE (its lr and betas), one scheduler lambda per SAE."""
        groups = [
            {"params": list(sae.parameters()), "lr": self.training_option(n, "lr"),
             "betas": tuple(self.training_option(n, "betas")), "sae": n}
            for n, sae in self.saes.items()
        ]  # fmt: skip
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        optimizer = torch.optim.Adam(groups, fused=fused)
        lambdas = [self._lr_lambda_for(n) for n in self.saes]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_lambda_for(self, name: str) -> Any:
        return lambda step: self.lr_lambda(step, name)

    def lr_lambda(self, step: int, name: str | None = None) -> float:
        """Learning-rate multiplier at SAE step ``step``: linear warm-up, then constant / cosine / linear decay."""
        opt = (lambda o: self.training_option(name, o)) if name is not None else (lambda o: getattr(self, o))
        warmup, decay = opt("lr_warmup_steps"), opt("lr_decay")
        if warmup and step < warmup:
            return (step + 1) / warmup
        if decay == "none":
            return 1.0
        total = opt("lr_decay_steps") or (self.trainer.max_steps if self._trainer is not None else -1)
        if total is None or total <= 0:
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        low = opt("min_lr_ratio")
        return low + (1 - low) * shape

    # ------------------------------------------------------------------ training
    def compute_loss(self, x: Tensor, target: Tensor | None) -> SAEOutput:
        """The SAE forward with its losses for ``self.sae`` (override to add a penalty: ``out._replace(loss=...)``)."""
        sae = self.sae
        if target is not None:
            return sae(x, target, step=self.global_step, return_feats=False)
        return sae(x, step=self.global_step, return_feats=False)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        rows = batch if self.online else self.rows_from_batch(batch)
        if not bool(self.initialized):
            raise RuntimeError("The SAEs were not initialised from data (on_fit_start did not run).")
        self.sae_step(rows)

    def sae_step(self, rows: dict[str, Tensor]) -> dict[str, SAEOutput]:
        """One optimisation step of every SAE on its group's rows: forward and backward per SAE (one graph at a
        time), decoder processing, one fused Adam step, the scheduler, statistics and logs."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        outputs: dict[str, SAEOutput] = {}
        batches: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name in self.saes:
            group = self.group_of(name)
            with self.stepping(name):
                x, target = self.split(rows[group.key])
                out = self.compute_loss(x, target)
                if not bool(torch.isfinite(out.loss)):
                    self._diverged(name, out)
                self._backward(out.loss)
                outputs[name], batches[name] = _detached(out), (x, target)
        self._sync_gradients()
        for name, sae in self.saes.items():
            sae.before_optimizer_step()
            clip = self.training_option(name, "max_grad_norm")
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
        optimizer.step()
        for sae in self.saes.values():
            sae.after_optimizer_step()
        self._sync_sae_state()
        scheduler.step()
        for group in self.groups.values():
            group.tokens_seen += int(rows[group.key].shape[0]) * self._world()
        self.log_step(outputs, batches)
        return outputs

    def _diverged(self, name: str, out: SAEOutput) -> None:
        lr = self.optimizers().param_groups[list(self.saes).index(name)]["lr"]
        parts = {k: float(getattr(out, k)) for k in ("mse_loss", "sparsity_loss", "aux_loss", "prefix_loss")}
        raise FloatingPointError(
            f"SAE {name!r} diverged at step {self.global_step}: its loss is {float(out.loss)} ({parts}) at learning "
            f"rate {lr:.3g}. Training stopped; the last checkpoint and export were kept. Lower lr (or use "
            "max_grad_norm / lr_warmup_steps) and resume from the last good checkpoint."
        )

    def _backward(self, loss: Tensor) -> None:
        """Backward of one SAE's loss; under DDP the gradient all-reduce is done once for all SAEs afterwards."""
        ddp = self._ddp_model()
        if ddp is None:
            self.manual_backward(loss)
            return
        previous = ddp.require_backward_grad_sync
        ddp.require_backward_grad_sync = False  # each SAE's backward touches only its own parameters
        try:
            self.manual_backward(loss)
        finally:
            ddp.require_backward_grad_sync = previous

    def _ddp_model(self) -> Any:
        if self._trainer is None:
            return None
        model = getattr(self.trainer.strategy, "model", None)
        return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None

    @torch.no_grad()
    def _sync_gradients(self) -> None:
        """Average every SAE gradient over the DDP ranks (one flat all-reduce per dtype)."""
        if self._world() == 1 or not torch.distributed.is_initialized():
            return
        grads = [p.grad for p in self.saes.parameters() if p.grad is not None]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            torch.distributed.all_reduce(flat)
            flat.div_(self._world())
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    # ------------------------------------------------------------------ DDP
    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _gather(self, rows: Tensor) -> Tensor:
        """Rows of every rank (the same initialisation sample everywhere, as in a one-process run)."""
        if self._world() == 1 or not torch.distributed.is_initialized():
            return rows
        return self.all_gather(rows).reshape(-1, rows.shape[-1])

    @torch.no_grad()
    def _sync_sae_state(self) -> None:
        """Make each SAE's training statistics global (a feature fired if it fired on any rank, ...)."""
        if self._world() == 1 or not torch.distributed.is_initialized():
            return
        for sae in self.saes.values():
            sae.sync_statistics(self._world())

    def log_name(self, name: str, metric: str, stage: str = "train") -> str:
        """``train/l0`` for a single SAE, ``train/<name>/l0`` in a multi-SAE run."""
        return f"{stage}/{metric}" if self.single else f"{stage}/{name}/{metric}"

    def log_step(self, outputs: dict[str, SAEOutput], batches: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        metrics: dict[str, Tensor] = {}
        param_groups = self.optimizers().param_groups
        for i, (name, out) in enumerate(outputs.items()):
            sae = self.saes[name]
            x, target = batches[name]
            y = x if target is None else target
            with torch.no_grad():
                sse = (out.recon - y).pow(2).sum()
                sst = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
                dead = (sae.steps_since_fired >= sae.cfg.dead_feature_window).float().mean()
            values = {
                "loss": out.loss, "mse_loss": out.mse_loss, "sparsity_loss": out.sparsity_loss,
                "aux_loss": out.aux_loss, "l0": out.l0.float().mean(), "explained_variance": 1 - sse / sst,
                "dead_fraction": dead, "lr": torch.tensor(param_groups[i]["lr"]),
                "tokens_seen": torch.tensor(float(self.group_of(name).tokens_seen)),
            }  # fmt: skip
            metrics.update({self.log_name(name, k): v for k, v in values.items()})
        self.log_dict(metrics, prog_bar=False, on_step=True, on_epoch=False)
        mean_loss = torch.stack([o.loss for o in outputs.values()]).mean()
        self.log("loss", mean_loss, prog_bar=True, on_step=True, on_epoch=False, logger=False)

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [
            name for name, sae in self.saes.items() if not all(bool(torch.isfinite(p).all()) for p in sae.parameters())
        ]
        if bad:
            raise FloatingPointError(
                f"SAE(s) {bad} hold NaN or infinite weights at step {self.global_step}: not writing a checkpoint "
                "over the last good one. Lower lr and resume from the last good checkpoint."
            )
        checkpoint["sae_configs"] = {n: s.cfg.to_dict() for n, s in self.saes.items()}
        checkpoint["sae_norm_fitted"] = {n: s._norm_fitted for n, s in self.saes.items()}
        checkpoint["sae_groups"] = {
            k: {"tokens_seen": g.tokens_seen, "draining": g.draining, "pending": g.pending, "dropped": g.dropped_rows}
            for k, g in self.groups.items()
        }
        if self.checkpoint_buffer:
            checkpoint["mixing_buffers"] = {
                k: g.buffer.state_dict() for k, g in self.groups.items() if g.buffer is not None
            }
        if self.export_on_checkpoint and self._trainer is not None and self.trainer.is_global_zero:
            dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            if dirpath:
                for name in self.saes:
                    self.export(Path(dirpath) / ("sae" if self.single else f"saes/{name}"), name)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitted = checkpoint.get("sae_norm_fitted", {})
        if isinstance(fitted, bool):  # a checkpoint of an earlier single-SAE version
            fitted = {name: fitted for name in self.saes}
        for name, sae in self.saes.items():
            sae._norm_fitted = bool(fitted.get(name, True))
        self._group_states = checkpoint.get("sae_groups", {})
        buffers = checkpoint.get("mixing_buffers")
        if buffers is None and "mixing_buffer" in checkpoint:  # earlier single-SAE version
            buffers = {"*": checkpoint["mixing_buffer"]}
        self._buffer_states = buffers

    def on_train_start(self) -> None:
        """Restore buffers and group counters of a resumed run (the groups exist only after setup)."""
        states, self._buffer_states = self._buffer_states, None
        for key, state in (getattr(self, "_group_states", None) or {}).items():
            if key in self.groups:
                group = self.groups[key]
                group.tokens_seen = int(state.get("tokens_seen", 0))
                group.draining = bool(state.get("draining", False))
                group.pending = state.get("pending")
                group.dropped_rows = int(state.get("dropped", 0))
        self._group_states = None
        if not states:
            return
        for key, state in states.items():
            group = self.groups.get(key) if key != "*" else next(iter(self.groups.values()))
            if group is None:
                raise ValueError(f"The checkpoint holds a buffer for hook group {key!r}, which this run does not have.")
            group.buffer = self._new_buffer(group)
            group.buffer.load_state_dict(state)
            if key == "*":
                group.draining = group.buffer.size > group.buffer.capacity // 2 if self.buffer_tokens else False

    def export_folder(self, name: str) -> Path:
        """Where SAE ``name`` is exported: ``export_dir`` (``/<name>`` in a multi-SAE run) or ``<run>/sae(s)``."""
        if self.export_dir:
            return Path(self.export_dir) if self.single else Path(self.export_dir) / name
        base = run_dir(self.trainer) if self._trainer is not None else Path("runs")
        return base / "sae" if self.single else base / "saes" / name

    def sae_folder(self, name: str | None = None) -> Path:
        """Where SAE ``name``'s files and ``eval.json`` are written (its export folder; never an input folder)."""
        return self.export_folder(name or self.sae_name)

    def export(self, folder: str | Path, name: str | None = None) -> Path:
        """Write one SAE in its native (SAELens-compatible) folder format."""
        sae = self.saes[name] if name is not None else self.sae
        if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            raise FloatingPointError(f"SAE {name or self.sae_name!r} holds NaN or infinite weights: not exporting it.")
        return sae.save(folder)

    def export_all(self) -> dict[str, Path]:
        """Export every SAE to its export folder (rank 0; once per step)."""
        folders = {name: self.export_folder(name) for name in self.saes}  # on every rank: log_dir is collective
        if self._trainer is not None and not self.trainer.is_global_zero:
            return folders
        step = self.global_step
        if self._exported_step != step:
            for name, folder in folders.items():
                self.export(folder, name)
            self._exported_step = step
        return folders

    def on_train_end(self) -> None:
        self.export_all()

    def on_fit_end(self) -> None:
        for sae in self.saes.values():
            sae.set_process_group(None)  # the SAEs may be used outside this process group from now on
        self.export_all()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not bool(self.initialized):  # e.g. the sanity check before the first step: nothing to measure yet
            return None
        rows = self.rows_from_images(batch) if self.online else self.rows_from_batch(batch)
        for name in self.saes:
            group = self.group_of(name)
            with self.stepping(name), torch.no_grad():
                x, target = self.split(rows[group.key])
                out = self.compute_loss(x, target)
            self.log(self.log_name(name, "mse_loss", "val"), out.mse_loss, sync_dist=True)
            self.log(self.log_name(name, "l0", "val"), out.l0.float().mean(), sync_dist=True)
        return None


class _Carry:
    """Pass-through 'buffer' without mixing: batches in arrival order, the remainder carried over."""

    def __init__(self, batch: int) -> None:
        self.rest: list[Tensor] = []
        self.batch = batch

    @property
    def size(self) -> int:
        return sum(r.shape[0] for r in self.rest)

    def append(self, rows: Tensor) -> None:
        self.rest.append(rows)

    def pop(self, n: int) -> Tensor:
        data = torch.cat(self.rest) if len(self.rest) > 1 else self.rest[0]
        out, rest = data[:n], data[n:]
        self.rest = [rest] if rest.shape[0] else []
        return out

    def state_dict(self) -> dict[str, Any]:
        data = torch.cat(self.rest) if self.rest else torch.empty(0)
        return {"data": data, "size": int(data.shape[0]), "carry": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rest = [state["data"]] if state["data"].numel() else []


def _detached(out: SAEOutput) -> SAEOutput:
    return out._replace(
        recon=out.recon.detach(), loss=out.loss.detach(), mse_loss=out.mse_loss.detach(),
        sparsity_loss=out.sparsity_loss.detach(), aux_loss=out.aux_loss.detach(),
        prefix_loss=out.prefix_loss.detach(), l0=out.l0.detach(),
    )  # fmt: skip


def _check_writable(folder: Path) -> None:
    """Create ``folder`` (and parents) and check a file can be written there; a clear error if not."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check", delete=True):
            pass
    except OSError as err:
        raise OSError(
            err.errno,
            f"Cannot write the output folder {folder} ({err.strerror or err}); set export_dir (or "
            "--trainer.default_root_dir) to a writable folder.",
        ) from err


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: available system memory), or None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


__all__ = ["SAEModule", "TRAINING_FIELDS", "apply_backbone_transforms"]
