"""Sparse autoencoders and transcoders: configs, modules, sparse kernels, file formats and the training step.

Everything here is a function on tensors: this package imports only torch, safetensors and the standard
library (huggingface_hub lazily, for ``from_pretrained``), and never the backbones.
"""

from __future__ import annotations

from .config import ARCHITECTURES, SAEConfig, TranscoderConfig
from .init import GeometricMedian, geometric_median
from .io import load_sae, load_sparsity, sae_from_pretrained, save_sae, save_sparsity
from .sparse_autoencoder import SAEOutput, SparseAutoencoder, SparseCodes
from .sparse_ops import SparsePattern, sparse_decode, sparse_encode
from .training import make_optimizer, train_step
from .transcoder import Transcoder

__all__ = [
    "ARCHITECTURES",
    "GeometricMedian",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCodes",
    "SparsePattern",
    "Transcoder",
    "TranscoderConfig",
    "geometric_median",
    "load_sae",
    "load_sparsity",
    "make_optimizer",
    "sae_from_pretrained",
    "save_sae",
    "save_sparsity",
    "sparse_decode",
    "sparse_encode",
    "train_step",
]
