"""Preprocessing equals what each source library does for its checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from prisma_lightning.backbones import convert_model, load_hooked_model
from prisma_lightning.backbones.transforms import PreprocessConfig, build_transform


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))


def test_timm_eval_transform_matches(image) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    source = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", pretrained=False)
    hooked = convert_model(source)
    expected = create_transform(**resolve_data_config({}, model=source))(image)
    assert_close(hooked.preprocess()(image), expected, atol=1e-5, rtol=0)
    assert hooked.preprocess_config().resize == 248  # 224 / crop_pct 0.9


def test_open_clip_transform_matches(image) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg()
    expected = image_transform_v2(cfg, is_train=False)(image)
    ours = build_transform(PreprocessConfig.from_open_clip(cfg))(image)
    assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "processor_name, family_model",
    [("CLIPImageProcessor", "clip"), ("ViTImageProcessor", "vit"), ("BitImageProcessor", "dinov2")],
)
def test_hf_image_processors_match(image, processor_name: str, family_model: str) -> None:
    import transformers

    from prisma_lightning.backbones.convert.from_transformers import DEFAULT_PROCESSORS

    kwargs = dict(DEFAULT_PROCESSORS[family_model])
    processor = getattr(transformers, processor_name)(**kwargs)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours = build_transform(PreprocessConfig.from_hf_processor(processor))(image)
    assert ours.shape == expected.shape
    # PIL resampling is shared; Hugging Face rescales in float32 numpy, so allow float rounding.
    assert_close(ours, expected, atol=2e-2, rtol=0)
    assert (ours - expected).abs().mean() < 2e-3


def test_video_clip_transform_normalises_every_frame() -> None:
    cfg = PreprocessConfig(resize=36, crop_size=(32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    clip = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    out = build_transform(cfg)(clip)
    assert out.shape == (4, 3, 32, 32)
    frame = build_transform(cfg)(clip[2])
    assert_close(out[2], frame)
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-6 and out.max() <= (1 - 0.5) / 0.25 + 1e-6


def test_video_model_preprocess_takes_clips() -> None:
    model = load_hooked_model("test/video-tiny", pretrained=False)
    clip = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    batch = model.preprocess()(clip)[None]
    assert batch.shape == (1, 4, 3, 16, 16)
    assert torch.isfinite(model(batch)).all()


def test_train_transform_random_crop_has_crop_size(image) -> None:
    cfg = PreprocessConfig(resize=256, crop_size=(224, 224))
    out = build_transform(cfg, train=True)(image)
    assert out.shape == (3, 224, 224)


def test_preprocess_config_validation() -> None:
    with pytest.raises(ValueError, match="interpolation must be"):
        PreprocessConfig(interpolation="lanczos")
    with pytest.raises(ValueError, match="Unknown PreprocessConfig fields"):
        PreprocessConfig.from_dict({"size": 3})
