"""Activation pipeline: token selection, the online mixing buffer, and on-disk activation shards."""

from prisma_lightning.activations.buffer import MixingBuffer
from prisma_lightning.activations.shards import ActivationShards, ShardWriter, hook_folder, read_index
from prisma_lightning.activations.tokens import Tokens, select_tokens, tokens_per_image

__all__ = [
    "ActivationShards",
    "MixingBuffer",
    "ShardWriter",
    "Tokens",
    "hook_folder",
    "read_index",
    "select_tokens",
    "tokens_per_image",
]
