"""`convert_model(source) -> HookedViT`: dispatch on the source model's library and class.

One file per source library; each registers the classes it converts. Heavy libraries are imported only
inside the converter that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prisma_lightning.backbones.hooked_vit import HookedViT

# (library module prefix, class name) -> "module:function" converting such an object.
_CONVERTERS: dict[tuple[str, str], str] = {
    ("timm", "VisionTransformer"): "from_timm:convert_timm_vit",
    ("open_clip", "VisionTransformer"): "from_open_clip:convert_open_clip_vit",
    **{("open_clip", name): "from_open_clip:convert_open_clip_model" for name in ("CLIP", "CustomTextCLIP", "CoCa")},
    **{
        ("transformers", name): "from_transformers:convert_hf_vit"
        for name in (
            "ViTModel",
            "ViTForImageClassification",
            "Dinov2Model",
            "Dinov2WithRegistersModel",
            "CLIPVisionModel",
            "CLIPVisionModelWithProjection",
            "CLIPModel",
            "SiglipVisionModel",
            "SiglipModel",
            "VivitModel",
            "VivitForVideoClassification",
            "VideoMAEModel",
            "VideoMAEForVideoClassification",
        )
    },
}


def supported_sources() -> list[str]:
    """Human-readable list of the classes ``convert_model`` accepts."""
    return sorted(f"{lib}.{cls}" for lib, cls in _CONVERTERS)


def _resolve(target: str) -> Callable[[Any], HookedViT]:
    import importlib

    module_name, func = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, func)


def convert_model(source: Any, image_processor: Any = None) -> HookedViT:
    """Convert a model object from timm / Hugging Face / open_clip into an equivalent :class:`HookedViT`.

    Exact in float32; the result is in eval mode on the source's device and dtype, and records the source's
    preprocessing (``model.preprocess()``). Hugging Face models keep their preprocessing in a separate image
    processor: pass it (or its dict) as ``image_processor``, otherwise the family's published default is used.
    Raises ``TypeError`` for unsupported objects.
    """
    for cls in type(source).__mro__:
        library = cls.__module__.split(".")[0]
        target = _CONVERTERS.get((library, cls.__name__))
        if target is not None:
            model = _resolve(target)(source)
            if image_processor is not None:
                from prisma_lightning.backbones.transforms import PreprocessConfig

                model.cfg.preprocess = PreprocessConfig.from_hf_processor(image_processor).to_dict()
            param = next(source.parameters(), None)
            if param is not None:
                model = model.to(device=param.device, dtype=param.dtype)
            return model.eval()
    raise TypeError(
        f"convert_model does not support {type(source).__module__}.{type(source).__qualname__}. "
        f"Supported: {', '.join(supported_sources())}."
    )


__all__ = ["convert_model", "supported_sources"]
