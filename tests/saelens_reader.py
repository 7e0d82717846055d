"""SAELens 6.54's folder loader, restated field by field from ``tests/fixtures/saelens/LOADER.md``.

Independent of prisma-lightning's reader: it reads a folder the way ``SAE.load_from_disk`` does (version check,
pre-6.0 conversion, dataclass-field filter, strict tensor names, inference normalisation, each class's encode and
decode), so a test can check that what we write is what SAELens computes. SAELens itself is not installed; the
fixtures in ``tests/fixtures/saelens`` pin this restatement to SAELens's real outputs (``test_interop.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

INFERENCE_FIELDS = {
    "standard": {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                 "reshape_activations", "metadata"},
    "topk": {"k", "rescale_acts_by_decoder_norm"},
    "jumprelu": set(),
    "gated": set(),
    "transcoder": {"d_out"},
    "skip_transcoder": {"d_out"},
    "jumprelu_transcoder": {"d_out"},
    "jumprelu_skip_transcoder": {"d_out"},
}  # fmt: skip
TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    "transcoder": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"},
    "jumprelu_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "jumprelu_skip_transcoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"},
}
NORMS = {"none", "expected_average_only_in", "constant_norm_rescale", "layer_norm", "covariance_whitening"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NotLoadable(Exception):
    """What SAELens would raise (KeyError, ValueError, RuntimeError of a strict load_state_dict)."""


@dataclass
class SAELensSAE:
    cfg: dict
    tensors: dict[str, Tensor]

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]

    @property
    def transcoder(self) -> bool:
        return "transcoder" in self.architecture

    def _norm_in(self, x: Tensor) -> tuple[Tensor, tuple]:
        mode = self.cfg.get("normalize_activations", "none")
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)
            return xc / (std + 1e-5), ("ln", mu, std)
        if mode == "constant_norm_rescale":
            c = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
            return x * c, ("cnr", c)
        return x, ("id",)

    @staticmethod
    def _norm_out(y: Tensor, stats: tuple) -> Tensor:
        if stats[0] == "ln":
            return y * stats[2] + stats[1]
        if stats[0] == "cnr":
            return y / stats[1]
        return y

    def encode(self, x: Tensor) -> tuple[Tensor, tuple]:
        t = self.tensors
        sae_in, stats = self._norm_in(x)
        if not self.transcoder and self.cfg.get("apply_b_dec_to_input", True):
            sae_in = sae_in - t["b_dec"]
        arch = self.architecture
        if arch == "gated":
            gate = (sae_in @ t["W_enc"] + t["b_gate"] > 0).to(x.dtype)
            return gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]), stats
        h = sae_in @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            if self.cfg.get("rescale_acts_by_decoder_norm", False):
                h = h * t["W_dec"].norm(dim=-1)
            values, idx = torch.topk(h, int(self.cfg.get("k", 100)), dim=-1)
            return torch.zeros_like(h).scatter(-1, idx, values.relu()), stats
        if "jumprelu" in arch:
            return torch.relu(h) * (h > t["threshold"]).to(h.dtype), stats
        return torch.relu(h), stats

    def decode(self, f: Tensor, stats: tuple) -> Tensor:
        t = self.tensors
        if self.architecture == "topk" and self.cfg.get("rescale_acts_by_decoder_norm", False):
            f = f / t["W_dec"].norm(dim=-1)
        y = f @ t["W_dec"] + t["b_dec"]
        return y if self.transcoder else self._norm_out(y, stats)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features, output) of SAELens's ``forward`` (skip transcoders add ``x @ W_skip.T``)."""
        feats, stats = self.encode(x)
        out = self.decode(feats, stats)
        if "skip" in self.architecture:
            out = out + x @ self.tensors["W_skip"].T
        return feats, out


def load_from_disk(folder: str | Path) -> SAELensSAE:
    """``SAE.load_from_disk(folder)`` of SAELens 6.54, restated (see the module docstring)."""
    folder = Path(folder)
    raw = json.loads((folder / "cfg.json").read_text())
    if "dtype" not in raw:
        raise NotLoadable("KeyError: 'dtype'")
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if not version or int(str(version).split(".")[0]) < 6:
        raise NotLoadable(f"no sae_lens_version >= 6 ({version!r}): SAELens takes its pre-6.0 conversion path")
    arch = raw.get("architecture")
    if arch not in INFERENCE_FIELDS:
        raise NotLoadable(f"KeyError: architecture {arch!r} is not an inference architecture")
    fields = INFERENCE_FIELDS["standard"] | INFERENCE_FIELDS[arch]
    cfg = {k: v for k, v in raw.items() if k in fields}  # every other key is ignored
    cfg["architecture"] = arch
    if cfg.get("normalize_activations", "none") not in NORMS:
        raise NotLoadable(f"ValueError: normalize_activations={cfg.get('normalize_activations')!r}")
    if "transcoder" in arch and cfg.get("apply_b_dec_to_input", True):
        raise NotLoadable("ValueError: apply_b_dec_to_input is not supported for transcoders")
    dtype = DTYPES[str(cfg["dtype"]).removeprefix("torch.")]
    tensors = {k: v.to(dtype) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    if set(tensors) != TENSORS[arch]:
        raise NotLoadable(f"RuntimeError: load_state_dict keys {sorted(tensors)} != {sorted(TENSORS[arch])}")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    d_out = cfg.get("d_out", 768) if "transcoder" in arch else d_in
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    for name, value in tensors.items():
        expected = shapes.get(name, (d_sae,))
        if tuple(value.shape) != expected:
            raise NotLoadable(f"RuntimeError: size mismatch for {name}: {tuple(value.shape)} vs {expected}")
    return SAELensSAE(cfg, tensors)
