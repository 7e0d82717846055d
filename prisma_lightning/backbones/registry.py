"""One way in: ``load_hooked_model(name)`` resolves a registry name to a HookedViT.

Every entry keeps the exact architecture of its checkpoint, so ``pretrained=False`` builds it offline with
random weights (the source library's model is built on the ``meta`` device only to read its structure).
``pretrained=True`` downloads weights through the source library and converts them.

Names:
- ``test/...``: tiny architectures for tests and examples (no published weights).
- ``timm/<architecture>[.<tag>]``: any timm ViT (timm knows every architecture offline).
- Hugging Face repo ids (``openai/clip-vit-base-patch32``, ``facebook/dinov2-small``, ...): transformers.
- ``open-clip:<hub repo>``: open_clip checkpoints on the Hugging Face Hub.
- a local folder: written by ``HookedViT.save_pretrained``, by a transformers ``save_pretrained`` (it has
  ``config.json`` with a ``model_type``), or an open_clip checkpoint folder (``open_clip_config.json``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig

if TYPE_CHECKING:
    from prisma_lightning.backbones.hooked_vit import HookedViT

Source = Literal["test", "timm", "transformers", "open_clip"]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: where a name's weights come from and its exact architecture."""

    name: str
    source: Source
    arch: dict[str, Any] = field(default_factory=dict)
    """Source-specific architecture: a HookedViTConfig (test), a timm model name, transformers class + config
    kwargs, or an open_clip architecture name and hub repo."""
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add (or replace) a registry entry."""
    _REGISTRY[spec.name] = spec


# ---------------------------------------------------------------------------------------------- entries
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
    "test/video-tiny": HookedViTConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        image_size=16,
        patch_size=4,
        num_frames=4,
        tubelet_size=2,
        class_token=False,
        pos_embed="sincos",
        pos_embed_prefix_tokens=0,
        qkv_bias="qv",
        final_norm=False,
        fc_norm=True,
        pool="mean",
        n_classes=4,
        model_name="test/video-tiny",
    ),  # fmt: skip
}
for _name, _cfg in TEST_CONFIGS.items():
    register_model(ModelSpec(_name, "test", {"config": _cfg}, "tiny random architecture for tests"))

for _timm_name in (
    "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_small_patch16_224.augreg_in21k",
    "vit_base_patch14_reg4_dinov2.lvd142m",
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
):
    register_model(ModelSpec(f"timm/{_timm_name}", "timm", {"model": _timm_name}, "timm VisionTransformer"))

_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 patch_size=14, projection_dim=768)  # fmt: skip
_HF_ENTRIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    # name: (class to load the checkpoint with, class for the offline architecture, config class, config kwargs)
    "openai/clip-vit-base-patch32": ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                     dict(patch_size=32, projection_dim=512)),
    "openai/clip-vit-base-patch16": ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionConfig",
                                     dict(patch_size=16, projection_dim=512)),
    "openai/clip-vit-large-patch14": ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionConfig", _CLIP_L14),
    "facebook/dino-vitb16": ("ViTModel", "ViTModel", "ViTConfig", dict(qkv_bias=True)),
    "facebook/dinov2-small": ("Dinov2Model", "Dinov2Model", "Dinov2Config",
                              dict(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14)),
    "facebook/dinov2-base": ("Dinov2Model", "Dinov2Model", "Dinov2Config",
                             dict(hidden_size=768, num_attention_heads=12, image_size=518, patch_size=14)),
    "facebook/dinov2-with-registers-small": ("Dinov2WithRegistersModel", "Dinov2WithRegistersModel",
                                             "Dinov2WithRegistersConfig",
                                             dict(hidden_size=384, num_attention_heads=6, image_size=518,
                                                  patch_size=14, num_register_tokens=4)),
    "google/siglip-base-patch16-224": ("SiglipVisionModel", "SiglipVisionModel", "SiglipVisionConfig", dict()),
    "google/vivit-b-16x2-kinetics400": ("VivitForVideoClassification", "VivitForVideoClassification",
                                        "VivitConfig", dict(num_labels=400)),
    "MCG-NJU/videomae-base": ("VideoMAEModel", "VideoMAEModel", "VideoMAEConfig", dict(use_mean_pooling=False)),
    "MCG-NJU/videomae-base-finetuned-kinetics": ("VideoMAEForVideoClassification", "VideoMAEForVideoClassification",
                                                 "VideoMAEConfig", dict(use_mean_pooling=True, num_labels=400)),
}  # fmt: skip
for _name, (_load_cls, _arch_cls, _config_cls, _kwargs) in _HF_ENTRIES.items():
    register_model(
        ModelSpec(_name, "transformers", {"load_class": _load_cls, "arch_class": _arch_cls,
                                          "config_class": _config_cls, "config": _kwargs}, "transformers")
    )  # fmt: skip

_OPEN_CLIP_ENTRIES = {
    "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K": "ViT-B-32",
    "open-clip:laion/CLIP-ViT-B-16-laion2B-s34B-b88K": "ViT-B-16",
    "open-clip:timm/vit_base_patch16_clip_224.openai": "ViT-B-16-quickgelu",
}
for _name, _arch in _OPEN_CLIP_ENTRIES.items():
    register_model(ModelSpec(_name, "open_clip", {"architecture": _arch, "repo": _name.split(":", 1)[1]}, "open_clip"))


# ---------------------------------------------------------------------------------------------- builders
def _offline_error(name: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"Could not fetch the weights of {name!r}: {err}. Without network (or with HF_HUB_OFFLINE=1) the files "
        f"must already be in the Hugging Face cache: download them where there is network "
        f"(`hf download {name.removeprefix('open-clip:')}`) and copy the cache, "
        "pass a local folder written by the source library's save_pretrained, or use pretrained=False for "
        "random weights."
    )


def source_architecture(name: str) -> nn.Module:
    """The source library's model for ``name`` built on the ``meta`` device (structure only, no memory)."""
    spec = _spec(name)
    arch = spec.arch
    if spec.source == "timm":
        import timm

        with torch.device("meta"):
            return timm.create_model(arch["model"], pretrained=False)
    if spec.source == "transformers":
        import transformers

        config = getattr(transformers, arch["config_class"])(**arch["config"])
        with torch.device("meta"):
            return getattr(transformers, arch["arch_class"])(config)
    if spec.source == "open_clip":
        import open_clip
        from open_clip.model import _build_vision_tower

        cfg = open_clip.get_model_config(arch["architecture"])
        with torch.device("meta"):
            return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    raise ValueError(f"{name!r} is a test architecture with no source model.")


def hooked_config(name: str) -> HookedViTConfig:
    """The exact HookedViTConfig of a registry name, derived offline."""
    spec = _spec(name)
    if spec.source == "test":
        return HookedViTConfig.from_dict(spec.arch["config"].to_dict())
    source = source_architecture(name)
    if spec.source == "timm":
        from prisma_lightning.backbones.convert.from_timm import timm_config

        cfg = timm_config(source)
    elif spec.source == "transformers":
        from prisma_lightning.backbones.convert.from_transformers import hf_hooked_config

        cfg = hf_hooked_config(source)
    else:
        from prisma_lightning.backbones.convert.from_open_clip import open_clip_config

        cfg = open_clip_config(source)
    cfg.model_name = name
    return cfg


def _load_pretrained(spec: ModelSpec) -> HookedViT:
    from prisma_lightning.backbones.convert import convert_model

    arch = spec.arch
    if spec.source == "timm":
        import timm

        try:
            source = timm.create_model(arch["model"], pretrained=True)
        except (OSError, RuntimeError) as err:
            raise _offline_error(spec.name, err) from err
        return convert_model(source)
    if spec.source == "transformers":
        return _load_transformers(spec.name, arch["load_class"])
    if spec.source == "open_clip":
        return _load_open_clip(f"hf-hub:{arch['repo']}", spec.name)
    raise ValueError(f"{spec.name!r} is an architecture without published weights; use pretrained=False.")


def _load_transformers(name_or_dir: str, class_name: str) -> HookedViT:
    import transformers

    from prisma_lightning.backbones.convert import convert_model

    try:
        source = getattr(transformers, class_name).from_pretrained(name_or_dir)
    except OSError as err:
        raise _offline_error(name_or_dir, err) from err
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: the family default is used
    model = convert_model(source, image_processor=processor)
    model.cfg.model_name = str(name_or_dir)
    return model


def _load_open_clip(identifier: str, name: str) -> HookedViT:
    import open_clip

    from prisma_lightning.backbones.convert import convert_model

    try:
        source = open_clip.create_model(identifier)
    except (OSError, RuntimeError) as err:
        raise _offline_error(name, err) from err
    model = convert_model(source)
    model.cfg.model_name = name
    return model


def _load_directory(path: Path) -> HookedViT:
    config_file = path / "config.json"
    if (path / "open_clip_config.json").is_file():
        return _load_open_clip(f"local-dir:{path}", str(path))
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json (HookedViT or transformers) or open_clip_config.json (open_clip)."
        )
    config = json.loads(config_file.read_text())
    if "model_type" in config:
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError(f"{config_file} does not name its model class ('architectures'); cannot load it.")
        return _load_transformers(str(path), architectures[0])
    from prisma_lightning.backbones.hooked_vit import HookedViT

    return HookedViT.from_pretrained(path)


def _spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return ModelSpec(name, "timm", {"model": name.removeprefix("timm/")})
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    raise KeyError(
        f"Unknown model name {name!r}. Closest registered names: {close}. "
        "See prisma_lightning.list_models(), use 'timm/<name>' for any timm ViT, or pass a saved folder."
    )


# ---------------------------------------------------------------------------------------------- public API
def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, optionally filtered by a shell-style pattern (``"facebook/*"``).

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
    """Build the HookedViT called ``name`` (see the module docstring for the kinds of names), in eval mode.

    ``pretrained=False`` builds the exact architecture with random weights, offline. A name with no cached
    weights and no network raises ``FileNotFoundError`` saying what to download and how to provide it.
    """
    from prisma_lightning.backbones.hooked_vit import HookedViT

    path = Path(name)
    if name not in _REGISTRY and path.is_dir():
        model = _load_directory(path)
    elif pretrained:
        model = _load_pretrained(_spec(name))
    else:
        model = HookedViT(hooked_config(name))
    return model.to(device=device, dtype=dtype).eval()
