"""timm VisionTransformer -> HookedViT: outputs and every block's residual match the source exactly."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import capture_outputs, randomize_
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from prisma_lightning.backbones import HookedViT, convert_model

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=7)

VARIANTS = {
    "cls_token": dict(),
    "no_cls_avg_pool": dict(class_token=False, global_pool="avg"),
    "registers_no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "registers_embed_class": dict(reg_tokens=2, no_embed_class=False),
    "layer_scale": dict(init_values=1e-1),
    "pre_norm": dict(pre_norm=True),
    "fc_norm_token_pool": dict(fc_norm=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "no_pool_no_head": dict(global_pool="", num_classes=0),
    "quick_gelu": dict(act_layer="quick_gelu"),
    "swiglu_packed": dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu", mlp_ratio=8 / 3),
    "dynamic_img_size": dict(dynamic_img_size=True),
}


def check_equivalent(source: torch.nn.Module, images: torch.Tensor, **forward_kwargs) -> HookedViT:
    source.eval()
    hooked = convert_model(source)
    block_outputs, handles = capture_outputs(list(source.blocks))
    try:
        with torch.no_grad():
            expected = source(images)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out, cache = hooked.run_with_cache(
            images, names_filter=lambda n: n.endswith("hook_resid_post"), **forward_kwargs
        )
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert len(block_outputs) == hooked.cfg.n_layers
    for i, block_out in enumerate(block_outputs):
        assert_close(cache[f"blocks.{i}.hook_resid_post"], block_out, atol=1e-4, rtol=1e-4)
    return hooked


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_variants_match(variant: str) -> None:
    source = randomize_(VisionTransformer(**{**TINY, **VARIANTS[variant]}))
    images = torch.randn(3, 3, 32, 32)
    hooked = check_equivalent(source, images)
    assert hooked.cfg.n_layers == 2
    # The class token and registers are where the source put them.
    if VARIANTS[variant].get("reg_tokens"):
        assert hooked.cfg.n_registers == VARIANTS[variant]["reg_tokens"]


def test_timm_vit_base_sized_matches() -> None:
    source = randomize_(timm.create_model("vit_base_patch16_224", pretrained=False))
    images = torch.randn(1, 3, 224, 224)
    hooked = check_equivalent(source, images)
    assert (hooked.cfg.d_model, hooked.cfg.n_layers, hooked.cfg.n_heads) == (768, 12, 12)


def test_dynamic_img_size_interpolation_matches_timm() -> None:
    source = randomize_(VisionTransformer(**TINY, dynamic_img_size=True, reg_tokens=1, no_embed_class=False))
    hooked = check_equivalent(source, torch.randn(2, 3, 48, 40))
    assert hooked.cfg.dynamic_img_size
    # Without the config flag, a fixed-size model refuses other sizes unless asked to interpolate.
    hooked.cfg.dynamic_img_size = False
    images = torch.randn(2, 3, 56, 24)
    with pytest.raises(ValueError, match=r"Expected images of size \(32, 32\), got \(56, 24\)"):
        hooked(images)
    with torch.no_grad():
        assert_close(hooked(images, interpolate_pos_encoding=True), source(images), atol=1e-4, rtol=1e-4)


def test_hooked_train_mode_matches_eval_mode_without_dropout() -> None:
    source = randomize_(VisionTransformer(**TINY))
    hooked = convert_model(source).train()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(hooked(images), source.eval()(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_pool="max"), "global_pool"),
        (dict(qk_norm=True), "qk_norm"),
    ],
)
def test_unsupported_timm_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        convert_model(VisionTransformer(**TINY, **kwargs))


def test_unsupported_object_raises_type_error_listing_supported() -> None:
    with pytest.raises(TypeError, match="Supported: .*timm.VisionTransformer"):
        convert_model(torch.nn.Linear(2, 2))
