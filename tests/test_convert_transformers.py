"""Hugging Face ViTModel / ViTForImageClassification -> HookedViT, exact in float32."""

from __future__ import annotations

import pytest
import torch
from helpers import capture_outputs, randomize_
from torch.testing import assert_close
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from prisma_lightning.backbones import convert_model

TINY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32, patch_size=8
)


def hf_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Encoder layers of any transformers vision model (5.x ``layers`` or ``encoder.layer(s)``)."""
    owner = getattr(model, "vit", model)
    for path in ("layers", "encoder.layers", "encoder.layer"):
        obj = owner
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise AttributeError(f"no encoder layers on {type(model).__name__}")


def run_both(source, images, **kwargs):
    source.eval()
    hooked = convert_model(source)
    layer_outputs, handles = capture_outputs(hf_layers(source))
    try:
        with torch.no_grad():
            expected = source(pixel_values=images, **kwargs)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out, cache = hooked.run_with_cache(
            images,
            names_filter=lambda n: n.endswith("hook_resid_post") or n == "ln_final.hook_normalized",
            interpolate_pos_encoding=kwargs.get("interpolate_pos_encoding"),
        )
    for i, layer_out in enumerate(layer_outputs):
        assert_close(cache[f"blocks.{i}.hook_resid_post"], layer_out, atol=1e-4, rtol=1e-4)
    return hooked, out, cache, expected


@pytest.mark.parametrize("pooler", [True, False])
@pytest.mark.parametrize("extra", [dict(), dict(qkv_bias=False, hidden_act="quick_gelu"), dict(hidden_act="gelu_new")])
def test_vit_model_matches(pooler: bool, extra: dict) -> None:
    source = randomize_(ViTModel(ViTConfig(**TINY, **extra), add_pooling_layer=pooler))
    images = torch.randn(3, 3, 32, 32)
    hooked, out, cache, expected = run_both(source, images)
    assert_close(cache["ln_final.hook_normalized"], expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    if pooler:
        assert_close(out, expected.pooler_output, atol=1e-4, rtol=1e-4)
    else:
        assert_close(out, expected.last_hidden_state[:, 0], atol=1e-4, rtol=1e-4)


def test_vit_for_image_classification_matches() -> None:
    source = randomize_(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    hooked, out, _, expected = run_both(source, torch.randn(2, 3, 32, 32))
    assert_close(out, expected.logits, atol=1e-4, rtol=1e-4)
    assert hooked.cfg.n_classes == 5


def test_vit_base_sized_classifier_matches() -> None:
    source = randomize_(ViTForImageClassification(ViTConfig(num_labels=10)))  # ViT-B/16 at 224 px
    hooked, out, _, expected = run_both(source, torch.randn(1, 3, 224, 224))
    assert_close(out, expected.logits, atol=1e-4, rtol=1e-4)
    assert hooked.cfg.layer_norm_eps == 1e-12


def test_interpolate_pos_encoding_matches_hf() -> None:
    source = randomize_(ViTForImageClassification(ViTConfig(**TINY, num_labels=5)))
    _, out, _, expected = run_both(source, torch.randn(2, 3, 48, 40), interpolate_pos_encoding=True)
    assert_close(out, expected.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- more families
def _get(model_cls_name: str, config_cls_name: str, **config_kwargs):
    import transformers

    config = getattr(transformers, config_cls_name)(**config_kwargs)
    return randomize_(getattr(transformers, model_cls_name)(config)).eval()


def _compare_family(source, inputs, expected_fn, layer_owner, final_hidden=None) -> None:
    hooked = convert_model(source)
    outputs, handles = capture_outputs(hf_layers(layer_owner))
    try:
        with torch.no_grad():
            expected = expected_fn(source, inputs)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out, cache = hooked.run_with_cache(inputs)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert len(outputs) == hooked.cfg.n_layers
    for i, layer_out in enumerate(outputs):
        assert_close(cache[f"blocks.{i}.hook_resid_post"], layer_out, atol=1e-4, rtol=1e-4)
    if final_hidden is not None:
        name, value = final_hidden(source, inputs, cache)
        assert_close(cache[name], value, atol=1e-4, rtol=1e-4)
    return hooked


CLIP_TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                 patch_size=8, projection_dim=24)  # fmt: skip


def _image_features(model, x):
    feats = model.get_image_features(pixel_values=x)
    return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


@pytest.mark.parametrize(
    "model_name, expected_fn",
    [
        ("CLIPVisionModel", lambda m, x: m(pixel_values=x).pooler_output),
        ("CLIPVisionModelWithProjection", lambda m, x: m(pixel_values=x).image_embeds),
    ],
)
def test_clip_vision_towers_match(model_name: str, expected_fn) -> None:
    source = _get(model_name, "CLIPVisionConfig", **CLIP_TINY)
    hooked = _compare_family(
        source,
        torch.randn(2, 3, 32, 32),
        expected_fn,
        getattr(source, "vision_model", source),
        final_hidden=lambda m, x, c: ("blocks.1.hook_resid_post", m(pixel_values=x).last_hidden_state),
    )
    assert hooked.cfg.act_fn == "quick_gelu" and hooked.cfg.ln_pre and hooked.cfg.fc_norm


def test_clip_model_image_features_match() -> None:
    from transformers import CLIPConfig

    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    vision = {k: v for k, v in CLIP_TINY.items() if k != "projection_dim"}
    source = _get("CLIPModel", "CLIPConfig", text_config=text, vision_config=vision, projection_dim=24)
    assert isinstance(source.config, CLIPConfig)
    hooked = _compare_family(
        source, torch.randn(2, 3, 32, 32), _image_features, getattr(source, "vision_model", source)
    )
    assert hooked.cfg.head == "projection" and hooked.cfg.projection_dim == 24


@pytest.mark.slow
def test_clip_b32_sized_matches() -> None:
    source = _get("CLIPVisionModelWithProjection", "CLIPVisionConfig", patch_size=32, projection_dim=512)
    _compare_family(
        source,
        torch.randn(1, 3, 224, 224),
        lambda m, x: m(pixel_values=x).image_embeds,
        getattr(source, "vision_model", source),
    )


DINO_TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.mark.parametrize(
    "model_name, config_name, extra",
    [
        ("Dinov2Model", "Dinov2Config", dict()),
        ("Dinov2Model", "Dinov2Config", dict(use_swiglu_ffn=True)),
        ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", dict(num_register_tokens=4)),
    ],
)
@pytest.mark.parametrize("size", [32, 48])
def test_dinov2_family_matches(model_name: str, config_name: str, extra: dict, size: int) -> None:
    source = _get(model_name, config_name, **DINO_TINY, **extra)
    hooked = _compare_family(
        source,
        torch.randn(2, 3, size, size),
        lambda m, x: m(pixel_values=x).pooler_output,
        source,
        final_hidden=lambda m, x, c: ("ln_final.hook_normalized", m(pixel_values=x).last_hidden_state),
    )
    assert hooked.cfg.layer_scale_init is not None
    assert hooked.cfg.n_registers == extra.get("num_register_tokens", 0)
    assert hooked.cfg.act_fn == ("swiglu" if extra.get("use_swiglu_ffn") else "gelu")


@pytest.mark.slow
def test_dinov2_base_sized_matches() -> None:
    source = _get("Dinov2Model", "Dinov2Config")  # ViT-B/14, 518 px positions interpolated to 224 px
    _compare_family(source, torch.randn(1, 3, 224, 224), lambda m, x: m(pixel_values=x).pooler_output, source)


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_vision_matches(use_head: bool) -> None:
    kwargs = {k: v for k, v in CLIP_TINY.items() if k != "projection_dim"}
    source = _get("SiglipVisionModel", "SiglipVisionConfig", **kwargs, vision_use_head=use_head)
    expected = (lambda m, x: m(pixel_values=x).pooler_output) if use_head else (
        lambda m, x: m(pixel_values=x).last_hidden_state)  # fmt: skip
    hooked = _compare_family(
        source,
        torch.randn(2, 3, 32, 32),
        expected,
        getattr(source, "vision_model", source),
        final_hidden=lambda m, x, c: ("ln_final.hook_normalized", m(pixel_values=x).last_hidden_state),
    )
    assert not hooked.cfg.class_token and hooked.cfg.pool == ("attn" if use_head else "none")


VIDEO_TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                  num_frames=4, num_channels=3)  # fmt: skip


@pytest.mark.parametrize(
    "model_name, expected_fn",
    [
        ("VivitModel", lambda m, x: m(pixel_values=x).pooler_output),
        ("VivitForVideoClassification", lambda m, x: m(pixel_values=x).logits),
    ],
)
def test_vivit_matches(model_name: str, expected_fn) -> None:
    source = _get(model_name, "VivitConfig", **VIDEO_TINY, tubelet_size=[2, 8, 8], num_labels=5)
    owner = getattr(source, "vivit", source)
    hooked = _compare_family(source, torch.randn(2, 4, 3, 32, 32), expected_fn, owner)
    assert hooked.cfg.is_video and hooked.cfg.n_tokens == 1 + 2 * 4 * 4


@pytest.mark.parametrize(
    "model_name, expected_fn",
    [
        ("VideoMAEModel", lambda m, x: m(pixel_values=x).last_hidden_state),
        ("VideoMAEForVideoClassification", lambda m, x: m(pixel_values=x).logits),
    ],
)
def test_videomae_matches(model_name: str, expected_fn) -> None:
    source = _get(model_name, "VideoMAEConfig", **VIDEO_TINY, patch_size=8, tubelet_size=2, num_labels=5)
    owner = getattr(source, "videomae", source)
    hooked = _compare_family(source, torch.randn(2, 4, 3, 32, 32), expected_fn, owner)
    assert hooked.cfg.qkv_bias == "qv" and hooked.cfg.pos_embed == "sincos"


@pytest.mark.slow
def test_videomae_base_sized_matches() -> None:
    # ViT-B width and depth at 224 px; 4 frames instead of 16 keeps the test short (the sequence is 392 tokens).
    source = _get("VideoMAEForVideoClassification", "VideoMAEConfig", num_frames=4, num_labels=400)
    owner = source.videomae
    _compare_family(source, torch.randn(1, 4, 3, 224, 224), lambda m, x: m(pixel_values=x).logits, owner)


def test_video_input_layout_is_checked() -> None:
    source = _get("VideoMAEModel", "VideoMAEConfig", **VIDEO_TINY, patch_size=8, tubelet_size=2)
    hooked = convert_model(source)
    with pytest.raises(ValueError, match=r"clips \[B, T, C, H, W\] with \(T, C, H, W\) = \(4, 3, 32, 32\)"):
        hooked(torch.randn(2, 3, 4, 32, 32))
