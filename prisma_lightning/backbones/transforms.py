"""Preprocessing: the exact resize / crop / normalisation each source library uses for its checkpoints.

A :class:`PreprocessConfig` is derived from the source's own config (timm's data config, open_clip's
``preprocess_cfg``, a Hugging Face image processor) and stored in ``HookedViTConfig.preprocess``, so a saved
HookedViT preprocesses exactly like its source. ``build_transform`` turns it into a torchvision v2 transform
that takes a PIL image / ``[C, H, W]`` tensor, or a video clip ``[T, C, H, W]`` uint8 tensor.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Interpolation = Literal["nearest", "bilinear", "bicubic"]
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # Hugging Face stores PIL resample codes


@dataclass
class PreprocessConfig:
    """Eval-time preprocessing: resize, centre crop, rescale to [0, 1] (or [-1, 1]), normalise."""

    resize: int | tuple[int, int] | None = 224
    """An int resizes the shorter side to it (aspect kept); a pair resizes to exactly (height, width)."""
    crop_size: tuple[int, int] | None = (224, 224)
    """Centre crop (height, width) after resizing; None for no crop."""
    interpolation: Interpolation = "bicubic"
    """Resampling filter of the resize."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after rescaling."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after subtracting the mean."""
    rescale_offset: bool = False
    """Rescale pixels to [-1, 1] instead of [0, 1] before normalising (ViViT's image processor)."""
    antialias: bool = True
    """Antialias when downsampling tensors (PIL images are always antialiased)."""

    def __post_init__(self) -> None:
        if isinstance(self.resize, list):
            self.resize = tuple(self.resize)
        if self.crop_size is not None:
            self.crop_size = (
                (self.crop_size, self.crop_size) if isinstance(self.crop_size, int) else tuple(self.crop_size)
            )
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"interpolation must be nearest, bilinear or bicubic, got {self.interpolation!r}.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}.")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("resize", "crop_size", "mean", "std"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown PreprocessConfig fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    # ------------------------------------------------------------------ from source configs
    @classmethod
    def from_timm_data_config(cls, data_config: dict[str, Any]) -> PreprocessConfig:
        """From ``timm.data.resolve_data_config({}, model=model)`` (centre crop at ``crop_pct``)."""
        _, h, w = data_config["input_size"]
        crop_pct = data_config.get("crop_pct", 1.0)
        if data_config.get("crop_mode", "center") not in ("center", "squash", "border"):
            raise ValueError(f"Unsupported timm crop_mode {data_config['crop_mode']!r}.")
        if data_config.get("crop_mode") == "squash":
            resize: int | tuple[int, int] = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        else:
            resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
        return cls(resize=resize, crop_size=(h, w), interpolation=data_config.get("interpolation", "bicubic"),
                   mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))  # fmt: skip

    @classmethod
    def from_open_clip(cls, preprocess_cfg: Any) -> PreprocessConfig:
        """From open_clip's ``model.visual.preprocess_cfg`` (a dict or ``PreprocessCfg``)."""
        cfg = preprocess_cfg if isinstance(preprocess_cfg, dict) else dataclasses.asdict(preprocess_cfg)
        size = cfg.get("size", 224)
        size_hw = (size, size) if isinstance(size, int) else tuple(size)
        mode = cfg.get("resize_mode", "shortest")
        if mode == "squash":
            resize: int | tuple[int, int] = size_hw
        elif mode == "shortest":
            resize = size_hw[0] if size_hw[0] == size_hw[1] else size_hw
        else:
            raise ValueError(f"open_clip resize_mode {mode!r} is not supported (use 'shortest' or 'squash').")
        return cls(resize=resize, crop_size=size_hw, interpolation=cfg.get("interpolation", "bicubic"),
                   mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)))  # fmt: skip

    @classmethod
    def from_hf_processor(cls, processor: Any) -> PreprocessConfig:
        """From a Hugging Face image processor (object or its ``to_dict()``/``preprocessor_config.json``)."""
        cfg = processor if isinstance(processor, dict) else processor.to_dict()
        size = cfg.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            resize: int | tuple[int, int] | None = int(size["shortest_edge"])
        elif "height" in size:
            resize = (int(size["height"]), int(size["width"]))
        else:
            resize = None
        crop = cfg.get("crop_size") if cfg.get("do_center_crop", False) else None
        if isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            crop = (crop, crop)
        if crop is None and isinstance(resize, tuple):
            crop = resize
        resample = cfg.get("resample", 3)
        interpolation = _PIL_RESAMPLE.get(resample, resample if isinstance(resample, str) else "bicubic")
        normalize = cfg.get("do_normalize", True)
        return cls(
            resize=resize if cfg.get("do_resize", True) else None,
            crop_size=crop,
            interpolation=interpolation,
            mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(cfg.get("image_std", IMAGENET_STD)) if normalize else (1.0, 1.0, 1.0),
            rescale_offset=bool(cfg.get("offset", False)),
        )


def build_transform(cfg: PreprocessConfig, train: bool = False) -> Any:
    """torchvision v2 transform for images (PIL or ``[C, H, W]``) and clips (``[T, C, H, W]`` uint8 tensors).

    ``train=True`` replaces resize + centre crop by a random resized crop and a horizontal flip, the usual
    augmentation for fine-tuning and for SAE training data diversity.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(cfg.interpolation)
    steps: list[Any] = []
    # Geometry first: a PIL image is then resized by PIL, exactly as the source libraries do.
    if train:
        size = cfg.crop_size or (cfg.resize if isinstance(cfg.resize, tuple) else (cfg.resize, cfg.resize))
        steps += [v2.RandomResizedCrop(size, interpolation=mode, antialias=cfg.antialias), v2.RandomHorizontalFlip()]
    else:
        if cfg.resize is not None:
            steps.append(v2.Resize(cfg.resize, interpolation=mode, antialias=cfg.antialias))
        if cfg.crop_size is not None:
            steps.append(v2.CenterCrop(cfg.crop_size))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if cfg.rescale_offset:
        steps.append(v2.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))  # [0, 1] -> [-1, 1]
    steps.append(v2.Normalize(mean=cfg.mean, std=cfg.std))
    return v2.Compose(steps)
