"""`SparseAutoencoder`: the base every architecture subclasses (what all SAEs share), and its outputs.

Shapes: inputs ``[..., d_in]`` (any leading dimensions; they are flattened to ``n`` tokens), features
``[..., d_sae]``, reconstructions ``[..., d_out]`` (``d_out = d_in`` for an SAE).

The base owns: activation normalisation (``expected_norm`` / ``layer_norm``), ``b_dec`` and its data-driven
initialisation, the decoder-norm policy (unit rows with the parallel gradient removed, or free rows), the firing
statistics behind dead-feature losses and resampling, the public ``encode`` / ``decode`` / ``forward`` used for
splicing into a model, and save / load. An architecture (one file in ``architectures/``, registered by name) owns
its parameters, its encoder (:meth:`encode_rows`), its training pass with its losses (:meth:`pass_rows`), and any
hooks it needs (decoder, dead-feature loss, per-feature state for resampling, file tensors, SAELens fields).
``SparseAutoencoder(cfg)`` returns the registered class of ``cfg.architecture``.

Losses are computed in the *normalised* activation space: ``mse_loss = mean_tokens(sum_features((recon -
target)^2))`` -- summed over ``d_out``, averaged over tokens -- so its size does not depend on the batch size.
``forward`` returns the reconstruction in the raw input space. ``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_out]``
are read as attributes, so an architecture may derive them (a property) instead of storing them.

Training recipe (what :func:`prisma_lightning.sae.training.train_step` does)::

    out = sae(x, step=step)            # out.loss = mse + sparsity + aux (+ prefix) losses
    out.loss.backward()
    sae.before_optimizer_step()        # unit-norm decoders: drop the gradient parallel to each decoder row
    optimizer.step()
    sae.after_optimizer_step()         # unit-norm decoders: renormalise the rows
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import registry
from .config import SAEConfig, TranscoderConfig
from .init import geometric_median, unit_rows
from .losses import squared_error_rows

LAYER_NORM_EPS = 1e-5
"""Added to the standard deviation when ``layer_norm`` divides (not when it un-normalises), as SAELens and
ViT-Prisma do: ``x_n = (x - mu) / (std + eps)``, ``recon = r * std + mu`` (unbiased ``std``)."""


class SparseCodes(NamedTuple):
    """The active features of each token in flat (``embedding_bag``) form; sparse architectures only."""

    indices: Tensor
    """Feature id of each active entry, ``[nnz]``, grouped by token."""
    values: Tensor
    """Activation of each entry, ``[nnz]``."""
    offsets: Tensor
    """Index of each token's first entry, ``[n_tokens]``."""


class SAEOutput(NamedTuple):
    """What :meth:`SparseAutoencoder.forward` returns. Losses are scalars in normalised activation space."""

    recon: Tensor
    """Reconstruction in the raw activation space, ``[..., d_out]``."""
    feats: Tensor | None
    """Feature activations ``[..., d_sae]`` (dense); None when ``return_feats=False`` for sparse architectures."""
    loss: Tensor
    """Total training loss: ``mse_loss + sparsity_loss + aux_loss + prefix_loss``."""
    mse_loss: Tensor
    """Squared error summed over ``d_out`` and averaged over tokens (full dictionary)."""
    sparsity_loss: Tensor
    """Coefficient times the architecture's sparsity penalty (L1, L0, Lp, ...); 0 for TopK-style architectures."""
    aux_loss: Tensor
    """Auxiliary losses (AuxK, ghost grads, the gated via-gate loss, JumpReLU's pre-activation loss); 0 if none."""
    prefix_loss: Tensor
    """Nested-dictionary losses (Matryoshka: the MSEs of the proper prefixes); 0 otherwise."""
    l0: Tensor
    """Number of active features of each token, ``[...]`` (float)."""
    codes: SparseCodes | None
    """Sparse architectures: the active features in sparse form; None for dense ones."""


class Pass(NamedTuple):
    """What an architecture's :meth:`SparseAutoencoder.pass_rows` returns for ``n`` rows (normalised space)."""

    recon: Tensor
    """Reconstruction ``[n, d_out]`` in normalised space, skip connection included."""
    feats: Tensor | None
    """Dense features ``[n, d_sae]``, or None (sparse architectures asked for no dense features)."""
    codes: SparseCodes | None
    """Sparse form of the features (sparse architectures)."""
    sparsity: Tensor
    """The weighted sparsity penalty (scalar)."""
    aux: Tensor | None
    """An architecture-specific auxiliary loss (scalar) or None; dead-feature losses are added by the base."""
    prefix: Tensor | None
    """Nested-dictionary losses (scalar) or None."""
    l0: Tensor
    """Active features per row ``[n]``."""
    fired: Tensor
    """Features active in this batch: a ``[d_sae]`` bool mask or a tensor of feature ids (training mode)."""


class SparseAutoencoder(nn.Module, metaclass=abc.ABCMeta):
    """A sparse autoencoder over ``d_in``-wide activations; see the module docstring for the conventions."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """The architecture's config dataclass (its ``architecture`` default is the registered name)."""
    architecture: ClassVar[str | None] = None
    """The registered name (set by :func:`~prisma_lightning.sae.registry.register_architecture`)."""
    sparse_codes: ClassVar[bool] = False
    """Whether features come as a sparse selection (``SAEOutput.codes``; sparse decode, no dense feature matrix)."""
    encoder_init_cap: ClassVar[float | None] = 0.1
    """Encoder rows start as the decoder's transpose, with norm at most this (None: the decoder's norm)."""
    feature_parameters: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_enc": 0}
    """Per-feature parameters and the axis that indexes features (resampling zeroes their Adam moments there)."""
    feature_biases: ClassVar[tuple[str, ...]] = ("b_enc",)
    """Per-feature parameters reset to 0 at initialisation and when a feature is resampled."""
    saelens_names: ClassVar[tuple[str, ...]] = ()
    """SAELens ``architecture`` values this class reads."""
    paper: ClassVar[str] = ""
    """Citation of the method (README architecture table)."""

    def __new__(cls, cfg: SAEConfig | None = None, *args: Any, **kwargs: Any) -> SparseAutoencoder:
        if cfg is not None and isinstance(cfg, SAEConfig):
            target = cls
            if cls.architecture is None:
                target = registry.architecture_class(cfg.architecture)
            elif cls.architecture != cfg.architecture:
                raise TypeError(
                    f"{cls.__name__} is the {cls.architecture!r} architecture but the config says "
                    f"{cfg.architecture!r}; build it with SparseAutoencoder(cfg)."
                )
            if isinstance(cfg, TranscoderConfig):
                from .transcoder import transcoder_class

                target = transcoder_class(target)
            return super().__new__(target)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}; build "
                "SAEs with SparseAutoencoder(SAEConfig(architecture=..., ...))."
            )
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.d_sae = int(cfg.d_sae)  # type: ignore[arg-type]
        self.d_out = self._output_width()
        kw = {"dtype": cfg.torch_dtype, "device": torch.device(cfg.device)}
        self.build_parameters(kw)
        self._build_extra(kw)
        self.register_buffer("steps_since_fired", torch.zeros(self.d_sae, dtype=torch.long, device=kw["device"]))
        self.register_buffer("norm_scale_in", torch.ones((), **kw))
        self.register_buffer("norm_scale_out", torch.ones((), **kw))
        self._norm_fitted = cfg.normalize_activations != "expected_norm"
        self._ln_stats: tuple[Tensor, Tensor, Tensor] | None = None
        self.folded_norm_scales: tuple[float, float] | None = None
        """``(s_in, s_out)`` of an ``expected_norm`` SAE loaded in its folded (file) form; see
        :meth:`unfold_activation_norm`."""
        self.reset_parameters()

    # ------------------------------------------------------------------ construction (architecture hooks)
    def build_parameters(self, kw: dict[str, Any]) -> None:
        """Create the architecture's parameters (default: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``)."""
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))

    def _output_width(self) -> int:
        return self.d_in

    def _build_extra(self, kw: dict[str, Any]) -> None:
        """Create transcoder parameters (the skip path and input bias)."""

    def _input_bias(self) -> Tensor | None:
        """The bias subtracted from the normalised input before encoding, if any."""
        return self.b_dec if self.cfg.apply_b_dec_to_input else None

    def _skip(self, x_n: Tensor) -> Tensor | None:
        return None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random decoder rows of norm ``decoder_init_norm``, encoder tied to the decoder, zero biases."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        norm = float(cfg.decoder_init_norm)  # type: ignore[arg-type]
        cap = type(self).encoder_init_cap
        enc_norm = norm if cap is None else min(norm, cap)
        w_dec = unit_rows(self.d_sae, self.d_out, norm, gen)
        tied = self.d_out == self.d_in and not self.is_transcoder
        w_enc_t = w_dec * (enc_norm / norm) if tied else unit_rows(self.d_sae, self.d_in, enc_norm, gen)
        self.init_weights(w_enc_t, w_dec)
        for name in self.feature_biases:
            getattr(self, name).zero_()
        self.b_dec.zero_()
        self.reset_feature_state(None)

    def init_weights(self, w_enc_t: Tensor, w_dec: Tensor) -> None:
        """Write the initial encoder ``w_enc_t [d_sae, d_in]`` (transposed) and decoder ``w_dec [d_sae, d_out]``."""
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_enc_t.t())

    def reset_feature_state(self, features: Tensor | None) -> None:
        """Reset architecture state of ``features`` (all when None) to its initial value, e.g. thresholds."""

    @property
    def is_transcoder(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"architecture={self.cfg.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}"

    @property
    def threshold(self) -> Tensor:
        """Per-feature inference threshold ``[d_sae]`` (architectures with a threshold only)."""
        raise AttributeError(f"architecture {self.cfg.architecture!r} has no threshold")

    # ------------------------------------------------------------------ normalisation
    def _rows(self, x: Tensor, width: int, name: str) -> Tensor:
        if x.shape[-1] != width:
            raise ValueError(
                f"{name} has last dimension {x.shape[-1]}, but this SAE expects {width} ({name} [..., {width}])."
            )
        return x.reshape(-1, width).to(self.b_dec.dtype)

    def _check_fitted(self) -> None:
        if not self._norm_fitted:
            raise RuntimeError(
                "normalize_activations='expected_norm' needs its scaling factor: call "
                "sae.fit_normalization(x_sample) on a sample of activations before using the SAE."
            )

    def _normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """Normalised rows and, for per-token modes, the statistics ``(shift, divisor_in, multiplier_out)``."""
        mode = self.cfg.normalize_activations
        if mode == "expected_norm":
            self._check_fitted()
            return x * self.norm_scale_in, None
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
            return xc / (std + LAYER_NORM_EPS), (mu, std + LAYER_NORM_EPS, std)
        if mode == "constant_norm_rescale":
            inv = x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])  # 1 / c with c = sqrt(d) / ||x||
            return x / inv, (torch.zeros_like(inv), inv, inv)
        return x, None

    def _normalize_target(self, y: Tensor, stats: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        if self.cfg.normalize_activations == "expected_norm":
            return y * self.norm_scale_out
        if stats is not None:
            return (y - stats[0]) / stats[1]
        return y

    def _denormalize(self, r: Tensor, stats: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        if self.cfg.normalize_activations == "expected_norm":
            return r / self.norm_scale_out
        if stats is not None:
            return r * stats[2] + stats[0]
        return r

    @torch.no_grad()
    def fit_normalization(self, x_sample: Tensor) -> float:
        """Estimate the ``expected_norm`` factor ``sqrt(d_in) / mean(||x||)`` from ``x_sample [..., d_in]``."""
        scale = self._norm_factor(self._rows(x_sample, self.d_in, "x_sample"))
        self.norm_scale_in.fill_(scale)
        self.norm_scale_out.fill_(scale)
        self._norm_fitted = True
        return scale

    @staticmethod
    def _norm_factor(x: Tensor) -> float:
        mean_norm = x.double().norm(dim=-1).mean().item()
        if not (mean_norm > 0 and math.isfinite(mean_norm)):
            raise ValueError(
                f"Cannot fit the activation normalisation: the sample's mean norm is {mean_norm} (it must be a "
                "positive finite number); check the activations for zeros or NaN."
            )
        return math.sqrt(x.shape[-1]) / mean_norm

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self) -> None:
        """Fold the ``expected_norm`` factors into the weights; the SAE then reads raw activations.

        ``(s x - b_in) W_enc = (x - b_in / s)(s W_enc)`` and ``(f W_dec + b_dec) / s_out`` is a decoder scaled by
        ``1 / s_out``, so ``forward``'s ``recon`` and ``feats`` are unchanged and ``normalize_activations``
        becomes ``none``. Do it after training: a unit-norm decoder is no longer unit norm.
        """
        mode = self.cfg.normalize_activations
        if mode == "none":
            return
        if mode != "expected_norm":
            raise ValueError(
                f"Only normalize_activations='expected_norm' can be folded into the weights, not {mode!r}."
            )
        self._check_fitted()
        s_in, s_out = self.norm_scale_in.clone(), self.norm_scale_out.clone()
        self.fold_scales(s_in, s_out)
        self.norm_scale_in.fill_(1.0)
        self.norm_scale_out.fill_(1.0)
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def unfold_activation_norm(self) -> None:
        """Undo the folding of a loaded ``expected_norm`` SAE (``folded_norm_scales`` set by the loader): back to
        weights that read normalised activations, ``normalize_activations='expected_norm'``, so training can go on
        (unit-norm decoder rows are unit norm again). Outputs stay the same up to float rounding. No-op otherwise."""
        scales = getattr(self, "folded_norm_scales", None)
        if scales is None:
            return
        s_in, s_out = scales
        dtype = self.b_dec.dtype
        self.fold_scales(torch.tensor(1 / s_in, dtype=torch.float64).to(dtype), torch.tensor(1 / s_out).to(dtype))
        self.norm_scale_in.fill_(s_in)
        self.norm_scale_out.fill_(s_out)
        self.cfg.normalize_activations = "expected_norm"
        self._norm_fitted = True
        self.folded_norm_scales = None

    def fold_scales(self, s_in: Tensor, s_out: Tensor) -> None:
        """Rewrite the weights for raw inputs: encoder weights times ``s_in``, decoder and ``b_dec`` over ``s_out``.

        Architectures whose encoder is not ``W_enc`` (or whose thresholds live in input units) extend this.
        """
        self.W_enc.mul_(s_in)
        self._fold_input_bias(s_in, s_out)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)

    def _fold_input_bias(self, s_in: Tensor, s_out: Tensor) -> None:
        """SAE: the input bias is ``b_dec``, divided with the decoder. Transcoders override."""

    @torch.no_grad()
    def initialize_b_dec(self, x_sample: Tensor) -> Tensor:
        """Set ``b_dec`` from a sample ``[..., d_out]`` by ``cfg.b_dec_init``, on normalised activations."""
        y = self._rows(x_sample, self.d_out, "x_sample")
        y_n = self._normalize_input(y)[0]
        return self._set_b_dec(y_n)

    def _set_b_dec(self, y_n: Tensor) -> Tensor:
        method = self.cfg.b_dec_init
        if method == "mean":
            self.b_dec.copy_(y_n.mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(y_n).median)
        return self.b_dec.detach()

    @torch.no_grad()
    def initialize_from_data(self, x_sample: Tensor, target_sample: Tensor | None = None) -> None:
        """Everything an SAE learns from a data sample before training: the ``expected_norm`` factor, ``b_dec``, and
        any architecture-specific initialisation (:meth:`initialize_dictionary`). ``target_sample``: transcoders."""
        if self.cfg.normalize_activations == "expected_norm":
            self.fit_normalization(x_sample) if target_sample is None else self.fit_normalization(
                x_sample, target_sample
            )
        if target_sample is None:
            self.initialize_b_dec(x_sample)
        else:
            self.initialize_b_dec(target_sample, x_sample)  # type: ignore[call-arg]
        x_n = self._normalize_input(self._rows(x_sample, self.d_in, "x_sample"))[0]
        self.initialize_dictionary(x_n)

    def initialize_dictionary(self, x_n: Tensor) -> None:
        """Architecture hook: initialise from normalised sample rows ``x_n [n, d_in]`` (e.g. archetype candidates)."""

    # ------------------------------------------------------------------ decoder constraints
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row ``W_dec[i]`` to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project ``W_dec.grad`` so each row's gradient is orthogonal to that row (call between backward and step)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec
        dots = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).reshape(-1, 1)  # row-wise <g, w> without a temporary
        grad.addcmul_(w, dots / w.norm(dim=1, keepdim=True).square().clamp_min(1e-24), value=-1)

    def before_optimizer_step(self) -> None:
        """Gradient processing between ``backward`` and ``optimizer.step`` (unit-norm decoders only)."""
        if self.cfg.decoder_norm == "unit":
            self.remove_gradient_parallel_to_decoder_directions()

    def after_optimizer_step(self) -> None:
        """Weight processing after ``optimizer.step`` (unit-norm decoders: renormalise the rows)."""
        if self.cfg.decoder_norm == "unit":
            self.set_decoder_norm_to_unit_norm()

    def sparsity_coefficient(self, step: int | None = None) -> float:
        """Sparsity coefficient at training ``step``, ramped over ``l1_warmup_steps`` (full value if step is None)."""
        coef = self.cfg.sparsity_coefficient
        warmup = self.cfg.l1_warmup_steps
        if step is None or warmup <= 0:
            return coef
        return coef * min(1.0, (step + 1) / warmup)

    # ------------------------------------------------------------------ public encode / decode
    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` of ``x [..., d_in]`` (dense; batch-level selections follow
        train/eval mode)."""
        lead = x.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x, self.d_in, "x"))
        self._ln_stats = stats
        return self.encode_rows(x_n).reshape(*lead, self.d_sae)

    @abc.abstractmethod
    def encode_rows(self, x_n: Tensor) -> Tensor:
        """Architecture hook: dense features ``[n, d_sae]`` of normalised rows ``x_n [n, d_in]``."""

    def encode_sparse(self, x: Tensor) -> Tensor:
        """The active (``> 0``) feature activations of ``x [..., d_in]`` as a sparse COO tensor ``[..., d_sae]``.

        Equal to ``encode(x)`` once densified (``.to_dense()``); each active entry appears once, in no particular
        order (the tensor is not coalesced). Architectures that select their features (``sparse_codes``: the TopK
        family, matching pursuit) build it from the selection, without a dense ``[n, d_sae]`` tensor.
        """
        lead = x.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x, self.d_in, "x"))
        self._ln_stats = stats
        rows, feats, values = self.encode_entries(x_n)
        keep = torch.nonzero(values > 0).squeeze(1)
        if keep.numel() != values.numel():
            rows, feats, values = (t.index_select(0, keep) for t in (rows, feats, values))
        index = torch.stack([*torch.unravel_index(rows, lead), feats]) if lead else feats[None]
        return torch.sparse_coo_tensor(index, values, (*lead, self.d_sae), check_invariants=False)

    def encode_entries(self, x_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Architecture hook: ``(row, feature, value)`` of the possibly active entries of normalised rows
        ``x_n [n, d_in]`` (entries ``<= 0`` are dropped by :meth:`encode_sparse`). Default: from :meth:`encode_rows`."""
        dense = self.encode_rows(x_n)
        rows, feats = torch.nonzero(dense > 0, as_tuple=True)
        return rows, feats, dense[rows, feats]

    def decode(self, feats: Tensor) -> Tensor:
        """Reconstruction ``[..., d_out]`` in the raw space from ``feats [..., d_sae]``.

        ``layer_norm`` / ``constant_norm_rescale`` SAEs un-normalise with the statistics of the tokens last given
        to :meth:`encode`.
        """
        lead = feats.shape[:-1]
        f = self._rows(feats, self.d_sae, "feats")
        stats = None
        if self.cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):
            stats = self._ln_stats
            if stats is None or stats[0].shape[0] != f.shape[0]:
                raise ValueError(
                    f"A {self.cfg.normalize_activations} SAE un-normalises with the statistics of the tokens last "
                    "passed to encode(); call encode() on the same tokens first, or use forward()."
                )
        return self._denormalize(self.decode_rows(f), stats).reshape(*lead, self.d_out)

    def decode_rows(self, f: Tensor) -> Tensor:
        """Architecture hook: normalised-space reconstruction ``[n, d_out]`` of dense features ``f [n, d_sae]``."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, step: int | None = None, *, return_feats: bool = True) -> SAEOutput:
        """Encode, decode and compute the losses for ``x [..., d_in]``.

        ``step`` (the training step) drives the sparsity-coefficient warm-up and any schedule of the architecture.
        In training mode the forward also updates the dead-feature counter ``steps_since_fired`` (and running
        statistics such as BatchTopK's threshold). ``return_feats=False`` lets sparse architectures skip the dense
        feature matrix (``feats`` is then None).
        """
        return self._forward(x, None, step, return_feats)

    def _forward(self, x: Tensor, target: Tensor | None, step: int | None, return_feats: bool) -> SAEOutput:
        lead = x.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x, self.d_in, "x"))
        if target is None:
            target_n = x_n
        else:
            target_n = self._normalize_target(self._rows(target, self.d_out, "target"), stats)
        p = self.pass_rows(x_n, target_n, step, return_feats)
        mse_tok = squared_error_rows(p.recon, target_n)
        mse = mse_tok.mean()
        zero = mse.new_zeros(())
        aux = p.aux if p.aux is not None else zero
        if self.training:
            aux = aux + self.dead_feature_loss(x_n, target_n, p.recon, mse_tok)
            self._record_firing(p.fired)
        prefix = p.prefix if p.prefix is not None else zero
        loss = mse + p.sparsity + aux + prefix
        feats = None if p.feats is None else p.feats.reshape(*lead, self.d_sae)
        recon = self._denormalize(p.recon, stats).reshape(*lead, self.d_out)
        return SAEOutput(recon, feats, loss, mse, p.sparsity, aux, prefix, p.l0.reshape(lead), p.codes)

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        """Architecture hook: encode and decode normalised rows, with the architecture's own losses.

        The default encodes densely (:meth:`encode_rows`), decodes (:meth:`decode_rows`) and has no penalty.
        """
        feats = self.encode_rows(x_n)
        recon = self._add_skip(self.decode_rows(feats), x_n)
        return Pass(recon, feats, None, recon.new_zeros(()), None, None, *self._count(feats))

    def _count(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """``(l0 [n], fired)`` of dense features (``fired`` is empty outside training)."""
        with torch.no_grad():
            active = feats > 0
            l0 = active.sum(-1, dtype=torch.int32).to(feats.dtype)
            fired = active.any(0) if self.training else feats.new_zeros(0, dtype=torch.bool)
        return l0, fired

    def _add_skip(self, recon: Tensor, x_n: Tensor, detach: bool = False, expand: bool = False) -> Tensor:
        skip = self._skip(x_n.detach() if detach else x_n)
        if skip is None:
            return recon
        if detach:
            skip = skip.detach()
        return recon + (skip[:, None] if expand else skip)

    # ------------------------------------------------------------------ dead features
    def dead_features(self) -> Tensor:
        """Ids of features that have not fired for ``dead_feature_window`` training steps, ``[n_dead]``."""
        return (self.steps_since_fired >= self.cfg.dead_feature_window).nonzero().squeeze(1)

    @torch.no_grad()
    def _record_firing(self, fired: Tensor) -> None:
        self.steps_since_fired.add_(1)
        if fired.dtype == torch.bool:
            self.steps_since_fired.masked_fill_(fired, 0)
        else:
            self.steps_since_fired.index_fill_(0, fired, 0)

    def dead_feature_loss(self, x_n: Tensor, target_n: Tensor, recon: Tensor, mse_tok: Tensor) -> Tensor:
        """Architecture hook: a loss that revives dead features (AuxK, ghost grads); 0 by default."""
        return recon.new_zeros(())

    # ------------------------------------------------------------------ resampling
    @torch.no_grad()
    def resample_features(self, features: Tensor, decoder_dirs: Tensor, encoder_dirs: Tensor, scale: float) -> None:
        """Give ``features`` new unit decoder rows ``decoder_dirs [n, d_out]`` and encoder rows along
        ``encoder_dirs [n, d_in]`` at ``scale`` x the mean encoder norm of the other features; reset their biases
        and state (Anthropic's resampling). Architectures whose weights are derived override this."""
        alive = torch.ones(self.d_sae, dtype=torch.bool, device=features.device)
        alive[features] = False
        enc_norms = self.W_enc.norm(dim=0)
        mean_norm = float(enc_norms[alive].mean()) if bool(alive.any()) else 1.0
        self.W_dec[features] = decoder_dirs
        self.W_enc[:, features] = (encoder_dirs * (scale * mean_norm)).t()
        for name in self.feature_biases:
            getattr(self, name)[features] = 0
        self.reset_feature_state(features)
        self.steps_since_fired[features] = 0

    # ------------------------------------------------------------------ distributed training
    def set_process_group(self, group: Any) -> None:
        """Architecture hook: the ``torch.distributed`` group a batch-level selection spans (DDP); None: local."""

    @torch.no_grad()
    def sync_statistics(self, world_size: int) -> None:
        """Make training statistics global under DDP (call on every rank after each step): a feature fired if it
        fired on any rank. Architectures with running statistics extend this."""
        torch.distributed.all_reduce(self.steps_since_fired, op=torch.distributed.ReduceOp.MIN)

    # ------------------------------------------------------------------ files
    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors of ``sae_weights.safetensors`` in SAELens's names and layouts (views of the parameters)."""
        return {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}

    @torch.no_grad()
    def load_file_tensor(self, name: str, value: Tensor, file: Path | str) -> None:
        """Copy one tensor of a weights file into the SAE (after the shapes were checked)."""
        getattr(self, name).copy_(value)

    def file_shape_ok(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether a file tensor's ``shape`` is acceptable for ``name`` (default: the exact shape)."""
        return tuple(self.file_tensors()[name].shape) == shape

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific SAELens ``cfg.json`` fields (``architecture`` and its options)."""
        return {"architecture": self.saelens_names[0] if self.saelens_names else self.cfg.architecture}

    @classmethod
    def config_from_saelens(cls, raw: dict[str, Any], file: Path) -> dict[str, Any]:
        """Architecture-specific config fields read from a SAELens ``cfg.json`` (e.g. ``k``)."""
        return {}

    def after_saelens_load(self, raw: dict[str, Any]) -> None:
        """Architecture hook: adjust weights loaded from a SAELens folder to what SAELens computes with them (e.g.
        fold ``rescale_acts_by_decoder_norm``)."""

    #: Names of architecture-specific safetensors files written beside ``sae_weights.safetensors`` (SAELens reads
    #: weights strictly, so extra tensors go to their own files); downloaded by ``from_pretrained`` when present.
    extra_file_names: tuple[str, ...] = ()

    def extra_files(self) -> dict[str, dict[str, Tensor]]:
        """Architecture hook: ``{file name: tensors}`` for each of :attr:`extra_file_names`, taken from the SAE as it
        is written (with any ``expected_norm`` factor already folded in)."""
        return {}

    def save(self, path: str | Path, sparsity: Tensor | None = None) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``) into folder ``path``."""
        from .io import save_sae

        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: str | None = None) -> SparseAutoencoder:
        """Load a folder written by :meth:`save` or SAELens, or ViT-Prisma ``weights.pt``/``n_images_*.pt``."""
        from .io import load_sae

        return load_sae(path, device=device, dtype=dtype, expected=cls)

    @classmethod
    def from_pretrained(
        cls, repo_id: str, subfolder: str | None = None, revision: str | None = None, device: str | None = None
    ) -> SparseAutoencoder:
        """Download an SAE from the Hugging Face Hub (our/SAELens folder layout, or ViT-Prisma files) and load it."""
        from .io import sae_from_pretrained

        return sae_from_pretrained(repo_id, subfolder=subfolder, revision=revision, device=device, expected=cls)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "norm_scale_in" in state_dict:
            self._norm_fitted = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
