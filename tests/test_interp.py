"""prisma_lightning.interp: logit lens, direct logit attribution, patching, attention plots, SAE tools.

Every model here has randomised weights (non-trivial LayerNorm weights and biases), so a missing bias or a wrong
scale changes the numbers the identities below compare.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from torch.testing import assert_close

from prisma_lightning.backbones import TEST_CONFIGS, HookedViT, HookedViTConfig, ZeroShotClassifier
from prisma_lightning.interp import (
    LogitDiff,
    activation_patching,
    attention_html,
    attention_patterns,
    direct_logit_attribution,
    emoji_logit_lens_html,
    feature_steering,
    imagenet_emoji,
    logit_lens,
    plot_attention_heads,
    plot_dla,
    plot_emoji_logit_lens,
    plot_logit_lens_grid,
    plot_logit_lens_heatmap,
    plot_patching,
    plot_top_activating,
    save_top_activating,
    splice_saes,
    top_activating,
)
from prisma_lightning.sae import SAEConfig, SparseAutoencoder, Transcoder, TranscoderConfig

TINY = dict(d_model=32, n_layers=2, n_heads=4, image_size=16, patch_size=4)
EXTRA = {
    "mean-ln": HookedViTConfig(**TINY, n_classes=10, class_token=False, pool="mean"),
    "attn-pool": HookedViTConfig(**TINY, n_classes=10, class_token=False, pool="attn", attn_pool_mlp=True,
                                 attn_pool_norm_kv=True, attn_pool_dim=24),
    "clip": HookedViTConfig(**TINY, ln_pre=True, act_fn="quick_gelu", head="projection", projection_dim=16),
}  # fmt: skip


def model(name: str) -> HookedViT:
    cfg = EXTRA[name] if name in EXTRA else TEST_CONFIGS[name]
    return randomize_(HookedViT(HookedViTConfig.from_dict(cfg.to_dict()))).eval()


def inputs(m: HookedViT, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *m.example_input().shape[1:], generator=torch.Generator().manual_seed(seed))


def zero_shot(d: int = 16, n: int = 7, bias: float | None = None) -> ZeroShotClassifier:
    weights = F.normalize(torch.randn(d, n, generator=torch.Generator().manual_seed(3)), dim=0)
    return ZeroShotClassifier(weights, logit_scale=100.0, logit_bias=bias)


# ---------------------------------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-reg", "test/vit-tiny-gap", "test/video-tiny",
                                  "mean-ln", "attn-pool"])  # fmt: skip
def test_logit_lens_last_entry_is_the_model_output(name: str) -> None:
    m = model(name)
    x = inputs(m)
    lens = logit_lens(m, x)
    n_tokens = m.cfg.n_tokens
    assert lens.logits.shape == (m.cfg.n_layers + 1, 3, n_tokens, m.cfg.d_out)
    assert lens.layer_labels[-1] == "final_post"
    assert_close(lens.pooled_logits[-1], m(x), atol=1e-5, rtol=1e-5)
    if m.cfg.pool == "cls":  # the class token's per-token reading is the output
        assert_close(lens.logits[-1, :, 0], m(x), atol=1e-5, rtol=1e-5)
    if name == "mean-ln":  # ln_final then mean pooling: the head is linear, so the mean of patch readings is it
        assert_close(lens.patch_logits[-1].mean(1), m(x), atol=1e-5, rtol=1e-5)


def test_logit_lens_matches_ln_final_and_head_by_hand() -> None:
    m = model("test/vit-tiny-reg")
    x = inputs(m)
    _, cache = m.run_with_cache(x)
    lens = logit_lens(m, x)
    ln = m.ln_final
    for layer in range(m.cfg.n_layers + 1):
        resid = cache[f"blocks.{layer}.hook_resid_pre"] if layer < m.cfg.n_layers else cache["resid_post", -1]
        by_hand = F.layer_norm(resid, (32,), ln.weight, ln.bias, ln.eps) @ m.W_U + m.b_U
        assert_close(lens.logits[layer], by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lens.logits[0], lens.logits[-1])  # the lens does read different layers


def test_logit_lens_attention_pool_reads_each_token_alone() -> None:
    m = model("attn-pool")
    x = inputs(m, batch=2)
    lens = logit_lens(m, x)
    _, cache = m.run_with_cache(x)
    token = m.ln_final(cache["resid_post", -1])[:, 5:6]  # one token: the pool's softmax over one key is 1
    assert_close(lens.logits[-1, :, 5], m.head(m.attn_pool(token)), atol=1e-5, rtol=1e-5)


def test_logit_lens_clip_through_projection_and_zero_shot_classifier() -> None:
    m, zs = model("clip"), zero_shot()
    x = inputs(m)
    lens = logit_lens(m, x, classifier=zs, class_names=[f"c{i}" for i in range(7)])
    assert lens.logits.shape[-1] == 7
    assert_close(lens.logits[-1, :, 0], zs(m(x)), atol=1e-4, rtol=1e-5)
    assert_close(lens.pooled_logits[-1], zs(m(x)), atol=1e-4, rtol=1e-5)
    values, indices = lens.topk(3)
    assert values.shape == (3, 3, m.cfg.n_tokens, 3) and (values[..., 0] >= values[..., 1]).all()
    labels = lens.top_labels(layer=-1, image=1, k=2)
    assert len(labels) == m.cfg.n_tokens - 1 and labels[0][0] == f"c{int(indices[-1, 1, 1, 0])}"
    with pytest.raises(ValueError, match="no head"):
        logit_lens(HookedViT(HookedViTConfig(**TINY, head="none")), x)


def test_logit_lens_plots_and_emoji_outputs(recwarn) -> None:
    from matplotlib.figure import Figure

    m = model("test/video-tiny")
    x = inputs(m, batch=1)
    lens = logit_lens(m, x)
    assert isinstance(plot_logit_lens_heatmap(lens, value="rank"), Figure)
    fig = plot_logit_lens_grid(lens, x, layers=[0, -1], time=1)
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "final_post, t=1"
    texts = {t.get_text() for t in fig.axes[1].texts}
    assert texts <= {name[:8] for name in lens.class_names} | {n[:7] + "…" for n in lens.class_names}

    clip, zs = model("clip"), ZeroShotClassifier(F.normalize(torch.randn(16, 1000), dim=0), 100.0)
    image = inputs(clip, batch=1)
    clip_lens = logit_lens(clip, image, classifier=zs)
    assert clip_lens.class_names[207] == "Golden Retriever"  # ImageNet names for a 1000-class classifier
    assert isinstance(plot_emoji_logit_lens(clip_lens, image), Figure)
    page = emoji_logit_lens_html(clip_lens, image, layers=[-1])
    table = imagenet_emoji()
    top = clip_lens.patch_logits[-1, 0].argmax(-1).tolist()
    cells = re.findall(r'<div class="cell"[^>]*>([^<]*)</div>', page)
    assert cells == [table[i] for i in top]
    assert "http" not in page and "<link" not in page
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        plot_emoji_logit_lens(lens, x)


def test_imagenet_emoji_table() -> None:
    table = imagenet_emoji()
    assert len(table) == 1000 and all(isinstance(e, str) and e.strip() for e in table)
    assert set(table[151:269]) <= {"🐕", "🐩"}  # dogs
    assert table[0] == "🐟" and table[2] == "🦈" and table[145] == "🐧" and table[291] == "🦁"
    assert table[407] == "🚑" and table[963] == "🍕" and table[954] == "🍌"


# ---------------------------------------------------------------------------------------------- DLA
@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-reg", "test/vit-tiny-gap", "test/vit-tiny-attn-only",
                                  "test/video-tiny", "mean-ln", "attn-pool"])  # fmt: skip
def test_dla_sums_to_the_logit(name: str) -> None:
    m = model(name)
    x = inputs(m)
    logits = m(x)
    dla = direct_logit_attribution(m, x)
    assert_close(dla.logit, logits.max(-1).values)
    assert (dla.total - dla.logit).abs().max() < 1e-4
    assert_close(dla.per_token.sum(-1), dla.contributions[: dla.n_resid])
    diff = direct_logit_attribution(m, x, target=[1, 2, 0], baseline=3)
    assert_close(diff.logit, logits[:, [1, 2, 0]].diagonal() - logits[:, 3])
    assert (diff.total - diff.logit).abs().max() < 1e-4
    assert dla.heads().shape == (2, 4, 3) and dla.mlps().shape == (2, 3)
    if name == "test/vit-tiny-attn-only":
        assert (dla.mlps() == 0).all()


@pytest.mark.parametrize("bias", [None, -4.0])
def test_dla_clip_zero_shot_and_linear_probe(bias: float | None) -> None:
    m, zs = model("clip"), zero_shot(bias=bias)
    x = inputs(m)
    dla = direct_logit_attribution(m, x, classifier=zs, target=2)
    assert_close(dla.logit, zs(m(x))[:, 2])
    assert (dla.total - dla.logit).abs().max() < 1e-4
    assert "ln_pre.b" in dla.labels and "pos_embed" in dla.labels
    probe = torch.nn.Linear(16, 5)
    dla = direct_logit_attribution(m, x, classifier=probe, target=0, baseline=4)
    out = probe(m(x))
    assert (dla.total - (out[:, 0] - out[:, 4])).abs().max() < 1e-4


def test_dla_one_head_by_hand() -> None:
    """L1H2's contribution: its output at the class token through ln_final's frozen scale and W_U."""
    m = model("test/vit-tiny")
    x = inputs(m)
    dla = direct_logit_attribution(m, x, target=4)
    _, cache = m.run_with_cache(x)
    head = cache["blocks.1.attn.hook_z"][:, 0, 2] @ m.W_O[1, 2]  # [B, d] at the class token
    resid = cache["resid_post", -1][:, 0]
    scale = (resid - resid.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(m.ln_final.eps).sqrt()
    by_hand = ((head - head.mean(-1, keepdim=True)) / scale * m.ln_final.weight) @ m.W_U[:, 4]
    assert_close(dla.get("L1H2"), by_hand, atol=1e-5, rtol=1e-4)


def test_dla_plot_and_errors() -> None:
    from matplotlib.figure import Figure

    m = model("test/vit-tiny")
    dla = direct_logit_attribution(m, inputs(m))
    assert isinstance(plot_dla(dla, image=1), Figure)
    with pytest.raises(KeyError, match="No component"):
        dla.get("L9H9")
    with pytest.raises(ValueError, match="target"):
        direct_logit_attribution(m, inputs(m), target=[1, 2])
    with pytest.raises(TypeError, match="linear read-out"):
        direct_logit_attribution(m, inputs(m), classifier=torch.nn.Sequential(torch.nn.Linear(10, 3)))


# ---------------------------------------------------------------------------------------------- patching
@pytest.mark.parametrize("name", ["test/vit-tiny-reg", "test/video-tiny"])
def test_patching_clean_into_clean_changes_nothing(name: str) -> None:
    m = model(name)
    clean = inputs(m, batch=2)
    for hook, by, kwargs in [("resid_pre", "position", {}), ("z", "head", {}), ("attn_out", "all", {}),
                             ("pattern", "head_position", {"layers": [1]})]:  # fmt: skip
        result = activation_patching(m, clean, clean, hook=hook, by=by, **kwargs)
        assert result.effect.abs().max() < 1e-5, (hook, by)
        assert result.source == result.baseline
    assert result.values.shape == (1, 4, m.cfg.n_tokens)


@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-gap", "test/video-tiny"])
def test_patching_final_residual_gives_the_full_effect(name: str) -> None:
    m = model(name)
    clean, corrupted = inputs(m, batch=2, seed=1), inputs(m, batch=2, seed=2)
    last = f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"
    for direction in ("denoise", "noise"):
        whole = activation_patching(m, clean, corrupted, hook=last, by="all", direction=direction)
        assert abs(whole.source - whole.baseline) > 1e-3
        assert_close(whole.normalized(), torch.ones(1), atol=1e-4, rtol=0)
    per_pos = activation_patching(m, clean, corrupted, hook="resid_post", by="position")
    if m.cfg.pool == "cls":  # only the class token is read out
        assert_close(per_pos.normalized()[-1, 0], torch.tensor(1.0), atol=1e-4, rtol=0)
        assert per_pos.effect[-1, 1:].abs().max() < 1e-5
    else:  # mean pooling: every patch matters, prefix tokens none
        assert per_pos.effect[-1].abs().min() > 0


def test_patching_values_match_a_manual_patch_and_batching() -> None:
    m = model("test/vit-tiny")
    clean, corrupted = inputs(m, batch=2, seed=1), inputs(m, batch=2, seed=2)
    kwargs = dict(hook="z", by="head_position", layers=[0], positions=[0, 5, 9])
    result = activation_patching(m, clean, corrupted, batch_patches=5, **kwargs)
    one = activation_patching(m, clean, corrupted, batch_patches=1, **kwargs)
    assert_close(result.values, one.values, atol=1e-5, rtol=1e-5)
    _, cache = m.run_with_cache(clean, names_filter="blocks.0.attn.hook_z")

    def patch(z, hook):
        z = z.clone()
        z[:, 5, 3] = cache["blocks.0.attn.hook_z"][:, 5, 3]
        return z

    metric = LogitDiff.from_runs(m(clean), m(corrupted))
    manual = metric(m.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.attn.hook_z", patch)]))
    assert result.values.shape == (1, 4, 3) and result.positions == [0, 5, 9]
    assert_close(result.values[0, 3, 1], manual, atol=1e-5, rtol=1e-5)
    assert result.effect.abs().max() > 1e-4


def test_patching_plot_and_errors() -> None:
    from matplotlib.figure import Figure

    m = model("test/vit-tiny")
    clean, corrupted = inputs(m, batch=1, seed=1), inputs(m, batch=1, seed=2)
    result = activation_patching(m, clean, corrupted, hook="blocks.{layer}.hook_resid_mid")
    assert result.hook_names == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    fig = plot_patching(result, m)
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # heatmap, its colour bar, one patch grid per layer
    with pytest.raises(ValueError, match="per-head hook"):
        activation_patching(m, clean, corrupted, hook="resid_pre", by="head")
    with pytest.raises(KeyError, match="Closest valid names"):
        activation_patching(m, clean, corrupted, hook="blocks.{layer}.hook_resid_mdi")
    with pytest.raises(ValueError, match="one shape"):
        activation_patching(m, clean, torch.randn(2, 3, 16, 16))


# ---------------------------------------------------------------------------------------------- attention
def test_attention_patterns_plot_and_html_payload() -> None:
    from matplotlib.figure import Figure

    m = model("test/vit-tiny-reg")
    image = inputs(m, batch=1)[0]
    patterns = attention_patterns(m, image, layers=[-1])
    assert patterns.shape == (1, 1, 4, 19, 19)
    assert_close(patterns.sum(-1), torch.ones(1, 1, 4, 19))
    fig = plot_attention_heads(m, image, layers=[0, 1], heads=[1, 3])
    assert isinstance(fig, Figure) and [ax.get_title().split()[0] for ax in fig.axes] == [
        "L0H1",
        "L0H3",
        "L1H1",
        "L1H3",
    ]
    assert isinstance(
        plot_attention_heads(model("test/video-tiny"), inputs(model("test/video-tiny"), 1), time=1), Figure
    )

    page = attention_html(m, image, title="tiny </script> test")
    assert "<script src" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    data = json.loads(re.search(r'<script id="payload" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["n_prefix"] == 3 and data["prefix_labels"] == ["cls", "reg0", "reg1"] and data["grid"] == [4, 4]
    quantised = np.frombuffer(base64.b64decode(data["attn"]), np.uint8).reshape(2, 4, 19, 19)
    rowmax = np.frombuffer(base64.b64decode(data["rowmax"]), "<f4").reshape(2, 4, 19)
    full = attention_patterns(m, image)[:, 0].numpy()
    np.testing.assert_allclose(quantised / 255 * rowmax[..., None], full, atol=float(rowmax.max()) / 255)


# ---------------------------------------------------------------------------------------------- SAEs
def sae_for(m: HookedViT, hook: str, tokens: str = "all", arch: str = "relu", d_in: int = 32) -> SparseAutoencoder:
    torch.manual_seed(5)
    extra = {"k": 6} if arch in ("topk", "batchtopk") else {}  # k is a field of the top-k architectures only
    cfg = SAEConfig(d_in=d_in, d_sae=64, architecture=arch, hook_name=hook, tokens=tokens, **extra)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    return sae.eval()


@pytest.mark.parametrize("tokens", ["all", "cls", "patches"])
def test_splice_with_error_term_leaves_outputs_unchanged(tokens: str) -> None:
    m = model("test/vit-tiny-reg")
    x = inputs(m)
    sae = sae_for(m, "blocks.0.hook_resid_post", tokens)
    clean = m(x)
    with splice_saes(m, [sae], include_error=True):
        exact = m(x)
    with splice_saes(m, [sae]):
        spliced = m(x)
    assert_close(exact, clean, atol=1e-5, rtol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    assert not m.hook_dict["blocks.0.hook_resid_post"].has_hooks  # removed on exit
    assert_close(m(x), clean)

    # Without the error term, exactly the SAE's reconstruction sits at the trained-on positions.
    _, cache = m.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    act = cache["blocks.0.hook_resid_post"]
    positions = {"all": slice(None), "cls": slice(0, 1), "patches": slice(3, None)}[tokens]
    expected = act.clone()
    expected[:, positions] = sae(act[:, positions]).recon
    with splice_saes(m, sae):
        _, spliced_cache = m.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
    assert_close(spliced_cache["blocks.1.hook_resid_pre"], expected, atol=1e-5, rtol=1e-5)


def test_splice_transcoder_per_head_sae_and_exceptions() -> None:
    m = model("test/vit-tiny")
    x = inputs(m)
    clean = m(x)
    tc = Transcoder(TranscoderConfig(d_in=32, d_sae=64, hook_name="blocks.1.ln2.hook_normalized",
                                     hook_name_out="blocks.1.hook_mlp_out", skip_connection=True)).eval()  # fmt: skip
    z_sae = sae_for(m, "blocks.0.attn.hook_z", arch="topk")  # hook_z [B, T, 4, 8] read as 32-wide rows
    with splice_saes(m, [tc, z_sae], include_error=True):
        assert_close(m(x), clean, atol=1e-5, rtol=1e-5)
    with splice_saes(m, [tc]):
        _, cache = m.run_with_cache(x, names_filter=["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    expected = tc(cache["blocks.1.ln2.hook_normalized"], cache["blocks.1.hook_mlp_out"]).recon
    assert_close(cache["blocks.1.hook_mlp_out"], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), splice_saes(m, z_sae):
        raise RuntimeError("boom")
    assert not any(hp.has_hooks for hp in m.hook_points())
    with pytest.raises(ValueError, match="hook_name is empty"):
        splice_saes(m, sae_for(m, "")).__enter__()
    with pytest.raises(ValueError, match="32-wide"):
        with splice_saes(m, sae_for(m, "blocks.0.mlp.hook_post")):
            m(x)


def test_feature_steering_adds_the_decoder_direction() -> None:
    m = model("test/vit-tiny")
    x = inputs(m)
    sae = sae_for(m, "blocks.0.hook_resid_post")
    act = torch.randn(3, 17, 32)
    ((name, add),) = feature_steering(sae, 7, scale=2.5)
    assert name == "blocks.0.hook_resid_post"
    assert_close(add(act, None) - act, (2.5 * sae.W_dec[7]).expand_as(act).detach(), atol=1e-5, rtol=1e-5)
    ((_, clamp),) = feature_steering(sae, [3, 7], scale=[1.0, 0.0], mode="clamp")
    feats = sae.encode(act)
    expected = (1.0 - feats[..., 3:4]) * sae.W_dec[3] + (0.0 - feats[..., 7:8]) * sae.W_dec[7]
    assert_close(clamp(act, None) - act, expected.detach(), atol=1e-5, rtol=1e-5)
    patch_sae = sae_for(m, "blocks.0.hook_resid_post", tokens="patches")
    ((_, only_patches),) = feature_steering(patch_sae, 1, 3.0, model=m)
    delta = only_patches(act, None) - act
    assert delta[:, 0].abs().max() == 0 and delta[:, 1:].abs().min() > 0
    steered = m.run_with_hooks(x, fwd_hooks=feature_steering(sae, 7, 5.0))
    assert (steered - m(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pass model="):
        feature_steering(patch_sae, 1, 3.0)


def test_top_activating_matches_brute_force(tmp_path) -> None:
    m = model("test/vit-tiny")
    sae = sae_for(m, "blocks.1.hook_resid_pre", tokens="patches")
    batches = [(inputs(m, batch=4, seed=s), torch.zeros(4)) for s in range(3)]
    features = [5, 0, 17]
    result = top_activating(sae, m, batches, features, k=3)
    all_images = torch.cat([b[0] for b in batches])
    _, cache = m.run_with_cache(all_images, names_filter="blocks.1.hook_resid_pre")
    feats = sae.encode(cache["blocks.1.hook_resid_pre"])[:, 1:, features]  # patches only: [12, 16, 3]
    scores = feats.amax(1).T  # [3, 12]
    best = scores.topk(3, dim=1)
    assert_close(result.values, best.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.indices, best.indices)
    assert_close(result.images[1, 0], all_images[best.indices[1, 0]])
    assert_close(result.heatmaps[2, 1, 0].flatten(), feats[best.indices[2, 1], :, 2], atol=1e-5, rtol=1e-5)
    assert result.n_images == 12 and result.heatmaps.shape == (3, 3, 1, 4, 4)
    path = save_top_activating(result, tmp_path / "grid.png")
    assert path.stat().st_size > 1000
    assert len(plot_top_activating(result).axes) == 9


def test_top_activating_over_a_dsprites_data_module() -> None:
    from prisma_lightning.datamodules import DSpritesDataModule

    m = randomize_(HookedViT(HookedViTConfig(**{**TINY, "image_size": 32, "patch_size": 8}, in_channels=1,
                                             n_classes=3))).eval()  # fmt: skip
    data = DSpritesDataModule(cache=False, subset_size=40, val_fraction=0.5, test_fraction=0.0, image_size=32,
                              batch_size=8)  # fmt: skip
    sae = sae_for(m, "blocks.0.hook_resid_post", tokens="cls")
    result = top_activating(sae, m, data, [1, 2], k=4)
    assert result.n_images == 20 and result.images.shape == (2, 4, 1, 32, 32)
    assert (result.values[:, :-1] >= result.values[:, 1:]).all()
    _, cache = m.run_with_cache(result.images[0], names_filter="blocks.0.hook_resid_post")
    assert_close(sae.encode(cache["blocks.0.hook_resid_post"][:, 0])[:, 1], result.values[0], atol=1e-5, rtol=1e-5)
