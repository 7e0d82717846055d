"""Sparse autoencoders and transcoders: a registry of architectures, configs, sparse kernels, file formats and the
training step.

Everything here is a function on tensors: this package imports only torch, safetensors and the standard
library (huggingface_hub lazily, for ``from_pretrained``), and never the backbones. Each architecture is one file in
``architectures/`` registered by name (:func:`register_architecture`); ``SAEConfig(architecture=...)`` and
``SparseAutoencoder(cfg)`` dispatch through the registry.
"""

from __future__ import annotations

from . import architectures  # noqa: F401  (registers the built-in architectures)
from .architectures.archetypal import ArchetypalConfig, ArchetypalSAE
from .architectures.batchtopk import BatchTopKConfig, BatchTopKSAE
from .architectures.gated import GatedConfig, GatedSAE
from .architectures.jumprelu import JumpReLUConfig, JumpReLUSAE
from .architectures.matching_pursuit import MatchingPursuitConfig, MatchingPursuitSAE
from .architectures.matryoshka import MatryoshkaBatchTopKConfig, MatryoshkaBatchTopKSAE
from .architectures.panneal import PAnnealConfig, PAnnealSAE
from .architectures.relu import ReLUConfig, ReLUSAE
from .architectures.topk import TopKConfig, TopKSAE
from .config import SAEConfig, TranscoderConfig, transcoder_config_union
from .init import GeometricMedian, geometric_median
from .io import load_sae, load_sparsity, sae_from_pretrained, save_sae, save_sparsity
from .registry import (
    architecture_class,
    architecture_names,
    config_class,
    config_union,
    register_architecture,
)
from .sparse_autoencoder import Pass, SAEOutput, SparseAutoencoder, SparseCodes
from .sparse_ops import SparsePattern, sparse_decode, sparse_encode
from .training import make_optimizer, train_step
from .transcoder import Transcoder

ARCHITECTURES: tuple[str, ...] = architecture_names()
"""The built-in architecture names (``architecture_names()`` also lists architectures registered later)."""

__all__ = [
    "ARCHITECTURES",
    "ArchetypalConfig",
    "ArchetypalSAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "GeometricMedian",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatchingPursuitConfig",
    "MatchingPursuitSAE",
    "MatryoshkaBatchTopKConfig",
    "MatryoshkaBatchTopKSAE",
    "PAnnealConfig",
    "PAnnealSAE",
    "Pass",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCodes",
    "SparsePattern",
    "TopKConfig",
    "TopKSAE",
    "Transcoder",
    "TranscoderConfig",
    "architecture_class",
    "architecture_names",
    "config_class",
    "config_union",
    "geometric_median",
    "load_sae",
    "load_sparsity",
    "make_optimizer",
    "register_architecture",
    "sae_from_pretrained",
    "save_sae",
    "save_sparsity",
    "sparse_decode",
    "sparse_encode",
    "train_step",
    "transcoder_config_union",
]
