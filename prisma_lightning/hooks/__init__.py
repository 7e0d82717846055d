"""Hook core: named hook points, scoped hooks and activation caches (no model code here)."""

from prisma_lightning.hooks.activation_cache import ActivationCache, act_name
from prisma_lightning.hooks.hook_point import HookHandle, HookPoint
from prisma_lightning.hooks.hooked_module import HookedModule
from prisma_lightning.hooks.protocol import HookedModel, ResidComponent, ResidNorm, ResidualStreamModel

__all__ = [
    "ActivationCache",
    "HookHandle",
    "HookPoint",
    "HookedModel",
    "HookedModule",
    "ResidComponent",
    "ResidNorm",
    "ResidualStreamModel",
    "act_name",
]
