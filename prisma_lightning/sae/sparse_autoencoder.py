"""`SparseAutoencoder`: ReLU, TopK, BatchTopK, JumpReLU, Gated and Matryoshka-BatchTopK SAEs in one module.

Shapes: inputs ``[..., d_in]`` (any leading dimensions; they are flattened to ``n`` tokens), features
``[..., d_sae]``, reconstructions ``[..., d_out]`` (``d_out = d_in`` for an SAE).

Losses are computed in the *normalised* activation space (see ``SAEConfig.normalize_activations``):
``mse_loss = mean_tokens(sum_features((recon - target)^2))`` -- summed over ``d_out``, averaged over tokens -- so
its size does not depend on the batch size. ``forward`` returns the reconstruction in the raw input space.

Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc [d_sae]``, ``b_dec [d_out]``;
Gated SAEs have ``b_gate``, ``r_mag``, ``b_mag`` instead of ``b_enc``; JumpReLU learns ``log_threshold``.
All are plain contiguous tensors (fused optimizers copy non-contiguous ones on every step).

Training recipe (what :func:`prisma_lightning.sae.training.train_step` does)::

    out = sae(x, step=step)            # out.loss = mse + sparsity + aux (+ matryoshka prefix) losses
    out.loss.backward()
    sae.before_optimizer_step()        # unit-norm decoders: drop the gradient parallel to each decoder row
    optimizer.step()
    sae.after_optimizer_step()         # unit-norm decoders: renormalise the rows
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import losses
from .activations import jumprelu, jumprelu_sae, relu_sae
from .config import BATCH_TOPK_FAMILY, SAEConfig
from .init import geometric_median, unit_rows
from .sparse_ops import (
    SparsePattern,
    batch_topk_select,
    dense_to_pattern,
    group_pattern,
    pre_activations,
    sparse_decode,
    sparse_encode,
    threshold_select,
    topk_select,
)

LAYER_NORM_EPS = 1e-5
THRESHOLD_EMA = 0.01
"""Rate of the exponential moving average behind BatchTopK's inference threshold (SAELens' default)."""


class SparseCodes(NamedTuple):
    """The active features of each token in flat (``embedding_bag``) form; TopK family only."""

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
    """Feature activations ``[..., d_sae]`` (dense); None when ``return_feats=False`` for the TopK family."""
    loss: Tensor
    """Total training loss: ``mse_loss + sparsity_loss + aux_loss + prefix_loss``."""
    mse_loss: Tensor
    """Squared error summed over ``d_out`` and averaged over tokens (full dictionary)."""
    sparsity_loss: Tensor
    """Coefficient times the L1 (relu, gated: weighted by decoder row norms) or L0 (jumprelu) penalty; 0 else."""
    aux_loss: Tensor
    """AuxK (TopK family), ghost grads (relu), the gated via-gate reconstruction loss or the JumpReLU pre-activation
    loss; 0 if none applies."""
    prefix_loss: Tensor
    """matryoshka_batchtopk: sum of the MSEs of the proper dictionary prefixes; 0 otherwise."""
    l0: Tensor
    """Number of active features of each token, ``[...]`` (float)."""
    codes: SparseCodes | None
    """TopK family: the active features in sparse form; None for dense architectures."""


class _Pass(NamedTuple):
    recon: Tensor  # [n, d_out], normalised space, skip connection included
    feats: Tensor | None
    codes: SparseCodes | None
    sparsity: Tensor
    aux_extra: Tensor | None  # gated via-gate loss, JumpReLU pre-activation loss
    prefix: Tensor | None
    l0: Tensor
    fired: Tensor  # ids or mask of features active in this batch


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder over ``d_in``-wide activations; see the module docstring for the conventions."""

    _tied_init = True
    """Initialise ``W_enc`` as ``W_dec.T`` (an SAE's encoder starts as its decoder's transpose)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.d_sae = int(cfg.d_sae)  # type: ignore[arg-type]
        self.d_out = self._output_width()
        kw = {"dtype": cfg.torch_dtype, "device": torch.device(cfg.device)}
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae, **kw))
        if cfg.architecture == "gated":
            self.b_gate = nn.Parameter(torch.zeros(self.d_sae, **kw))
            self.r_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))
            self.b_mag = nn.Parameter(torch.zeros(self.d_sae, **kw))
        else:
            self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **kw))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.zeros(self.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, self.d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **kw))
        self._build_extra(kw)
        if cfg.architecture in BATCH_TOPK_FAMILY:
            self.register_buffer("running_threshold", torch.zeros((), **kw))
        self.batch_topk_group: Any = None
        """A ``torch.distributed`` process group: BatchTopK then selects over the union of every rank's batch
        (set by ``SAEModule`` under DDP, so N processes train exactly like one on the global batch)."""
        if cfg.architecture == "matryoshka_batchtopk":
            ends = torch.tensor(cfg.matryoshka_prefixes, device=kw["device"])
            self.register_buffer("prefix_ends", ends, persistent=False)
        self.register_buffer("steps_since_fired", torch.zeros(self.d_sae, dtype=torch.long, device=kw["device"]))
        self.register_buffer("norm_scale_in", torch.ones((), **kw))
        self.register_buffer("norm_scale_out", torch.ones((), **kw))
        self._norm_fitted = cfg.normalize_activations != "expected_norm"
        self._ln_stats: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ construction hooks (Transcoder overrides)
    def _output_width(self) -> int:
        return self.d_in

    def _build_extra(self, kw: dict[str, Any]) -> None:
        """Create subclass parameters (the transcoder's skip path and input bias)."""

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
        enc_norm = norm if cfg.is_topk_family else min(norm, 0.1)
        w_dec = unit_rows(self.d_sae, self.d_out, norm, gen)
        tied = self._tied_init and self.d_out == self.d_in
        w_enc_t = w_dec * (enc_norm / norm) if tied else unit_rows(self.d_sae, self.d_in, enc_norm, gen)
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_enc_t.t())
        for name in ("b_enc", "b_gate", "r_mag", "b_mag"):
            if hasattr(self, name):
                getattr(self, name).zero_()
        self.b_dec.zero_()
        if cfg.architecture == "jumprelu":
            self.log_threshold.fill_(math.log(cfg.jumprelu_init_threshold))

    def extra_repr(self) -> str:
        return f"architecture={self.cfg.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}"

    # ------------------------------------------------------------------ normalisation
    @property
    def threshold(self) -> Tensor:
        """Per-feature inference threshold ``[d_sae]`` (jumprelu: ``exp(log_threshold)``; BatchTopK: running)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture in BATCH_TOPK_FAMILY:
            return self.running_threshold.expand(self.d_sae)
        raise AttributeError(f"architecture {self.cfg.architecture!r} has no threshold (only jumprelu and batchtopk)")

    def _rows(self, x: Tensor, width: int, name: str) -> Tensor:
        if x.shape[-1] != width:
            raise ValueError(
                f"{name} has last dimension {x.shape[-1]}, but this SAE expects {width} ({name} [..., {width}])."
            )
        return x.reshape(-1, width).to(self.W_dec.dtype)

    def _check_fitted(self) -> None:
        if not self._norm_fitted:
            raise RuntimeError(
                "normalize_activations='expected_norm' needs its scaling factor: call "
                "sae.fit_normalization(x_sample) on a sample of activations before using the SAE."
            )

    def _normalize_input(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        mode = self.cfg.normalize_activations
        if mode == "expected_norm":
            self._check_fitted()
            return x * self.norm_scale_in, None
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True) + LAYER_NORM_EPS
            return xc / std, (mu, std)
        return x, None

    def _normalize_target(self, y: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.cfg.normalize_activations == "expected_norm":
            return y * self.norm_scale_out
        if stats is not None:
            return (y - stats[0]) / stats[1]
        return y

    def _denormalize(self, r: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.cfg.normalize_activations == "expected_norm":
            return r / self.norm_scale_out
        if stats is not None:
            return r * stats[1] + stats[0]
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
        if not mean_norm > 0:
            raise ValueError("Cannot fit the activation normalisation: the sample has zero mean norm.")
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
        self.W_enc.mul_(s_in)
        self._fold_input_bias(s_in, s_out)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        self.norm_scale_in.fill_(1.0)
        self.norm_scale_out.fill_(1.0)
        self.cfg.normalize_activations = "none"

    def _fold_input_bias(self, s_in: Tensor, s_out: Tensor) -> None:
        """SAE: the input bias is ``b_dec``, divided below with the decoder. Transcoders override."""

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
        """L1 / L0 coefficient at training ``step``, ramped over ``l1_warmup_steps`` (full value if step is None)."""
        cfg = self.cfg
        coef = cfg.l0_coefficient if cfg.architecture == "jumprelu" else cfg.l1_coefficient
        if step is None or cfg.l1_warmup_steps <= 0:
            return coef
        return coef * min(1.0, (step + 1) / cfg.l1_warmup_steps)

    # ------------------------------------------------------------------ public encode / decode
    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` of ``x [..., d_in]`` (dense; BatchTopK follows train/eval mode)."""
        lead = x.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x, self.d_in, "x"))
        self._ln_stats = stats
        return self._encode_dense(x_n).reshape(*lead, self.d_sae)

    def _encode_dense(self, x_n: Tensor) -> Tensor:
        arch, b_in = self.cfg.architecture, self._input_bias()
        if arch == "gated":
            return self._gated_parts(x_n)[0]
        pre = pre_activations(x_n, self.W_enc, self.b_enc, b_in)
        if arch == "relu":
            return pre.relu()
        if arch == "jumprelu":
            return jumprelu(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        if arch == "topk":
            values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, values.relu())
        if self.training:
            values, pattern = batch_topk_select(pre, self.cfg.k, self.batch_topk_group)
        else:
            values, pattern = threshold_select(pre, self.running_threshold)
        return self._densify(values, pattern)

    def decode(self, feats: Tensor) -> Tensor:
        """Reconstruction ``[..., d_out]`` in the raw space from ``feats [..., d_sae]``.

        ``layer_norm`` SAEs un-normalise with the statistics of the tokens last given to :meth:`encode`.
        """
        lead = feats.shape[:-1]
        f = self._rows(feats, self.d_sae, "feats")
        stats = None
        if self.cfg.normalize_activations == "layer_norm":
            stats = self._ln_stats
            if stats is None or stats[0].shape[0] != f.shape[0]:
                raise ValueError(
                    "A layer_norm SAE un-normalises with the statistics of the tokens last passed to encode(); call "
                    "encode() on the same tokens first, or use forward()."
                )
        return self._denormalize(self._decode_rows(f), stats).reshape(*lead, self.d_out)

    def _decode_rows(self, f: Tensor) -> Tensor:
        if self.cfg.is_topk_family:
            values, pattern = dense_to_pattern(f)
            return sparse_decode(values, self.W_dec, pattern) + self.b_dec
        return torch.addmm(self.b_dec, f, self.W_dec)

    @staticmethod
    def _densify(values: Tensor, pattern: SparsePattern) -> Tensor:
        dense = values.new_zeros(pattern.n_rows, pattern.n_features)
        return dense.index_put((pattern.rows, pattern.indices), values)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, step: int | None = None, *, return_feats: bool = True) -> SAEOutput:
        """Encode, decode and compute the losses for ``x [..., d_in]``.

        ``step`` (the training step) drives the sparsity-coefficient warm-up. In training mode the forward also
        updates the dead-feature counter ``steps_since_fired`` and (BatchTopK) the running threshold.
        ``return_feats=False`` skips densifying TopK-family features (``feats`` is then None).
        """
        return self._forward(x, None, step, return_feats)

    def _forward(self, x: Tensor, target: Tensor | None, step: int | None, return_feats: bool) -> SAEOutput:
        lead = x.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x, self.d_in, "x"))
        if target is None:
            target_n = x_n
        else:
            target_n = self._normalize_target(self._rows(target, self.d_out, "target"), stats)
        arch = self.cfg.architecture
        if arch == "relu":
            p = self._pass_relu(x_n, step)
        elif self.cfg.is_topk_family:
            p = self._pass_topk(x_n, target_n, return_feats)
        elif arch == "jumprelu":
            p = self._pass_jumprelu(x_n, step)
        else:
            p = self._pass_gated(x_n, target_n, step)
        mse_tok = (p.recon - target_n).pow(2).sum(-1)
        mse = mse_tok.mean()
        zero = mse.new_zeros(())
        aux = p.aux_extra if p.aux_extra is not None else zero
        if self.training:
            aux = aux + self._dead_feature_loss(x_n, target_n, p.recon, mse_tok)
            self._record_firing(p.fired)
        prefix = p.prefix if p.prefix is not None else zero
        loss = mse + p.sparsity + aux + prefix
        feats = None if p.feats is None else p.feats.reshape(*lead, self.d_sae)
        recon = self._denormalize(p.recon, stats).reshape(*lead, self.d_out)
        return SAEOutput(recon, feats, loss, mse, p.sparsity, aux, prefix, p.l0.reshape(lead), p.codes)

    def _pass_relu(self, x_n: Tensor, step: int | None) -> _Pass:
        coef = self.sparsity_coefficient(step)
        args = (x_n, self.W_enc, self.b_enc, self._input_bias(), self.W_dec, self.b_dec, coef > 0)
        feats, recon, l1, l0 = relu_sae(*args)
        sparsity = coef * l1.mean() if l1 is not None else recon.new_zeros(())
        recon = self._add_skip(recon, x_n)
        with torch.no_grad():
            fired = feats.amax(0) > 0 if self.training else feats.new_zeros(0)
        return _Pass(recon, feats, None, sparsity, None, None, l0, fired)

    def _pass_jumprelu(self, x_n: Tensor, step_: int | None) -> _Pass:
        theta, bw, b_in = self.threshold, self.cfg.jumprelu_bandwidth, self._input_bias()
        feats, recon, active, fired = jumprelu_sae(x_n, self.W_enc, self.b_enc, b_in, self.W_dec, self.b_dec, theta, bw)
        if self.cfg.jumprelu_sparsity_loss == "tanh":
            penalty = torch.tanh(self.cfg.jumprelu_tanh_scale * feats * self.W_dec.norm(dim=1)).sum(-1)
        else:
            penalty = active
        sparsity = self.sparsity_coefficient(step_) * penalty.mean()
        recon = self._add_skip(recon, x_n)
        aux = None
        if self.training and self.cfg.jumprelu_pre_act_coefficient > 0:
            dead = self.dead_features()
            if dead.numel():  # pull dead features' pre-activations up to their thresholds
                pre_dead = pre_activations(x_n, self.W_enc[:, dead], self.b_enc[dead], b_in)
                gap = (theta[dead] - pre_dead).relu() * self.W_dec[dead].norm(dim=1)
                aux = self.cfg.jumprelu_pre_act_coefficient * gap.sum(-1).mean()
        return _Pass(recon, feats, None, sparsity, aux, None, active.detach(), fired)

    def _gated_parts(self, x_n: Tensor) -> tuple[Tensor, Tensor]:
        b_in = self._input_bias()
        h = (x_n if b_in is None else x_n - b_in) @ self.W_enc  # one matmul serves both paths (W_mag = W_gate*e^r)
        pi_gate = h + self.b_gate
        magnitude = torch.relu(h * self.r_mag.exp() + self.b_mag)
        return (pi_gate > 0).to(h.dtype) * magnitude, pi_gate

    def _pass_gated(self, x_n: Tensor, target_n: Tensor, step: int | None) -> _Pass:
        feats, pi_gate = self._gated_parts(x_n)
        recon = self._add_skip(torch.addmm(self.b_dec, feats, self.W_dec), x_n)
        gate_acts = pi_gate.relu()
        sparsity = self.sparsity_coefficient(step) * (gate_acts @ self.W_dec.norm(dim=1)).mean()
        via_gate = torch.addmm(self.b_dec.detach(), gate_acts, self.W_dec.detach())
        via_gate = self._add_skip(via_gate, x_n, detach=True)
        aux = (via_gate - target_n).pow(2).sum(-1).mean()
        with torch.no_grad():
            l0 = torch.linalg.vector_norm(feats, ord=0, dim=-1)
            fired = (feats.amax(0) > 0) if self.training else feats.new_zeros(0)
        return _Pass(recon, feats, None, sparsity, aux, None, l0, fired)

    def _pass_topk(self, x_n: Tensor, target_n: Tensor, return_feats: bool) -> _Pass:
        cfg, arch = self.cfg, self.cfg.architecture
        matryoshka = arch == "matryoshka_batchtopk"
        if arch == "topk":
            select = lambda pre: topk_select(pre, cfg.k)  # noqa: E731
        elif self.training:
            select = lambda pre: batch_topk_select(pre, cfg.k, self.batch_topk_group)  # noqa: E731
        else:
            threshold = self.running_threshold
            select = lambda pre: threshold_select(pre, threshold)  # noqa: E731
        values, pattern = sparse_encode(x_n, self.W_enc, self.b_enc, self._input_bias(), select)
        prefix = None
        if matryoshka:
            # Decode each (token, feature group) bag once; cumulative sums give every prefix's reconstruction.
            groups = group_pattern(pattern, self.prefix_ends)
            parts = sparse_decode(values, self.W_dec, groups).view(pattern.n_rows, -1, self.d_out)
            recons = self._add_skip(parts.cumsum(1) + self.b_dec, x_n, expand=True)
            recon = recons[:, -1]
            prefix = (recons[:, :-1] - target_n[:, None]).pow(2).sum(-1).mean(0).sum()
        else:
            recon = self._add_skip(sparse_decode(values, self.W_dec, pattern) + self.b_dec, x_n)
        with torch.no_grad():
            active = values > 0
            if arch == "topk":
                l0 = active.view(pattern.n_rows, cfg.k).sum(-1)
            else:
                l0 = torch.bincount(pattern.rows, weights=active.to(values.dtype), minlength=pattern.n_rows)
            fired = pattern.indices if bool(active.all()) else pattern.indices[active]
            if self.training and arch != "topk":
                # the smallest selected value (batch selections keep positive values only), over all ranks
                m = values.min() if values.numel() else values.new_full((), math.inf)
                if self.batch_topk_group is not None:
                    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MIN, group=self.batch_topk_group)
                if bool(torch.isfinite(m)):
                    rt = self.running_threshold
                    rt.copy_(torch.where(rt == 0, m, (1 - THRESHOLD_EMA) * rt + THRESHOLD_EMA * m))
        feats = self._densify(values, pattern) if return_feats else None
        codes = SparseCodes(pattern.indices, values, pattern.offsets)
        return _Pass(recon, feats, codes, values.new_zeros(()), None, prefix, l0.to(values.dtype), fired)

    def _add_skip(self, recon: Tensor, x_n: Tensor, detach: bool = False, expand: bool = False) -> Tensor:
        skip = self._skip(x_n.detach() if detach else x_n)
        if skip is None:
            return recon
        if detach:
            skip = skip.detach()
        return recon + (skip[:, None] if expand else skip)

    # ------------------------------------------------------------------ dead features
    def dead_features(self) -> Tensor:
        """Ids of features that have not fired for ``dead_feature_window`` training steps, ``[n_dead]``.

        ``steps_since_fired`` is counted per process; under DDP a trainer should all-reduce it with ``MIN`` now
        and then, so that every rank sees a feature as alive if it fired anywhere.
        """
        return (self.steps_since_fired >= self.cfg.dead_feature_window).nonzero().squeeze(1)

    @torch.no_grad()
    def _record_firing(self, fired: Tensor) -> None:
        self.steps_since_fired.add_(1)
        if fired.dtype == torch.bool:
            self.steps_since_fired.masked_fill_(fired, 0)
        else:
            self.steps_since_fired.index_fill_(0, fired, 0)

    def _dead_feature_loss(self, x_n: Tensor, target_n: Tensor, recon: Tensor, mse_tok: Tensor) -> Tensor:
        cfg = self.cfg
        use_auxk = cfg.is_topk_family and cfg.aux_k_coefficient > 0
        if not (use_auxk or cfg.ghost_grads):
            return recon.new_zeros(())
        dead = self.dead_features()
        if dead.numel() == 0:
            return recon.new_zeros(())
        residual = (target_n - recon).detach()
        args = (self.W_enc, self.b_enc, self._input_bias(), self.W_dec, dead)
        if use_auxk:
            return cfg.aux_k_coefficient * losses.auxk_loss(x_n, residual, *args, aux_k=int(cfg.aux_k))
        return losses.ghost_grads_loss(x_n, residual, mse_tok, *args)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if prefix + "norm_scale_in" in state_dict:
            self._norm_fitted = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ files
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
