"""The written backbone interface: HookedViT satisfies it, a non-ViT toy backbone works through it, and the
layers import downwards only."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from torch import nn
from torch.testing import assert_close

from prisma_lightning.backbones import (
    TEST_CONFIGS,
    BackboneConfig,
    HookedBackbone,
    HookedViT,
    list_models,
    load_hooked_model,
)
from prisma_lightning.hooks import (
    ActivationCache,
    HookedModel,
    HookedModule,
    HookPoint,
    ResidComponent,
    ResidNorm,
    ResidualStreamModel,
)
from prisma_lightning.interp import (
    activation_patching,
    attention_patterns,
    feature_steering,
    logit_lens,
    splice_hooks,
    splice_saes,
    token_layout,
    top_activating,
)
from prisma_lightning.sae import SAEConfig, SparseAutoencoder


# ---------------------------------------------------------------------------------------------- HookedViT
@pytest.mark.parametrize("name", list_models("test/*"))
def test_every_registry_test_model_is_a_hooked_backbone(name: str) -> None:
    model = load_hooked_model(name, pretrained=False)
    assert isinstance(model, HookedBackbone)
    assert isinstance(model, HookedModel) and isinstance(model, ResidualStreamModel)
    assert isinstance(model.cfg, BackboneConfig)


def test_registry_test_models_are_all_checked() -> None:
    assert set(list_models("test/*")) == set(TEST_CONFIGS)


def test_objects_missing_members_are_not_backbones() -> None:
    class OnlyHooks(HookedModule):  # the hook API but no forward_head, resid_hook_name, cfg, ...
        def __init__(self) -> None:
            super().__init__()
            self.hook_x = HookPoint()
            self.setup_hooks()

    only_hooks = OnlyHooks()
    assert isinstance(only_hooks, HookedModel)
    assert not isinstance(only_hooks, HookedBackbone)
    assert not isinstance(only_hooks, ResidualStreamModel)
    assert not isinstance(nn.Linear(2, 2), HookedBackbone)
    with pytest.raises(TypeError, match="ResidualStreamModel"):
        ActivationCache({}, only_hooks).accumulated_resid()


def test_hooked_vit_residual_stream_members() -> None:
    model = load_hooked_model("test/vit-tiny", pretrained=False)
    assert model.resid_hook_name(0) == "blocks.0.hook_resid_pre"
    assert model.resid_hook_name(2) == "blocks.1.hook_resid_post"
    assert model.resid_hook_name(1, mlp_input=True) == "blocks.1.hook_resid_mid"
    assert [c.label for c in model.resid_components(1, mlp_input=True)] == [
        "embed", "0_attn_out", "0_mlp_out", "1_attn_out"
    ]  # fmt: skip
    norm = model.resid_norm(2)
    assert norm.weight is model.ln_final.weight and norm.scale_hook == "ln_final.hook_scale"
    assert model.resid_norm(0, mlp_input=True).weight is model.blocks[0].ln2.weight
    assert load_hooked_model("test/vit-tiny-gap", pretrained=False).resid_norm(2) is None
    with pytest.raises(ValueError, match="after the last block"):
        model.resid_hook_name(2, mlp_input=True)
    with pytest.raises(ValueError, match="attention-only"):
        load_hooked_model("test/vit-tiny-attn-only", pretrained=False).resid_hook_name(0, mlp_input=True)
    with pytest.raises(ValueError, match="layer must be"):
        model.resid_components(3)


def test_hooked_vit_has_no_saes_method() -> None:
    # Splicing SAEs is an interp tool (splice_saes); the backbone layer does not reach up to it.
    assert not hasattr(HookedViT, "saes")


@pytest.mark.parametrize("module", [
    splice_saes, splice_hooks, feature_steering, top_activating, activation_patching, logit_lens, attention_patterns,
    token_layout,
])  # fmt: skip
def test_interp_consumers_are_typed_on_the_protocol(module: Any) -> None:
    annotation = inspect.signature(module).parameters["model"].annotation
    assert "HookedBackbone" in str(annotation) and "HookedViT" not in str(annotation)


def test_backbones_and_hooks_import_nothing_from_higher_layers() -> None:
    code = (
        "import sys, prisma_lightning.backbones, prisma_lightning.hooks\n"
        "import prisma_lightning.backbones.protocol, prisma_lightning.hooks.protocol\n"
        "from prisma_lightning.backbones import load_hooked_model\n"
        "m = load_hooked_model('test/vit-tiny', pretrained=False)\n"
        "m.run_with_cache(m.example_input(2))[1].decompose_resid()\n"
        "higher = ('prisma_lightning.interp', 'prisma_lightning.modules', 'prisma_lightning.callbacks')\n"
        "loaded = sorted(n for n in sys.modules if n.startswith(higher))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- a non-ViT backbone
@dataclass
class MixerConfig:
    """An MLP-Mixer-like toy: patches embedded by a linear map, token mixing by a linear map over positions."""

    model_name: str = "toy-mixer"
    d_model: int = 8
    n_layers: int = 2
    n_heads: int = 1
    image_size: tuple[int, int] = (8, 8)
    patch_size: tuple[int, int] = (4, 4)
    in_channels: int = 1
    num_frames: int = 1
    tubelet_size: int = 1
    class_token: bool = True
    attn_only: bool = False
    head: str = "classifier"
    head_act: str = "none"
    n_classes: int = 3

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.class_token)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix_tokens + self.n_patches

    @property
    def is_video(self) -> bool:
        return False

    @property
    def d_out(self) -> int:
        return self.n_classes


class MixerBlock(nn.Module):
    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        d, t = cfg.d_model, cfg.n_tokens
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mix = nn.Linear(t, t)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.hook_resid_pre = HookPoint()  # [B, T, d]
        self.hook_mix_out = HookPoint()  # [B, T, d]
        self.hook_resid_mid = HookPoint()  # [B, T, d]
        self.hook_mlp_out = HookPoint()  # [B, T, d]
        self.hook_resid_post = HookPoint()  # [B, T, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        mix = self.hook_mix_out(self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        mid = self.hook_resid_mid(x + mix)
        return self.hook_resid_post(mid + self.hook_mlp_out(self.mlp(self.norm2(mid))))


class ToyMixer(HookedModule):
    """Implements exactly the HookedBackbone Protocol, with names of its own where the Protocol allows them."""

    def __init__(self, cfg: MixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ph, pw = cfg.patch_size
        self.embed = nn.Linear(cfg.in_channels * ph * pw, cfg.d_model)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model))
        self.blocks = nn.ModuleList([MixerBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, cfg.n_classes)
        self.hook_tokens = HookPoint()  # [B, T, d]
        self.setup_hooks(aliases={"hook_final_norm_in": f"blocks.{cfg.n_layers - 1}.hook_resid_post"})

    def forward(self, images: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
        ph, pw = self.cfg.patch_size
        patches = F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)  # [B, n_patches, C*ph*pw]
        x = self.embed(patches)
        x = self.hook_tokens(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1))
        for block in self.blocks[:stop_at_layer]:
            x = block(x)
        return x if stop_at_layer is not None else self.forward_head(x)

    def forward_head(self, resid: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(resid)[:, 0])

    def forward_head_tokens(self, resid: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(resid))

    def resid_hook_name(self, layer: int, mlp_input: bool = False) -> str:
        if mlp_input:
            return f"blocks.{layer}.hook_resid_mid"
        n = self.cfg.n_layers
        return f"blocks.{n - 1}.hook_resid_post" if layer == n else f"blocks.{layer}.hook_resid_pre"

    def resid_components(self, layer: int, mlp_input: bool = False) -> list[ResidComponent]:
        parts = [ResidComponent("embed", "hook_tokens", "embed")]
        for i in range(layer + int(mlp_input)):
            parts.append(ResidComponent(f"{i}_mix", f"blocks.{i}.hook_mix_out", "attn"))
            if i < layer:
                parts.append(ResidComponent(f"{i}_mlp", f"blocks.{i}.hook_mlp_out", "mlp"))
        return parts

    def resid_norm(self, layer: int, mlp_input: bool = False) -> ResidNorm | None:
        if layer == self.cfg.n_layers:
            norm = self.norm
        else:
            norm = self.blocks[layer].norm2 if mlp_input else self.blocks[layer].norm1
        return ResidNorm(norm.weight, norm.bias, norm.eps)

    def head_results(self, layer: int, cache: Any) -> torch.Tensor:
        raise ValueError("ToyMixer mixes tokens with a linear map: it has no attention heads.")

    def stop_layer_for(self, hook_name: str) -> int | None:
        parts = self.canonical_hook_name(hook_name).split(".")
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        return 0 if hook_name == "hook_tokens" else None

    def stop_layer_for_all(self, hook_names: list[str]) -> int | None:
        stops = [self.stop_layer_for(h) for h in hook_names]
        return None if any(s is None for s in stops) else max(stops)

    @torch.no_grad()
    def hook_width(self, hook_name: str) -> int:
        _, cache = self.run_with_cache(self.example_input(), names_filter=hook_name)
        return int(cache[hook_name].shape[-1])

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.in_channels, *self.cfg.image_size)

    def preprocess(self, train: bool = False) -> Any:
        return lambda image: torch.as_tensor(image, dtype=torch.float32)


def toy() -> ToyMixer:
    torch.manual_seed(0)
    return randomize_(ToyMixer(MixerConfig())).eval()


def toy_images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def toy_sae(hook: str = "blocks.0.hook_resid_post", tokens: str = "all") -> SparseAutoencoder:
    torch.manual_seed(3)
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, architecture="relu", hook_name=hook, tokens=tokens))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae.eval()


def test_toy_backbone_satisfies_the_protocol() -> None:
    model = toy()
    assert isinstance(model, HookedBackbone) and isinstance(model.cfg, BackboneConfig)
    assert not isinstance(model, HookedViT)
    assert model.hook_width("hook_final_norm_in") == 8  # an alias of its own
    layout = token_layout(model)
    assert (layout.n_prefix, layout.grid, layout.n_tokens, layout.has_cls) == (1, (2, 2), 5, True)


def test_toy_cache_decompositions_use_only_the_protocol() -> None:
    model = toy()
    with torch.no_grad():
        _, cache = model.run_with_cache(toy_images())
    final = cache["blocks.1.hook_resid_post"]
    assert cache["hook_final_norm_in"] is final
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mix", "0_mlp", "1_mix", "1_mlp"]
    assert_close(stack.sum(0), final, atol=1e-5, rtol=1e-5)
    mix, mix_labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert mix_labels == ["0_mix", "1_mix"]
    mid = cache.decompose_resid(layer=1, mlp_input=True)
    assert_close(mid.sum(0), cache["blocks.1.hook_resid_mid"], atol=1e-5, rtol=1e-5)
    normed = F.layer_norm(final, (8,), model.norm.weight, model.norm.bias, model.norm.eps)
    assert_close(cache.accumulated_resid(apply_ln=True)[-1], normed)
    assert_close(cache.apply_ln_to_stack(stack).sum(0), normed, atol=1e-5, rtol=1e-5)
    acc, acc_labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert acc_labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    with pytest.raises(ValueError, match="no attention heads"):
        cache.stack_head_results()


def test_interp_tools_run_on_a_toy_backbone() -> None:
    model = toy()
    x = toy_images()
    with torch.no_grad():
        clean = model(x)
        lens = logit_lens(model, x)
    assert lens.logits.shape == (3, 4, 5, 3)
    assert_close(lens.pooled_logits[-1], clean, atol=1e-5, rtol=1e-5)
    assert_close(lens.logits[-1, :, 0], clean, atol=1e-5, rtol=1e-5)  # the class token's reading is the output

    sae = toy_sae(tokens="patches")
    with torch.no_grad():
        with splice_saes(model, [sae], include_error=True):
            exact = model(x)
        with splice_saes(model, sae):
            _, spliced = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
        _, plain = model.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    assert_close(exact, clean, atol=1e-5, rtol=1e-5)
    act = plain["blocks.0.hook_resid_post"]
    expected = act.clone()
    expected[:, 1:] = sae(act[:, 1:]).recon  # only the patches: cfg.n_prefix_tokens comes from the Protocol
    assert_close(spliced["blocks.1.hook_resid_pre"], expected, atol=1e-5, rtol=1e-5)

    ((_, steer),) = feature_steering(sae, 2, 4.0, model=model)
    delta = steer(act, None) - act
    assert delta[:, 0].abs().max() == 0 and delta[:, 1:].abs().min() > 0

    result = top_activating(sae, model, [(x[:2], None), (x[2:], None)], [0, 5], k=2)
    feats = sae.encode(act[:, 1:])[..., [0, 5]]  # [4, 4 patches, 2]
    best = feats.amax(1).T.topk(2, dim=1)
    assert_close(result.values, best.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.indices, best.indices)
    assert result.heatmaps.shape == (2, 2, 1, 2, 2)

    corrupted = toy_images(seed=1)
    patch = activation_patching(model, x, corrupted, hook="resid_post", by="all")
    assert patch.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert patch.values[-1] == pytest.approx(patch.source, abs=1e-5)  # the whole final stream restores the output
    by_pos = activation_patching(model, x, corrupted, hook="hook_final_norm_in", by="position")
    assert by_pos.values.shape == (1, 5)
