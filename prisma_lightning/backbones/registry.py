"""One way in: ``load_hooked_model(name)`` resolves a registry name to a HookedViT.

Names:
- ``test/...``: tiny architectures for tests and examples (random weights, built offline).
- ``timm/<architecture>[.<tag>]``: any timm ViT; ``pretrained=False`` builds the architecture offline from
  timm's own config, ``pretrained=True`` downloads the weights through timm.
- a local folder written by ``HookedViT.save_pretrained``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prisma_lightning.backbones.config import HookedViTConfig

if TYPE_CHECKING:
    from prisma_lightning.backbones.hooked_vit import HookedViT


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a name with or without pretrained weights."""

    name: str
    build: Callable[[bool], HookedViT]
    """``build(pretrained) -> HookedViT``."""
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, build: Callable[[bool], HookedViT], description: str = "") -> None:
    """Add (or replace) a registry entry."""
    _REGISTRY[name] = ModelSpec(name, build, description)


def _from_config(cfg: HookedViTConfig) -> Callable[[bool], HookedViT]:
    def build(pretrained: bool) -> HookedViT:
        from prisma_lightning.backbones.hooked_vit import HookedViT

        if pretrained:
            raise ValueError(f"{cfg.model_name!r} is an architecture without published weights; use pretrained=False.")
        return HookedViT(cfg)

    return build


def _timm_builder(timm_name: str) -> Callable[[bool], HookedViT]:
    def build(pretrained: bool) -> HookedViT:
        import timm

        from prisma_lightning.backbones.convert import convert_model

        try:
            source = timm.create_model(timm_name, pretrained=pretrained)
        except RuntimeError as err:
            raise RuntimeError(f"timm could not build {timm_name!r} (pretrained={pretrained}): {err}") from err
        return convert_model(source)

    return build


TEST_CONFIGS: dict[str, HookedViTConfig] = {
    "test/vit-tiny": HookedViTConfig(
        d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4, n_classes=10, model_name="test/vit-tiny"
    ),
    "test/vit-tiny-reg": HookedViTConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        image_size=16,
        patch_size=4,
        n_classes=10,
        n_registers=2,
        layer_scale_init=0.1,
        ln_pre=True,
        act_fn="quick_gelu",
        model_name="test/vit-tiny-reg",
    ),  # fmt: skip
    "test/vit-tiny-gap": HookedViTConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        image_size=16,
        patch_size=4,
        n_classes=10,
        class_token=False,
        pool="mean",
        final_norm=False,
        fc_norm=True,
        model_name="test/vit-tiny-gap",
    ),  # fmt: skip
    "test/vit-tiny-attn-only": HookedViTConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        image_size=16,
        patch_size=4,
        n_classes=10,
        attn_only=True,
        model_name="test/vit-tiny-attn-only",
    ),  # fmt: skip
}
for _name, _cfg in TEST_CONFIGS.items():
    register_model(_name, _from_config(_cfg), "tiny random architecture for tests")

for _timm_name in (
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_small_patch16_224.augreg_in21k",
    "vit_base_patch14_reg4_dinov2.lvd142m",
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
):
    register_model(f"timm/{_timm_name}", _timm_builder(_timm_name), "timm VisionTransformer")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, optionally filtered by a shell-style pattern (``"timm/*"``).

    Any other ``timm/<name>`` that timm knows also loads, even if not listed here.
    """
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def load_hooked_model(
    name: str,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> HookedViT:
    """Build the HookedViT called ``name`` (see the module docstring for the kinds of names), in eval mode."""
    if name in _REGISTRY:
        model = _REGISTRY[name].build(pretrained)
    elif Path(name).is_dir():
        from prisma_lightning.backbones.hooked_vit import HookedViT

        model = HookedViT.from_pretrained(name)
    elif name.startswith("timm/"):
        model = _timm_builder(name.removeprefix("timm/"))(pretrained)
    else:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        raise KeyError(
            f"Unknown model name {name!r}. Closest registered names: {close}. "
            "See prisma_lightning.list_models(), use 'timm/<name>' for any timm ViT, or pass a saved folder."
        )
    return model.to(device=device, dtype=dtype).eval()
