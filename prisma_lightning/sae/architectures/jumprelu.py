"""JumpReLU SAE: a learned per-feature threshold, trained through straight-through estimators, and a sparsity penalty.

Method: Rajamanoharan et al. (2024), "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
Autoencoders" (Google DeepMind): ``f = pre * H(pre - theta)``; the threshold ``theta = exp(log_threshold)`` gets a
pseudo-gradient through a rectangle kernel of width ``jumprelu_bandwidth``. Penalties: ``tanh`` (the default) is
Anthropic's smooth ``sum_i tanh(scale * f_i * ||W_dec[i]||)`` (January 2025 update), which also trains the encoder
directly; ``step`` is the L0 count of Rajamanoharan et al., whose gradient reaches only the thresholds.
``jumprelu_pre_act_coefficient`` is Anthropic's pre-activation loss that pulls dead features' pre-activations up to
their thresholds.

The initial threshold and the bandwidth live in pre-activation units, so they must match the activations' scale: by
default both are set from the data sample given to ``initialize_from_data`` (``0.4 x`` and ``2 x`` the RMS
pre-activation of the freshly initialised encoder on the normalised sample). Fixed small values, as in the papers'
long runs, leave every threshold orders of magnitude below the pre-activations, and Adam moves a log-threshold by
about one learning rate per step, so the thresholds need thousands of steps before they sparsify anything.

Why ``tanh`` by default: the ``step`` penalty's gradient reaches only the thresholds, so it sparsifies at the
thresholds' pace (about one learning rate per step in log space) and, on the planted-dictionary test and the
quickstart, needs far more steps than the other architectures; ``tanh`` pushes the encoder as well and trains as
fast as they do.

The training pass is one fused autograd node (:func:`~prisma_lightning.sae.activations.jumprelu_sae`), the ``tanh``
penalty included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..activations import jumprelu, jumprelu_sae
from ..config import SAEConfig, check_choice, check_number
from ..registry import register_architecture
from ..sparse_autoencoder import Pass, SparseAutoencoder
from ..sparse_ops import pre_activations

JumpReLUSparsity = Literal["step", "tanh"]

RECOMMENDED = 0.7
"""A first ``l0_coefficient`` on normalised activations (``expected_norm``, ``tanh`` penalty): on the quickstart it
gives tens of features per token."""
INIT_THRESHOLD_SCALE = 0.4
"""Default initial threshold, in units of the RMS pre-activation of the initial encoder on the data sample."""
BANDWIDTH_SCALE = 2.0
"""Default bandwidth, in the same units."""


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE: per-feature learned thresholds, L0 (or tanh) sparsity penalty."""

    architecture: Literal["jumprelu"] = "jumprelu"
    """``jumprelu``."""
    l0_coefficient: float = RECOMMENDED
    """Weight of the sparsity penalty per token (the ``tanh`` sum or the L0 count), averaged over tokens."""
    jumprelu_bandwidth: float | None = None
    """Width of the rectangle kernel of the straight-through estimators, in pre-activation units. None: set by
    ``initialize_from_data`` to 2x the RMS pre-activation of the initial encoder on the (normalised) sample, and
    written here; without a data sample, 2x the encoder's initial row norm (the RMS pre-activation of inputs
    normalised to ``E||x|| = sqrt(d_in)``)."""
    jumprelu_init_threshold: float | None = None
    """Initial threshold of every feature, in pre-activation units. None: 0.4x the same RMS pre-activation (set by
    ``initialize_from_data`` and written here)."""
    jumprelu_sparsity_loss: JumpReLUSparsity = "tanh"
    """``tanh``: Anthropic's smooth ``sum_i tanh(scale * f_i * ||W_dec[i]||)``, which also trains the encoder;
    ``step``: the L0 count with the step-function STE of Rajamanoharan et al. (trains only the thresholds, hence
    slowly: it suits long runs)."""
    jumprelu_tanh_scale: float = 2.0
    """``scale`` of the ``tanh`` penalty, per unit of a feature's contribution ``f_i * ||W_dec[i]||``. Anthropic use 4;
    on normalised activations (``E||x|| = sqrt(d_in)``) useful contributions are O(1), so at 4 the tanh saturates
    for all of them, the penalty becomes an L0 count again and sparsifies only through the thresholds (the planted
    dictionary of the tests is then not recovered at any ``l0_coefficient`` within 600 steps); at 2 it is."""
    jumprelu_pre_act_coefficient: float = 0.0
    """Weight of Anthropic's pre-activation loss on dead features, ``sum_i relu(theta_i - z_i) * ||W_dec[i]||``
    averaged over tokens (0: off)."""

    sparsity_field = "l0_coefficient"
    recommended_coefficient = RECOMMENDED

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("jumprelu_sparsity_loss", self.jumprelu_sparsity_loss, ("step", "tanh"))
        check_number("l0_coefficient", self.l0_coefficient)
        check_number("jumprelu_pre_act_coefficient", self.jumprelu_pre_act_coefficient)
        check_number("jumprelu_tanh_scale", self.jumprelu_tanh_scale, strict=True)
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), strict=True)


@register_architecture
class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (see the module docstring)."""

    config_class = JumpReLUConfig
    feature_parameters = {**SparseAutoencoder.feature_parameters, "log_threshold": 0}
    saelens_names = ("jumprelu",)
    paper = "Rajamanoharan et al. 2024, Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU SAEs"

    def build_parameters(self, kw: dict[str, Any]) -> None:
        super().build_parameters(kw)
        self.log_threshold = nn.Parameter(torch.zeros(self.d_sae, **kw))
        cfg = self.cfg
        scale = min(float(cfg.decoder_init_norm), self.encoder_init_cap or math.inf)  # type: ignore[arg-type]
        init = cfg.jumprelu_init_threshold or INIT_THRESHOLD_SCALE * scale
        self.register_buffer("init_threshold", torch.tensor(init, **kw))
        """Threshold every feature starts from (and returns to when resampled)."""
        self.register_buffer("bandwidth", torch.tensor(cfg.jumprelu_bandwidth or BANDWIDTH_SCALE * scale, **kw))
        """Width of the straight-through estimators' rectangle kernel (a buffer, so checkpoints keep a value set
        from data)."""

    def reset_feature_state(self, features: Tensor | None) -> None:
        value = float(self.init_threshold.log())
        if features is None:
            self.log_threshold.data.fill_(value)
        else:
            self.log_threshold.data[features] = value

    @torch.no_grad()
    def initialize_dictionary(self, x_n: Tensor) -> None:
        """Set the initial threshold and the bandwidth left unset in the config from the RMS pre-activation of the
        initial encoder on ``x_n [n, d_in]`` (normalised rows), and write them into the config."""
        cfg = self.cfg
        if cfg.jumprelu_init_threshold is not None and cfg.jumprelu_bandwidth is not None:
            return
        b_in = self._input_bias()
        total = x_n.new_zeros((), dtype=torch.float64)
        for rows in x_n.split(1024):  # chunks: a [n, d_sae] matrix of a large sample would not fit
            total += pre_activations(rows, self.W_enc, self.b_enc, b_in).double().square().sum()
        rms = math.sqrt(float(total) / max(1, x_n.shape[0] * self.d_sae))
        if not rms > 0:
            raise ValueError(
                "Cannot set the JumpReLU threshold from data: the sample's pre-activations are all 0 (check the "
                "activations for zeros), or set jumprelu_init_threshold and jumprelu_bandwidth explicitly."
            )
        if cfg.jumprelu_init_threshold is None:
            cfg.jumprelu_init_threshold = INIT_THRESHOLD_SCALE * rms
            self.init_threshold.fill_(cfg.jumprelu_init_threshold)
            self.reset_feature_state(None)
        if cfg.jumprelu_bandwidth is None:
            cfg.jumprelu_bandwidth = BANDWIDTH_SCALE * rms
            self.bandwidth.fill_(cfg.jumprelu_bandwidth)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("init_threshold", "bandwidth"):  # checkpoints written before these buffers existed
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the config says what the (possibly data-derived) values are, so saved folders keep them
        if self.cfg.jumprelu_init_threshold is None:
            self.cfg.jumprelu_init_threshold = float(self.init_threshold)
        if self.cfg.jumprelu_bandwidth is None:
            self.cfg.jumprelu_bandwidth = float(self.bandwidth)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode_rows(self, x_n: Tensor) -> Tensor:
        pre = pre_activations(x_n, self.W_enc, self.b_enc, self._input_bias())
        return jumprelu(pre, self.threshold, float(self.bandwidth))

    def pass_rows(self, x_n: Tensor, target_n: Tensor, step: int | None, return_feats: bool) -> Pass:
        cfg = self.cfg
        theta, bw, b_in = self.threshold, float(self.bandwidth), self._input_bias()
        scale = cfg.jumprelu_tanh_scale if cfg.jumprelu_sparsity_loss == "tanh" else None
        args = (x_n, self.W_enc, self.b_enc, b_in, self.W_dec, self.b_dec, theta, bw, scale)
        feats, recon, active, fired, tanh_sum = jumprelu_sae(*args)
        penalty = active if tanh_sum is None else tanh_sum
        sparsity = self.sparsity_coefficient(step) * penalty.mean()
        recon = self._add_skip(recon, x_n)
        aux = None
        if self.training and cfg.jumprelu_pre_act_coefficient > 0:
            dead = self.dead_features()
            if dead.numel():  # pull dead features' pre-activations up to their thresholds
                pre_dead = pre_activations(x_n, self.W_enc[:, dead], self.b_enc[dead], b_in)
                gap = (theta[dead] - pre_dead).relu() * self.W_dec[dead].norm(dim=1)
                aux = cfg.jumprelu_pre_act_coefficient * gap.sum(-1).mean()
        return Pass(recon, feats, None, sparsity, aux, None, active.detach(), fired)

    # ------------------------------------------------------------------ files
    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "threshold": self.threshold}

    @torch.no_grad()
    def load_file_tensor(self, name: str, value: Tensor, file: Path | str) -> None:
        if name == "threshold":
            self.log_threshold.copy_(_exact_log(value.to(self.log_threshold.dtype)))
        else:
            super().load_file_tensor(name, value, file)

    def saelens_fields(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}


def _exact_log(t: Tensor) -> Tensor:
    """``log(t)``, nudged by an ulp where that makes ``exp`` give back ``t`` exactly (lossless round trips)."""
    lt = t.log()
    for direction in (math.inf, -math.inf):
        cand = torch.nextafter(lt, torch.full_like(lt, direction))
        lt = torch.where((lt.exp() != t) & (cand.exp() == t), cand, lt)
    return lt
