"""`SAEConfig` and `TranscoderConfig`: every choice of a sparse autoencoder as a typed, documented field.

The configs hold only strings, numbers and lists, so they round-trip through JSON (``to_dict`` /
``from_dict``) and show up field by field in ``prisma fit --help``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

Architecture = Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
Normalization = Literal["none", "expected_norm", "layer_norm"]
BDecInit = Literal["zeros", "mean", "geometric_median"]
DecoderNorm = Literal["unit", "free"]
Tokens = Literal["all", "cls", "patches"]
JumpReLUSparsity = Literal["step", "tanh"]

ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
TOPK_FAMILY: tuple[str, ...] = ("topk", "batchtopk", "matryoshka_batchtopk")
"""Architectures whose features come from a top-k selection (sparse decode, AuxK loss)."""
BATCH_TOPK_FAMILY: tuple[str, ...] = ("batchtopk", "matryoshka_batchtopk")
"""Architectures that select over the whole batch in training and use a learned threshold at inference."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``, ``"torch.float32"`` or a ``torch.dtype`` to the ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[key]


def _check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not valid; choose one of {list(choices)}.")


@dataclass
class SAEConfig:
    """A sparse autoencoder: its width, architecture, losses, input normalisation and provenance."""

    d_in: int = 768
    """Width of the activations the SAE reads (the hooked model's ``d_model`` for residual hooks)."""
    d_sae: int | None = None
    """Number of dictionary features; defaults to ``d_in * expansion_factor`` (``16 * d_in`` if both are unset)."""
    expansion_factor: int | None = None
    """Dictionary size as a multiple of ``d_in``; used when ``d_sae`` is not given."""
    architecture: Architecture = "relu"
    """Activation and loss family: ``relu`` (L1 penalty), ``topk`` (k per token), ``batchtopk`` (k per token on
    average over the batch), ``jumprelu`` (learned thresholds, L0 penalty), ``gated`` (gating and magnitude paths),
    ``matryoshka_batchtopk`` (batchtopk with nested-prefix reconstruction losses)."""
    k: int = 32
    """Active features per token for the TopK family (batchtopk: on average, ``k * batch`` in total)."""
    l1_coefficient: float = 1e-3
    """Weight of the L1 penalty (relu, gated), ``sum_i f_i * ||W_dec[i]||`` per token, averaged over tokens."""
    l1_warmup_steps: int = 0
    """Steps over which the sparsity coefficient (L1 or L0) ramps linearly from 0 to its value; 0: no warm-up."""
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty of JumpReLU SAEs (number of active features per token, averaged)."""
    jumprelu_bandwidth: float = 1e-3
    """Width of the rectangle kernel of JumpReLU's straight-through estimator (in pre-activation units)."""
    jumprelu_init_threshold: float = 1e-3
    """Initial JumpReLU threshold of every feature."""
    jumprelu_sparsity_loss: JumpReLUSparsity = "step"
    """JumpReLU penalty: ``step`` is the L0 count with the step-function STE (Rajamanoharan et al.); ``tanh`` is
    Anthropic's smooth ``sum_i tanh(scale * f_i * ||W_dec[i]||)``, which also trains the encoder directly."""
    jumprelu_tanh_scale: float = 4.0
    """``scale`` of the ``tanh`` JumpReLU penalty."""
    jumprelu_pre_act_coefficient: float = 0.0
    """JumpReLU: weight of Anthropic's pre-activation loss on dead features, ``sum_i relu(theta_i - z_i) *
    ||W_dec[i]||`` averaged over tokens, which pulls their pre-activations up to the threshold (0: off)."""
    matryoshka_prefixes: list[int] | None = None
    """Prefix lengths of the nested dictionaries of ``matryoshka_batchtopk``, increasing; ``d_sae`` is appended if
    missing. Default: ``d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae``."""
    normalize_activations: Normalization = "none"
    """Input normalisation: ``expected_norm`` scales inputs by one constant so that ``E||x|| = sqrt(d_in)`` (fit
    with ``fit_normalization``; fold into the weights with ``fold_activation_norm_scaling_factor``); ``layer_norm``
    standardises each token and un-standardises the reconstruction."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the (normalised) input before encoding."""
    b_dec_init: BDecInit = "geometric_median"
    """How ``initialize_b_dec(x_sample)`` sets ``b_dec``: leave zeros, the mean, or the geometric median of the
    normalised sample."""
    decoder_norm: DecoderNorm | None = None
    """``unit`` keeps decoder rows at unit norm (the trainer projects gradients and renormalises each step);
    ``free`` leaves them free (L1-type penalties are weighted by row norms, Anthropic's April 2024 update).
    Default: ``unit`` for the TopK family, ``free`` for relu, jumprelu and gated."""
    decoder_init_norm: float | None = None
    """Norm of the decoder rows at initialisation; default 0.1 for a ``free`` decoder and 1 for ``unit``. The
    encoder starts as the decoder's transpose, scaled to row norm 0.1 at most for the dense architectures (many
    features are active at first, and a large encoder would make the first reconstructions explode)."""
    aux_k: int | None = None
    """TopK family: dead features used by the AuxK loss to reconstruct the residual; default ``d_in // 2``."""
    aux_k_coefficient: float = 1 / 32
    """TopK family: weight of the AuxK loss (0 turns it off)."""
    dead_feature_window: int = 1000
    """Training steps without firing after which a feature counts as dead (AuxK, ghost grads, resampling)."""
    ghost_grads: bool = False
    """relu only: add Anthropic's ghost-grads loss for dead features."""
    hook_name: str = ""
    """Hook the SAE reads, e.g. ``blocks.9.hook_resid_post``."""
    hook_name_out: str | None = None
    """Hook the output is compared with, if it differs from ``hook_name`` (transcoders)."""
    tokens: Tokens = "all"
    """Which tokens the SAE is trained on: all, the class token only, or the patch tokens only."""
    model_name: str = ""
    """Name of the hooked model (provenance, e.g. ``open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K``)."""
    context_size: int | None = None
    """Tokens per image of the hooked model (SAELens' ``context_size``; provenance only)."""
    dtype: str = "float32"
    """Parameter dtype name (``float32``, ``float64``, ``float16``, ``bfloat16``)."""
    device: str = "cpu"
    """Device the parameters are created on."""
    seed: int = 42
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("normalize_activations", self.normalize_activations, get_args(Normalization))
        _check_choice("b_dec_init", self.b_dec_init, get_args(BDecInit))
        _check_choice("tokens", self.tokens, get_args(Tokens))
        _check_choice("jumprelu_sparsity_loss", self.jumprelu_sparsity_loss, get_args(JumpReLUSparsity))
        if self.d_in <= 0:
            raise ValueError(f"d_in must be positive, got {self.d_in}.")
        if self.d_sae is None:
            factor = 16 if self.expansion_factor is None else self.expansion_factor
            if factor <= 0:
                raise ValueError(f"expansion_factor must be positive, got {factor}.")
            self.d_sae = self.d_in * factor
        elif self.expansion_factor is not None and self.d_sae != self.d_in * self.expansion_factor:
            raise ValueError(
                f"d_sae={self.d_sae} disagrees with d_in * expansion_factor = {self.d_in} * {self.expansion_factor}; "
                "set only one of them."
            )
        if self.d_sae <= 0:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}.")
        if self.architecture in TOPK_FAMILY and not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"k={self.k} must satisfy 0 < k <= d_sae={self.d_sae} for architecture {self.architecture!r}; "
                "lower k or raise d_sae."
            )
        for name in ("l1_coefficient", "l0_coefficient", "aux_k_coefficient", "jumprelu_pre_act_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.l1_warmup_steps < 0:
            raise ValueError(f"l1_warmup_steps must be >= 0, got {self.l1_warmup_steps}.")
        if self.dead_feature_window <= 0:
            raise ValueError(f"dead_feature_window must be a positive number of steps, got {self.dead_feature_window}.")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_tanh_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.decoder_norm is None:
            self.decoder_norm = "unit" if self.architecture in TOPK_FAMILY else "free"
        _check_choice("decoder_norm", self.decoder_norm, get_args(DecoderNorm))
        if self.decoder_init_norm is None:
            self.decoder_init_norm = 0.1 if self.decoder_norm == "free" else 1.0
        if self.decoder_init_norm <= 0:
            raise ValueError(f"decoder_init_norm must be > 0, got {self.decoder_init_norm}.")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_sae, self.d_in // 2))
        if not 0 < self.aux_k <= self.d_sae:
            raise ValueError(f"aux_k={self.aux_k} must satisfy 0 < aux_k <= d_sae={self.d_sae}.")
        if self.ghost_grads and self.architecture != "relu":
            raise ValueError(
                f"ghost_grads=True is only defined for architecture='relu', got {self.architecture!r}; the TopK "
                "family uses the AuxK loss (aux_k_coefficient) instead."
            )
        parse_dtype(self.dtype)
        self.dtype = str(self.dtype).removeprefix("torch.")
        if self.architecture == "matryoshka_batchtopk":
            self.matryoshka_prefixes = self._resolve_prefixes()
        elif self.matryoshka_prefixes is not None:
            self.matryoshka_prefixes = [int(p) for p in self.matryoshka_prefixes]

    def _resolve_prefixes(self) -> list[int]:
        assert self.d_sae is not None
        if self.matryoshka_prefixes is None:
            prefixes = sorted({max(1, self.d_sae // 2**i) for i in range(4, -1, -1)})
        else:
            prefixes = [int(p) for p in self.matryoshka_prefixes]
        if not prefixes or prefixes[-1] != self.d_sae:
            prefixes.append(self.d_sae)
        if prefixes[0] <= 0 or any(a >= b for a, b in zip(prefixes, prefixes[1:], strict=False)):
            raise ValueError(
                f"matryoshka_prefixes={self.matryoshka_prefixes} must be strictly increasing prefix lengths in "
                f"(0, d_sae={self.d_sae}], e.g. [{self.d_sae // 4}, {self.d_sae // 2}, {self.d_sae}]."
            )
        return prefixes

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return parse_dtype(self.dtype)

    @property
    def is_topk_family(self) -> bool:
        """Whether features come from a top-k selection (sparse decode, AuxK)."""
        return self.architecture in TOPK_FAMILY

    @property
    def hook_layer(self) -> int | None:
        """Block index parsed from ``hook_name`` (``blocks.{i}.…``), or None."""
        parts = self.hook_name.split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build a config from ``to_dict`` output; unknown keys raise ``ValueError`` listing the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class TranscoderConfig(SAEConfig):
    """A transcoder: encodes the activations at ``hook_name`` and reconstructs those at ``hook_name_out``."""

    d_out: int | None = None
    """Width of the target activations; defaults to ``d_in``."""
    skip_connection: bool = False
    """Add a linear skip path ``x_in @ W_skip`` (``W_skip [d_in, d_out]``, zero-initialised)."""
    apply_b_dec_to_input: bool = False
    """Subtract a learned input bias ``b_in [d_in]`` before encoding (``b_dec`` is the output bias)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out is None:
            self.d_out = self.d_in
        if self.d_out <= 0:
            raise ValueError(f"d_out must be positive, got {self.d_out}.")
