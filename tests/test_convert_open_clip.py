"""open_clip image towers -> HookedViT: the image embedding and every block's residual match the source exactly."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from helpers import capture_outputs, randomize_
from torch import nn
from torch.testing import assert_close

from prisma_lightning.backbones import HookedViT, convert_model

open_clip = pytest.importorskip("open_clip")
from open_clip.coca_model import CoCa, MultimodalCfg  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP  # noqa: E402
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer  # noqa: E402

TINY = dict(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=4.0, output_dim=24)
TINY_TEXT = CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1)

VARIANTS = {
    "token_pool": dict(),
    "quick_gelu": dict(act_layer=QuickGELU),
    "gelu_tanh": dict(act_layer=partial(nn.GELU, approximate="tanh")),
    "layer_scale": dict(ls_init_value=0.1),
    "no_ln_pre": dict(no_ln_pre=True),
    "ln_after_token_pool": dict(final_ln_after_pool=True),
    "avg_pool": dict(pool_type="avg"),
    # CLIPA: no ln_pre, mean of the patch tokens, then ln_post.
    "clipa_avg_pool_ln_after_pool": dict(no_ln_pre=True, pool_type="avg", final_ln_after_pool=True),
    "no_pool_all_tokens": dict(pool_type="none"),
    "no_pool_ln_after_pool": dict(pool_type="none", final_ln_after_pool=True),
    "sin_cos_2d_pos_embed": dict(pos_embed_type="sin_cos_2d"),
    # CoCa: the pooler attends from output_dim-wide queries to width-wide tokens (kdim/vdim != embed_dim).
    "attentional_pool": dict(attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=2),
    "attentional_pool_same_dim": dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=4, output_dim=48),
    "custom_block_plain": dict(block_type="custom"),
    "layer_norm_eps": dict(norm_layer=partial(LayerNorm, eps=1e-6)),
    "rectangular_image": dict(image_size=(32, 48)),
    "patch_dropout_in_eval": dict(patch_dropout=0.5),
    "output_tokens": dict(output_tokens=True),
}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def check_equivalent(
    visual: nn.Module, images: torch.Tensor, source_forward: Callable | None = None, source: nn.Module | None = None
) -> HookedViT:
    """Convert ``source`` (default: ``visual``) and compare the embedding and every resblock output."""
    source = visual if source is None else source
    source.eval()
    hooked = convert_model(source)
    assert not hooked.training
    blocks = list(visual.transformer.resblocks)
    block_outputs, handles = capture_outputs(blocks)
    try:
        with torch.no_grad():
            expected = _first((source_forward or visual)(images))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert len(block_outputs) == hooked.cfg.n_layers == len(blocks)
    batch_first = getattr(visual.transformer, "batch_first", False)  # older open_clip ran blocks as [T, B, d]
    for i, block_out in enumerate(block_outputs):
        block_out = block_out if batch_first else block_out.transpose(0, 1)
        assert_close(cache[f"blocks.{i}.hook_resid_post"], block_out, atol=1e-4, rtol=1e-4)
    n_params = sum(p.numel() for p in hooked.parameters())
    assert n_params == sum(p.numel() for p in visual.parameters())
    return hooked


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_open_clip_vision_transformer_variants_match(variant: str) -> None:
    kwargs = {**TINY, **VARIANTS[variant]}
    visual = randomize_(VisionTransformer(**kwargs))
    height, width = (kwargs["image_size"],) * 2 if isinstance(kwargs["image_size"], int) else kwargs["image_size"]
    hooked = check_equivalent(visual, torch.randn(3, 3, height, width))
    cfg = hooked.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.image_size) == (2, 48, 4, (height, width))
    assert cfg.head == "projection" and not cfg.patch_bias
    if kwargs.get("attentional_pool"):
        assert cfg.pool == "attn" and cfg.attn_pool_dim == kwargs["output_dim"] and cfg.fc_norm
        assert cfg.attn_pool_queries == kwargs["attn_pooler_queries"]
    if variant == "layer_norm_eps":
        assert cfg.layer_norm_eps == 1e-6


def test_open_clip_layer_norm_eps_and_sizes_are_parsed() -> None:
    cfg = convert_model(VisionTransformer(**TINY)).cfg
    assert cfg.layer_norm_eps == 1e-5  # torch's LayerNorm default, used by open_clip
    assert (cfg.patch_size, cfg.grid_size, cfg.projection_dim, cfg.act_fn) == ((8, 8), (4, 4), 24, "gelu")
    assert cfg.ln_pre and cfg.final_norm and not cfg.fc_norm and cfg.pool == "cls"
    # Without create_model's preprocess_cfg, open_clip's defaults at the tower's image size.
    assert cfg.preprocess["crop_size"] == [32, 32]
    assert_close(torch.tensor(cfg.preprocess["mean"]), torch.tensor(open_clip.OPENAI_DATASET_MEAN))


def test_open_clip_without_projection_returns_pooled_vector() -> None:
    visual = randomize_(VisionTransformer(**TINY))
    visual.proj = None
    hooked = check_equivalent(visual, torch.randn(2, 3, 32, 32))
    assert hooked.cfg.head == "none" and hooked.cfg.d_out == 48


def test_open_clip_clip_quick_gelu_matches_encode_image() -> None:
    vision = CLIPVisionCfg(layers=2, width=32, head_width=8, patch_size=8, image_size=32)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TINY_TEXT, quick_gelu=True)
    randomize_(model.visual)
    hooked = check_equivalent(model.visual, torch.randn(2, 3, 32, 32), model.encode_image, source=model)
    assert hooked.cfg.act_fn == "quick_gelu" and hooked.cfg.n_heads == 4


def test_open_clip_custom_text_clip_matches_encode_image() -> None:
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32, ls_init_value=0.5)
    model = CustomTextCLIP(embed_dim=8, vision_cfg=vision, text_cfg=TINY_TEXT)
    randomize_(model.visual)
    hooked = check_equivalent(model.visual, torch.randn(2, 3, 32, 32), model.encode_image, source=model)
    assert hooked.cfg.layer_scale_init is not None


def test_open_clip_coca_matches_image_latent() -> None:
    vision = CLIPVisionCfg(
        layers=2, width=32, head_width=8, patch_size=8, image_size=32, attentional_pool=True, output_tokens=True
    )
    text = CLIPTextCfg(**{**TINY_TEXT.__dict__, "embed_cls": True, "output_tokens": True})
    multimodal = MultimodalCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    model = CoCa(embed_dim=16, multimodal_cfg=multimodal, text_cfg=text, vision_cfg=vision)
    randomize_(model.visual)
    forward = partial(model.encode_image, normalize=False)
    hooked = check_equivalent(model.visual, torch.randn(2, 3, 32, 32), forward, source=model)
    assert hooked.cfg.pool == "attn" and hooked.cfg.attn_pool_queries == 256


def test_open_clip_vit_b_32_matches() -> None:
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    randomize_(model.visual)
    hooked = check_equivalent(model.visual, torch.randn(1, 3, 224, 224), model.encode_image, source=model)
    cfg = hooked.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.patch_size, cfg.projection_dim) == (768, 12, 12, (32, 32), 512)
    assert sum(p.numel() for p in hooked.parameters()) == sum(p.numel() for p in model.visual.parameters())
    # create_model's preprocess_cfg is recorded: shortest side to 224, centre crop, OpenAI statistics.
    pre = cfg.preprocess
    assert (pre["resize"], pre["crop_size"], pre["interpolation"]) == (224, [224, 224], "bicubic")
    assert_close(torch.tensor(pre["mean"]), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    assert_close(torch.tensor(pre["std"]), torch.tensor(open_clip.OPENAI_DATASET_STD))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(scaled_cosine_attn=True), "scaled_cosine_attn"),
        (dict(scale_heads=True), "scale_heads"),
        (dict(scale_attn_inner=True), "scale_attn_inner"),
        (dict(scale_attn=True), "scale_attn"),
        (dict(scale_fc=True), "scale_fc"),
        (dict(attentional_pool="parallel", attn_pooler_queries=4), "attentional_pool='parallel'"),
        (dict(attentional_pool="cascade", attn_pooler_queries=4), "attentional_pool='cascade'"),
        (dict(attentional_pool=True, attn_pooler_queries=4, pool_type="avg"), "pool_type='avg'"),
        (dict(attentional_pool=True, attn_pooler_queries=4, pool_type="none"), "pool_type='none'"),
        # The pooler's own LayerNorms ignore norm_layer, so their eps would differ from the tower's.
        (dict(attentional_pool=True, attn_pooler_queries=4, norm_layer=partial(LayerNorm, eps=1e-6)), "epsilons"),
    ],
)
def test_unsupported_open_clip_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        convert_model(VisionTransformer(**{**TINY, **kwargs}))


@pytest.mark.parametrize(
    "vision, message",
    [
        (CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=8, image_size=64), "has a ModifiedResNet"),
        (CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", image_size=32), "has a TimmModel.*timm converter"),
    ],
)
def test_open_clip_non_vit_towers_raise(vision: CLIPVisionCfg, message: str) -> None:
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TINY_TEXT)
    with pytest.raises(TypeError, match=message):
        convert_model(model)


def test_open_clip_attention_pool_explicit_pattern_path_matches() -> None:
    kwargs = {**TINY, **VARIANTS["attentional_pool"]}
    visual = randomize_(VisionTransformer(**kwargs)).eval()
    hooked = convert_model(visual)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, names_filter=lambda n: n.endswith("hook_pattern"))
        expected = visual(images)
    assert_close(out, expected, atol=1e-4, rtol=1e-4)
    pattern = cache["attn_pool.hook_pattern"]  # [B, h, 1, T]
    assert pattern.shape == (2, 2, 1, 17)
    assert_close(pattern.sum(-1), torch.ones(2, 2, 1))
