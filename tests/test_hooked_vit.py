"""HookedViT itself: config validation, bad input, weight views, weight folding, files and the registry."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_
from torch.testing import assert_close

from prisma_lightning.backbones import (
    TEST_CONFIGS,
    HookedViT,
    HookedViTConfig,
    load_hooked_model,
)


def tiny(name: str = "test/vit-tiny", **overrides) -> HookedViT:
    cfg = HookedViTConfig.from_dict({**TEST_CONFIGS[name].to_dict(), **overrides})
    return randomize_(HookedViT(cfg)).eval()


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# ---------------------------------------------------------------- config and input validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "not divisible by n_heads=4"),
        (dict(image_size=30, patch_size=4), r"not divisible by patch_size"),
        (dict(class_token=False, pool="cls"), "pool='cls' needs class_token=True"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(head="classifier", n_classes=0), "n_classes > 0"),
        (dict(n_registers=1, pos_embed_prefix_tokens=3), "pos_embed_prefix_tokens=3"),
    ],
)
def test_config_validation_names_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HookedViTConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="Unknown HookedViTConfig fields.*'dmodel'"):
        HookedViTConfig.from_dict({"dmodel": 3})


def test_wrong_channel_count_raises_value_error() -> None:
    with pytest.raises(ValueError, match="Expected 3 input channels, got 1"):
        tiny()(torch.randn(2, 1, 16, 16))


def test_wrong_image_size_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"Expected images of size \(16, 16\), got \(20, 20\)"):
        tiny()(torch.randn(2, 3, 20, 20))


def test_missing_batch_dim_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        tiny()(torch.randn(3, 16, 16))


def test_indivisible_size_with_interpolation_raises() -> None:
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny()(torch.randn(1, 3, 18, 18), interpolate_pos_encoding=True)


def test_interpolation_at_native_size_is_identity_and_other_sizes_run() -> None:
    model = tiny()
    x = images()
    assert_close(model(x, interpolate_pos_encoding=True), model(x))
    out = model(torch.randn(2, 3, 24, 32), interpolate_pos_encoding=True)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# ---------------------------------------------------------------- forward structure
def test_token_layout_and_pooling_options() -> None:
    model = tiny("test/vit-tiny-reg")
    _, cache = model.run_with_cache(
        images(), names_filter=["hook_full_embed", "hook_pooled", "ln_final.hook_normalized"]
    )
    assert cache["hook_full_embed"].shape == (2, 1 + 2 + 16, 32)  # cls, 2 registers, 4x4 patches
    assert_close(cache["hook_pooled"], cache["ln_final.hook_normalized"][:, 0])
    none_pool = tiny(pool="none", head="none")
    out, cache = none_pool.run_with_cache(images(), names_filter="ln_final.hook_normalized")
    assert_close(out, cache["ln_final.hook_normalized"])


def test_mean_pool_with_fc_norm_excludes_prefix_tokens() -> None:
    model = tiny("test/vit-tiny-gap", n_registers=1)
    x = images()
    _, cache = model.run_with_cache(x, names_filter=["blocks.1.hook_resid_post", "hook_pooled"])
    resid = cache["blocks.1.hook_resid_post"]
    expected = model.fc_norm(resid[:, 1:].mean(1))
    assert_close(cache["hook_pooled"], expected)


def test_projection_head_has_no_bias_and_tanh_head() -> None:
    model = tiny(head="projection", projection_dim=6, head_bias=None)
    assert model.head.bias is None and model(images()).shape == (2, 6)
    tanh = tiny(head_act="tanh")
    assert tanh(images()).abs().max() <= 1.0


def test_attn_result_sums_to_attn_out() -> None:
    model = tiny("test/vit-tiny-reg", use_attn_result=True)
    _, cache = model.run_with_cache(images(), names_filter=lambda n: "blocks.1" in n)
    result = cache["blocks.1.attn.hook_result"]  # [B, T, h, d]
    assert result.shape == (2, 19, 4, 32)
    attn_out = cache["blocks.1.hook_attn_out"]
    block = model.blocks[1]
    assert_close(result.sum(2) + block.attn.out.bias * block.ls1.gamma, attn_out)


# ---------------------------------------------------------------- weight views
def test_weight_views_reproduce_q_k_v_and_mlp() -> None:
    model = tiny("test/vit-tiny-reg")
    _, cache = model.run_with_cache(images())
    x = cache["blocks.1.ln1.hook_normalized"]
    for name, w, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
        manual = torch.einsum("btd,hde->bthe", x, w[1]) + b[1]
        assert_close(manual, cache[f"blocks.1.attn.hook_{name}"], atol=1e-5, rtol=1e-5)
    z = cache["blocks.1.attn.hook_z"]
    attn_out = torch.einsum("bthe,hed->btd", z, model.W_O[1]) + model.b_O[1]
    assert_close(attn_out, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)
    pre = cache["blocks.0.ln2.hook_normalized"] @ model.W_in[0] + model.b_in[0]
    assert_close(pre, cache["blocks.0.mlp.hook_pre"], atol=1e-5, rtol=1e-5)
    mlp_out = cache["blocks.0.mlp.hook_post"] @ model.W_out[0] + model.b_out[0]
    assert_close(mlp_out, cache["blocks.0.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    logits = cache["hook_pooled"] @ model.W_U + model.b_U
    assert_close(logits, cache["hook_head_out"], atol=1e-5, rtol=1e-5)
    assert model.W_Q.shape == (2, 4, 32, 8) and model.W_O.shape == (2, 4, 8, 32)
    assert model.W_E.shape == (3 * 4 * 4, 32)


def test_attn_only_model_has_no_mlp_weights() -> None:
    model = tiny("test/vit-tiny-attn-only")
    assert "blocks.0.mlp.hook_pre" not in model.hook_dict
    with pytest.raises(ValueError, match="attention-only"):
        _ = model.W_in


# ---------------------------------------------------------------- weight processing
FOLD_CASES = [
    ("test/vit-tiny", {}),
    ("test/vit-tiny-reg", {}),
    ("test/vit-tiny-gap", {}),
    ("test/vit-tiny-attn-only", {}),
    ("test/vit-tiny", {"qkv_bias": "qv", "mlp_bias": False}),
    ("test/vit-tiny", {"qkv_bias": "none", "head": "projection", "head_bias": None}),
]


@pytest.mark.parametrize("name, overrides", FOLD_CASES)
def test_fold_layer_norm_leaves_outputs_unchanged(name: str, overrides: dict) -> None:
    model = tiny(name, **overrides)
    x = images()
    expected = model(x)
    model.fold_layer_norm()
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    for block in model.blocks:
        assert torch.all(block.ln1.weight == 1) and torch.all(block.ln1.bias == 0)
    # The folded model still saves and loads (the config records the biases folding created).
    reloaded = HookedViT(HookedViTConfig.from_dict(model.cfg.to_dict()))
    reloaded.load_state_dict(model.state_dict())
    assert_close(reloaded.eval()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-reg", "test/vit-tiny-gap"])
def test_center_writing_weights_leaves_outputs_unchanged(name: str) -> None:
    model = tiny(name)
    x = images()
    expected = model(x)
    model.fold_layer_norm().center_writing_weights()
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")))
    for value in cache.values():
        assert value.mean(-1).abs().max() < 1e-5


def test_center_writing_weights_refuses_models_without_final_norm() -> None:
    model = tiny(final_norm=False)
    with pytest.raises(ValueError, match="centring would change its outputs"):
        model.center_writing_weights()


# ---------------------------------------------------------------- files and registry
def test_save_and_load_roundtrip(tmp_path) -> None:
    model = tiny("test/vit-tiny-reg")
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["n_registers"] == 2
    loaded = HookedViT.from_pretrained(folder)
    x = images()
    assert_close(loaded(x), model(x))
    assert load_hooked_model(str(folder), pretrained=False).cfg == model.cfg


def test_from_pretrained_reports_missing_file(tmp_path) -> None:
    tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        HookedViT.from_pretrained(tmp_path)


def test_from_pretrained_rejects_mismatched_weights(tmp_path) -> None:
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors do not match the config: missing keys"):
        HookedViT.from_pretrained(tmp_path)


def test_from_pretrained_offline_hub_error_names_the_file() -> None:
    with pytest.raises(FileNotFoundError, match="config.json.*not in the local cache"):
        HookedViT.from_pretrained("someone/not-a-cached-repo")
