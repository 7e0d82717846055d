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
    vit = model.vit if hasattr(model, "vit") else model
    return list(vit.layers) if hasattr(vit, "layers") else list(vit.encoder.layer)


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
