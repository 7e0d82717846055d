"""`Transcoder`: a sparse code read at one hook that reconstructs the activations at another, for any architecture.

A transcoder replaces a component (typically an MLP: ``blocks.{i}.ln2.hook_normalized -> blocks.{i}.hook_mlp_out``)
with a sparse, interpretable map. ``Transcoder(TranscoderConfig(architecture=..., ...))`` returns the registered
architecture's class extended by this mixin (``TopKTranscoder``, ``JumpReLUTranscoder``, ...). The differences from
an SAE:

* ``W_dec [d_sae, d_out]`` and ``b_dec [d_out]`` live in the output space; ``d_out`` defaults to ``d_in``.
* ``forward(x_in, x_out_target)`` scores the reconstruction against the target activations.
* optional skip connection ``W_skip [d_in, d_out]`` (zero at initialisation): ``out = decode(f) + x_in @ W_skip``.
* with ``apply_b_dec_to_input`` a separate input bias ``b_in [d_in]`` centres the input (ViT-Prisma's ``b_dec``).
* ``expected_norm`` keeps separate input and output factors; ``layer_norm`` standardises with the *input*'s
  per-token statistics and un-standardises the output with them (ViT-Prisma's convention).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .config import SAEConfig, TranscoderConfig
from .sparse_autoencoder import SAEOutput, SparseAutoencoder

_CLASSES: dict[type, type] = {}


def transcoder_class(arch_class: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """The transcoder version of a registered architecture class (built once)."""
    if issubclass(arch_class, Transcoder):
        return arch_class
    cls = _CLASSES.get(arch_class)
    if cls is None:
        name = arch_class.__name__.removesuffix("SAE") + "Transcoder"
        cls = type(name, (Transcoder, arch_class), {"__module__": __name__, "__qualname__": name})
        _CLASSES[arch_class] = cls
        setattr(sys.modules[__name__], name, cls)  # importable by name
    return cls


class Transcoder(SparseAutoencoder):
    """Sparse map from ``hook_name`` activations ``[..., d_in]`` to ``hook_name_out`` activations ``[..., d_out]``."""

    def __new__(cls, cfg: SAEConfig | None = None, *args: Any, **kwargs: Any) -> Transcoder:
        if cfg is not None and not isinstance(cfg, TranscoderConfig):
            raise TypeError(
                f"Transcoder needs a TranscoderConfig (it has d_out and skip_connection), got {type(cfg).__name__}."
            )
        if cfg is not None and cls is Transcoder:
            return SparseAutoencoder.__new__(transcoder_class(registry.architecture_class(cfg.architecture)), cfg)
        return SparseAutoencoder.__new__(cls, cfg)

    @property
    def is_transcoder(self) -> bool:
        return True

    def _output_width(self) -> int:
        return int(self.cfg.d_out)  # type: ignore[attr-defined]

    def _build_extra(self, kw: dict[str, Any]) -> None:
        if self.cfg.skip_connection:  # type: ignore[attr-defined]
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, **kw))
        if self.cfg.apply_b_dec_to_input:
            self.b_in = nn.Parameter(torch.zeros(self.d_in, **kw))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        for name in ("W_skip", "b_in"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    def _input_bias(self) -> Tensor | None:
        return self.b_in if self.cfg.apply_b_dec_to_input else None

    def _skip(self, x_n: Tensor) -> Tensor | None:
        return x_n @ self.W_skip if self.cfg.skip_connection else None  # type: ignore[attr-defined]

    def forward(  # type: ignore[override]
        self, x_in: Tensor, x_out_target: Tensor, step: int | None = None, *, return_feats: bool = True
    ) -> SAEOutput:
        """Encode ``x_in [..., d_in]``, reconstruct ``x_out_target [..., d_out]``; see ``SparseAutoencoder.forward``."""
        return self._forward(x_in, x_out_target, step, return_feats)

    def decode(self, feats: Tensor, x_in: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Output ``[..., d_out]`` from ``feats``; the skip path is added when ``x_in`` is given."""
        if x_in is None or not self.cfg.skip_connection:  # type: ignore[attr-defined]
            return super().decode(feats)
        lead = feats.shape[:-1]
        x_n, stats = self._normalize_input(self._rows(x_in, self.d_in, "x_in"))
        out = self.decode_rows(self._rows(feats, self.d_sae, "feats")) + self._skip(x_n)
        return self._denormalize(out, stats).reshape(*lead, self.d_out)

    @torch.no_grad()
    def fit_normalization(self, x_sample: Tensor, x_out_sample: Tensor | None = None) -> float:  # type: ignore[override]
        """Fit the ``expected_norm`` factors of input and output (``x_out_sample``); returns the input's factor."""
        if x_out_sample is None:
            raise ValueError("A transcoder normalises its input and output separately: pass x_out_sample too.")
        scale_in = self._norm_factor(self._rows(x_sample, self.d_in, "x_sample"))
        scale_out = self._norm_factor(self._rows(x_out_sample, self.d_out, "x_out_sample"))
        self.norm_scale_in.fill_(scale_in)
        self.norm_scale_out.fill_(scale_out)
        self._norm_fitted = True
        return scale_in

    def _fold_input_bias(self, s_in: Tensor, s_out: Tensor) -> None:
        if self.cfg.apply_b_dec_to_input:
            self.b_in.div_(s_in)
        if self.cfg.skip_connection:  # type: ignore[attr-defined]
            self.W_skip.mul_(s_in / s_out)

    @torch.no_grad()
    def initialize_b_dec(self, x_sample: Tensor, x_in_sample: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Set ``b_dec`` from a sample of *target* activations ``[..., d_out]`` (``x_in_sample`` for layer_norm)."""
        y = self._rows(x_sample, self.d_out, "x_sample")
        stats = None
        if self.cfg.normalize_activations == "layer_norm":
            if x_in_sample is None:
                raise ValueError("A layer_norm transcoder normalises targets with input statistics: pass x_in_sample.")
            stats = self._normalize_input(self._rows(x_in_sample, self.d_in, "x_in_sample"))[1]
        elif self.cfg.normalize_activations == "expected_norm":
            self._check_fitted()
        return self._set_b_dec(self._normalize_target(y, stats))

    def file_tensors(self) -> dict[str, Tensor]:
        """SAELens' transcoder tensors: the input bias is folded into ``b_enc`` (``(x - b_in) W + b = x W + (b -
        b_in W)``; SAELens transcoders have no input bias) and ``W_skip`` is stored ``[d_out, d_in]``."""
        tensors = super().file_tensors()
        if hasattr(self, "b_in") and "b_enc" in tensors:
            tensors["b_enc"] = torch.addmv(self.b_enc, self.W_enc.t(), self.b_in, alpha=-1)
        if hasattr(self, "W_skip"):
            tensors["W_skip"] = self.W_skip.t()
        return tensors

    @torch.no_grad()
    def load_file_tensor(self, name: str, value: Tensor, file: Any) -> None:
        if name == "W_skip":
            self.W_skip.copy_(value.t())
            return
        super().load_file_tensor(name, value, file)
        if name == "b_enc" and hasattr(self, "b_in"):
            self.b_in.zero_()  # the file's b_enc holds the input bias already

    def saelens_fields(self) -> dict[str, Any]:
        fields = super().saelens_fields()
        skip = bool(self.cfg.skip_connection)  # type: ignore[attr-defined]
        names = {"standard": "skip_transcoder" if skip else "transcoder",
                 "jumprelu": "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"}  # fmt: skip
        fields["architecture"] = names.get(fields["architecture"], f"{self.cfg.architecture}_transcoder")
        fields["d_out"] = self.d_out
        fields["hook_name_out"] = self.cfg.hook_name_out
        return fields


def __getattr__(name: str) -> Any:  # e.g. TopKTranscoder, built on first use
    if name.endswith("Transcoder"):
        for arch in registry.architecture_names():
            cls = registry.architecture_class(arch)
            if cls.__name__.removesuffix("SAE") + "Transcoder" == name:
                return transcoder_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
