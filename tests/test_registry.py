"""Registry: every name builds offline with its exact architecture; local folders; clear offline errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_
from torch.testing import assert_close

from prisma_lightning.backbones import HookedViT, convert_model, list_models, load_hooked_model
from prisma_lightning.backbones.registry import hooked_config, source_architecture

REQUIRED = [
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14",
    "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    "open-clip:laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    "open-clip:timm/vit_base_patch16_clip_224.openai",
    "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "timm/vit_small_patch16_224.augreg_in21k",
    "timm/vit_base_patch14_reg4_dinov2.lvd142m",
    "facebook/dino-vitb16",
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-with-registers-small",
    "google/siglip-base-patch16-224",
    "google/vivit-b-16x2-kinetics400",
    "MCG-NJU/videomae-base",
    "MCG-NJU/videomae-base-finetuned-kinetics",
]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_required_names_are_registered() -> None:
    missing = sorted(set(REQUIRED) - set(list_models()))
    assert not missing
    assert list_models("facebook/dinov2*") == [
        "facebook/dinov2-base",
        "facebook/dinov2-small",
        "facebook/dinov2-with-registers-small",
    ]


@pytest.mark.parametrize("name", REQUIRED)
def test_architecture_parameter_count_matches_source(name: str) -> None:
    with torch.device("meta"):
        hooked = HookedViT(hooked_config(name))
    source = source_architecture(name)
    expected = n_params(source)
    mask_token = getattr(getattr(source, "embeddings", None), "mask_token", None)
    if mask_token is not None:  # DINOv2's masked-image-modelling token is never used for images
        expected -= mask_token.numel()
    assert n_params(hooked) == expected


def test_every_name_builds_offline_and_runs() -> None:
    for name in list_models():
        small = name.startswith("test/") or name in ("facebook/dinov2-small", "google/siglip-base-patch16-224")
        # Large architectures are built on the meta device: the same code path, without allocating 300M weights.
        with torch.device("cpu" if small else "meta"):
            model = load_hooked_model(name, pretrained=False)
        assert not model.training and model.cfg.n_layers > 0
        cfg = model.cfg
        if small:
            shape = (1, cfg.num_frames, 3, *cfg.image_size) if cfg.is_video else (1, 3, 224, 224)
            if name.startswith("test/") and not cfg.is_video:
                shape = (1, 3, *cfg.image_size)
            with torch.no_grad():
                assert torch.isfinite(model(torch.randn(shape))).all()
        del model


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="facebook/dinov2-small"):
        load_hooked_model("facebook/dinov2-smal", pretrained=False)
    with pytest.raises(ValueError, match="without published weights"):
        load_hooked_model("test/vit-tiny", pretrained=True)


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [
        ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
        ("open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
        ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    ],
)
def test_offline_without_cache_explains_what_to_do(name: str, repo_id: str) -> None:
    """The advice is a command that exists in the installed huggingface_hub, with the Hub repo id of the weights."""
    import shutil
    import sys
    from pathlib import Path

    with pytest.raises(FileNotFoundError, match=r"pretrained=False") as info:
        load_hooked_model(name, pretrained=True)
    assert f"`hf download {repo_id}`" in str(info.value)
    assert shutil.which("hf", path=str(Path(sys.executable).parent)) is not None  # the command installed with us


def test_transformers_save_pretrained_folder_loads_like_in_memory(tmp_path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                              image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    source = randomize_(CLIPVisionModelWithProjection(config)).eval()
    source.save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    loaded = load_hooked_model(str(tmp_path))
    in_memory = convert_model(source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded(x), in_memory(x))
        assert_close(loaded(x), source(pixel_values=x).image_embeds, atol=1e-4, rtol=1e-4)
    assert loaded.preprocess_config().resize == 40  # read from the folder's preprocessor_config.json


def test_open_clip_local_folder_loads_like_in_memory(tmp_path) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 12},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    source = open_clip.create_model(f"local-dir:{tmp_path}", load_weights=False)
    randomize_(source)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors")
    )
    loaded = load_hooked_model(str(tmp_path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded(x), source.eval().encode_image(x), atol=1e-4, rtol=1e-4)


def test_hooked_folder_is_a_name(tmp_path) -> None:
    model = load_hooked_model("test/video-tiny", pretrained=False)
    model.save_pretrained(tmp_path)
    loaded = load_hooked_model(str(tmp_path))
    clips = torch.randn(2, 4, 3, 16, 16)
    with torch.no_grad():
        assert_close(loaded(clips), model(clips))
