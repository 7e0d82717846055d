"""ViT-Prisma's hook names on a HookedViT: aliases of ours, and the optional per-head / MLP input hooks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from torch.testing import assert_close

from prisma_lightning.backbones import TEST_CONFIGS, VIT_PRISMA_ALIASES, HookedViT, HookedViTConfig
from prisma_lightning.hooks import HookPoint, act_name
from prisma_lightning.interp import splice_saes
from prisma_lightning.sae import SparseAutoencoder

FIXTURES = Path(__file__).parent / "fixtures" / "vit_prisma"


def make(name: str = "test/vit-tiny-reg", **overrides) -> HookedViT:
    """A registry test model with non-trivial random weights (LayerNorm weights and biases too)."""
    return randomize_(HookedViT(dataclasses.replace(TEST_CONFIGS[name], **overrides))).eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def double(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return 2 * x


# ---------------------------------------------------------------------------------------------- aliases
def test_aliases_exist_where_their_hooks_do() -> None:
    reg = make("test/vit-tiny-reg")  # ln_pre, ln_final, classifier head
    assert reg.hook_aliases == VIT_PRISMA_ALIASES
    gap = make("test/vit-tiny-gap")  # fc_norm after pooling: no ln_final, no ln_pre
    assert gap.hook_aliases == {"hook_post_head_pre_normalize": "hook_head_out"}
    headless = make("test/vit-tiny", head="none")  # the output is the pooled vector
    assert headless.hook_aliases["hook_post_head_pre_normalize"] == "hook_pooled"
    for alias in reg.hook_aliases:
        assert alias not in reg.hook_dict  # hook_dict stays canonical: caching everything has no duplicates


@pytest.mark.parametrize("alias", sorted(VIT_PRISMA_ALIASES))
def test_alias_caches_the_canonical_tensor(alias: str) -> None:
    model = make()
    x = images()
    canonical = VIT_PRISMA_ALIASES[alias]
    with torch.no_grad():
        out, full = model.run_with_cache(x)
        _, by_alias = model.run_with_cache(x, names_filter=alias)
        _, by_list = model.run_with_cache(x, names_filter=[alias, canonical])
        _, by_predicate = model.run_with_cache(x, names_filter=lambda n: n == alias)
    assert list(by_alias.keys()) == [canonical]  # stored once, under the canonical name
    assert list(by_list.keys()) == [canonical]
    assert list(by_predicate.keys()) == [canonical]
    for cache in (by_alias, by_list, by_predicate):
        assert_close(cache[alias], full[canonical])
        assert cache[alias] is cache[canonical]
        assert alias in cache
    assert_close(full[alias], full[canonical])
    if alias == "hook_post_head_pre_normalize":
        assert_close(full[alias], out)  # the head output is the model output
    if alias == "hook_ln_pre":
        assert_close(full[alias], full["blocks.0.hook_resid_pre"])  # ln_pre's output enters block 0
    if alias == "hook_ln_final":
        assert_close(full[alias][:, 0], full["hook_pooled"])  # class-token pooling reads ln_final's output


@pytest.mark.parametrize("alias", sorted(VIT_PRISMA_ALIASES))
def test_alias_works_in_hooks_and_helpers(alias: str) -> None:
    model = make()
    x = images()
    canonical = VIT_PRISMA_ALIASES[alias]
    with torch.no_grad():
        clean = model(x)
        via_alias = model.run_with_hooks(x, fwd_hooks=[(alias, double)])
        via_canonical = model.run_with_hooks(x, fwd_hooks=[(canonical, double)])
        with model.hooks(fwd_hooks=[(alias, double)]):
            in_context = model(x)
    assert (via_alias - clean).abs().max() > 1e-3  # the hook really ran and changed the output
    assert_close(via_alias, via_canonical)
    assert_close(in_context, via_canonical)
    assert not any(hp.has_hooks for hp in model.hook_points())
    assert model.resolve_hooks(alias) == [model.hook_dict[canonical]]
    assert model.canonical_hook_name(alias) == canonical
    assert model.hook_width(alias) == model.hook_width(canonical)
    assert model.stop_layer_for_all([alias]) == model.stop_layer_for_all([canonical])
    assert model.stop_layer_for(alias) == {"hook_ln_pre": 0}.get(alias)
    handles = model.add_hook(alias, double)
    assert [h.hook_point for h in handles] == [model.hook_dict[canonical]]
    model.reset_hooks()


def test_alias_gradients_are_cached_under_the_alias_too() -> None:
    model = make()
    out, cache = model.run_with_cache(images(), names_filter=["hook_ln_final", "hook_post_head_pre_normalize"],
                                      incl_bwd=True)  # fmt: skip
    out.sum().backward()
    assert_close(cache["hook_post_head_pre_normalize_grad"], torch.ones_like(out))
    assert cache["hook_ln_final_grad"] is cache["ln_final.hook_normalized_grad"]
    assert cache["hook_ln_final_grad"].shape == cache["hook_ln_final"].shape


def test_unknown_names_list_close_names_including_aliases() -> None:
    model = make()
    with pytest.raises(KeyError) as err:
        model.run_with_cache(images(), names_filter="hook_ln_finl")
    assert "hook_ln_final" in str(err.value)
    with pytest.raises(KeyError) as err:
        model.run_with_hooks(images(), fwd_hooks=[("hook_post_head_pre_normalise", double)])
    assert "hook_post_head_pre_normalize" in str(err.value)
    with pytest.raises(KeyError) as err:
        model.hook_width("hook_ln_pree")
    assert "hook_ln_pre" in str(err.value)
    gap = make("test/vit-tiny-gap")  # no ln_final: its alias does not exist either
    with pytest.raises(KeyError):
        gap.resolve_hooks("hook_ln_final")
    _, cache = model.run_with_cache(images(), names_filter="hook_ln_pre")
    with pytest.raises(KeyError) as err:
        cache["hook_ln_final"]  # a known alias that was not cached
    assert "ln_final.hook_normalized" in str(err.value)
    assert "hook_ln_final" not in cache


def test_setup_hooks_rejects_bad_aliases() -> None:
    model = make()
    with pytest.raises(ValueError, match="not a hook"):
        model.setup_hooks(aliases={"hook_x": "blocks.9.hook_resid_post"})
    with pytest.raises(ValueError, match="already the name"):
        model.setup_hooks(aliases={"hook_embed": "hook_pooled"})


# ---------------------------------------------------------------------------------------------- *_input hooks
INPUT_FLAGS = dict(use_split_qkv_input=True, use_attn_in=True, use_hook_mlp_in=True)


def input_hook_names(i: int) -> list[str]:
    return [f"blocks.{i}.hook_{n}" for n in ("attn_in", "q_input", "k_input", "v_input", "mlp_in")]


def test_input_hooks_are_off_by_default_and_added_by_the_flags() -> None:
    plain = make("test/vit-tiny")
    assert not any(n in plain.hook_dict for i in range(2) for n in input_hook_names(i))
    model = make("test/vit-tiny", **INPUT_FLAGS)
    assert all(n in model.hook_dict for i in range(2) for n in input_hook_names(i))
    only_mlp = make("test/vit-tiny", use_hook_mlp_in=True)
    assert "blocks.0.hook_mlp_in" in only_mlp.hook_dict and "blocks.0.hook_attn_in" not in only_mlp.hook_dict
    only_split = make("test/vit-tiny", use_split_qkv_input=True)
    assert "blocks.1.hook_q_input" in only_split.hook_dict and "blocks.1.hook_attn_in" not in only_split.hook_dict
    with pytest.raises(ValueError, match="attn_only"):
        HookedViTConfig(**{**TEST_CONFIGS["test/vit-tiny-attn-only"].to_dict(), "use_hook_mlp_in": True})
    # The flags add no parameters: the same weights load into either model.
    assert plain.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("flags", [INPUT_FLAGS, dict(use_split_qkv_input=True), dict(use_attn_in=True)])
def test_input_hooks_values_shapes_and_unchanged_output(flags: dict) -> None:
    plain = make("test/vit-tiny-reg")
    model = make("test/vit-tiny-reg", **flags)
    model.load_state_dict(plain.state_dict())
    x = images(3)
    with torch.no_grad():
        out, cache = model.run_with_cache(x)
        expected_out, expected = plain.run_with_cache(x)
    assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    B, T, h, d = 3, model.cfg.n_tokens, model.cfg.n_heads, model.cfg.d_model
    for i in range(2):
        resid_pre = cache[f"blocks.{i}.hook_resid_pre"]
        per_head = resid_pre[:, :, None].expand(B, T, h, d)
        names = [n for n in input_hook_names(i) if n in model.hook_dict and not n.endswith("mlp_in")]
        assert names
        for name in names:
            assert cache[name].shape == (B, T, h, d)
            assert_close(cache[name], per_head)
        if "blocks.0.hook_mlp_in" in model.hook_dict:
            assert cache[f"blocks.{i}.hook_mlp_in"].shape == (B, T, d)
            assert_close(cache[f"blocks.{i}.hook_mlp_in"], cache[f"blocks.{i}.hook_resid_mid"])
        for name in ("attn.hook_q", "attn.hook_z", "hook_attn_out", "hook_resid_post"):
            assert_close(cache[f"blocks.{i}.{name}"], expected[f"blocks.{i}.{name}"], atol=1e-5, rtol=1e-5)
    width_hook = "blocks.1.hook_q_input" if flags.get("use_split_qkv_input") else "blocks.1.hook_attn_in"
    assert model.hook_width(width_hook) == d
    assert model.stop_layer_for(width_hook) == 2


def test_input_hook_shorthands() -> None:
    assert act_name("q_input", 1) == "blocks.1.hook_q_input"
    assert act_name("attn_in", 0) == "blocks.0.hook_attn_in"
    assert act_name("mlp_in", 2) == "blocks.2.hook_mlp_in"
    model = make("test/vit-tiny", **INPUT_FLAGS)
    _, cache = model.run_with_cache(images(), names_filter=input_hook_names(1))
    assert cache["k_input", 1] is cache["blocks.1.hook_k_input"]
    assert cache["mlp_in", -1] is cache["blocks.1.hook_mlp_in"]


def test_editing_one_heads_query_input_changes_only_that_head() -> None:
    model = make("test/vit-tiny-reg", use_split_qkv_input=True)
    x = images()
    head = 2
    delta = torch.randn(2, model.cfg.n_tokens, model.cfg.d_model, generator=torch.Generator().manual_seed(7))

    def edit(q_in: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        q_in = q_in.clone()
        q_in[:, :, head] += delta
        return q_in

    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.0."))
        with model.hooks(fwd_hooks=[("blocks.0.hook_q_input", edit)]):
            _, edited = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.0."))
    q_clean, q_edit = clean["blocks.0.attn.hook_q"], edited["blocks.0.attn.hook_q"]
    others = [i for i in range(model.cfg.n_heads) if i != head]
    assert_close(q_edit[:, :, others], q_clean[:, :, others])
    assert (q_edit[:, :, head] - q_clean[:, :, head]).abs().max() > 1e-3
    # The edited head's query is ln1 of its edited copy, through that head's W_Q and bias.
    ln = model.blocks[0].ln1
    normed = F.layer_norm(clean["blocks.0.hook_resid_pre"] + delta, (model.cfg.d_model,), ln.weight, ln.bias, ln.eps)
    expected = normed @ model.W_Q[0, head] + model.b_Q[0, head]
    assert_close(q_edit[:, :, head], expected, atol=1e-5, rtol=1e-5)
    # Keys and values read their own copies, which were not edited.
    assert_close(edited["blocks.0.attn.hook_k"], clean["blocks.0.attn.hook_k"])
    assert_close(edited["blocks.0.attn.hook_v"], clean["blocks.0.attn.hook_v"])
    # An edit of ln1's output still reaches every head alongside the per-head copies.
    with torch.no_grad():
        zeroed = model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda t, hook: 0 * t)])
        plain = make("test/vit-tiny-reg")
        plain.load_state_dict(model.state_dict())
        reference = plain.run_with_hooks(x, fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda t, hook: 0 * t)])
    assert_close(zeroed, reference, atol=1e-5, rtol=1e-5)


def test_editing_attn_in_reaches_queries_keys_and_values_of_that_head() -> None:
    model = make("test/vit-tiny", use_attn_in=True, use_split_qkv_input=True)
    x = images()

    def bump(a: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        a = a.clone()
        a[:, :, 1] += torch.linspace(-2, 2, a.shape[-1])  # not a constant: ln1 would centre that away
        return a

    with torch.no_grad():
        _, clean = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.0."))
        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_in", bump)]):
            _, edited = model.run_with_cache(x, names_filter=lambda n: n.startswith("blocks.0."))
    for name in ("hook_q_input", "hook_k_input", "hook_v_input"):
        assert_close(edited[f"blocks.0.{name}"], bump(clean[f"blocks.0.{name}"], None))
    for name in ("hook_q", "hook_k", "hook_v"):
        diff = (edited[f"blocks.0.attn.{name}"] - clean[f"blocks.0.attn.{name}"]).abs().amax(dim=(0, 1, 3))  # [h]
        assert diff[1] > 1e-3 and diff[[0, 2, 3]].max() < 1e-6


def test_editing_mlp_in_changes_the_mlp_but_not_the_residual() -> None:
    model = make("test/vit-tiny", use_hook_mlp_in=True)
    x = images()
    shift = torch.linspace(-2, 2, 32)  # not a constant or a scale: ln2 would remove those

    with torch.no_grad():
        _, clean = model.run_with_cache(x)
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", lambda t, hook: t + shift)]):
            _, edited = model.run_with_cache(x)
    assert_close(edited["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_mid"])
    assert (edited["blocks.0.hook_mlp_out"] - clean["blocks.0.hook_mlp_out"]).abs().max() > 1e-3
    ln2 = model.blocks[0].ln2
    expected = F.layer_norm(clean["blocks.0.hook_resid_mid"] + shift, (32,), ln2.weight, ln2.bias, ln2.eps)
    assert_close(edited["blocks.0.ln2.hook_normalized"], expected, atol=1e-5, rtol=1e-5)


def test_input_hooks_survive_fold_layer_norm() -> None:
    model = make("test/vit-tiny-reg", use_split_qkv_input=True)
    x = images()
    with torch.no_grad():
        before = model(x)
        after = model.fold_layer_norm()(x)
    assert_close(after, before, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- ViT-Prisma SAE
def vit_prisma_sae_on_ln_final(tmp_path: Path) -> Path:
    """ViT-Prisma's relu fixture (d_in 16), re-pointed at ``hook_ln_final`` of a 16-wide model."""
    folder = tmp_path / "vit_prisma_ln_final"
    shutil.copytree(FIXTURES / "relu", folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(hook_point="hook_ln_final", model_name="tiny-16")
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def tiny16() -> HookedViT:
    cfg = HookedViTConfig(d_model=16, n_layers=1, n_heads=4, image_size=8, patch_size=4, n_classes=10)
    return randomize_(HookedViT(cfg)).eval()


def test_vit_prisma_sae_config_on_hook_ln_final_resolves_and_splices(tmp_path: Path) -> None:
    sae = SparseAutoencoder.load(vit_prisma_sae_on_ln_final(tmp_path)).eval()
    assert sae.cfg.hook_name == "hook_ln_final"
    model = tiny16()
    assert model.hook_width(sae.cfg.hook_name) == sae.d_in == 16
    assert model.stop_layer_for_all([sae.cfg.hook_name]) is None
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean, cache = model.run_with_cache(x, names_filter=[sae.cfg.hook_name])
        acts = cache[sae.cfg.hook_name]
        assert_close(acts, cache["ln_final.hook_normalized"])
        with splice_saes(model, [sae], include_error=True):
            exact = model(x)
        with splice_saes(model, [sae]):
            _, spliced = model.run_with_cache(x, names_filter="hook_pooled")
    assert_close(exact, clean, atol=1e-5, rtol=1e-5)
    assert_close(spliced["hook_pooled"], sae(acts[:, 0]).recon, atol=1e-5, rtol=1e-5)


def test_vit_prisma_sae_config_on_hook_ln_final_trains(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from prisma_lightning.modules import SAEModule

    module = SAEModule(str(vit_prisma_sae_on_ln_final(tmp_path)), backbone=tiny16(), buffer_tokens=0,
                       batch_tokens=15, init_tokens=15, lr=1e-3, export_dir=str(tmp_path / "out"))  # fmt: skip
    before = {k: v.detach().clone() for k, v in module.sae.named_parameters()}
    data = DataLoader(TensorDataset(torch.randn(12, 3, 8, 8), torch.zeros(12)), batch_size=3)
    quiet = dict(enable_progress_bar=False, logger=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, enable_checkpointing=False, **quiet)
    trainer.fit(module, data)
    assert trainer.global_step == 3 and int(module.tokens_seen) == 3 * 15  # 3 images x 5 tokens of hook_ln_final
    assert any(not torch.equal(v, before[k]) for k, v in module.sae.named_parameters())
    assert SparseAutoencoder.load(tmp_path / "out").cfg.hook_name == "hook_ln_final"

    # Evaluation splices the SAE back in at the alias (recon cos sim, CE with the backbone's classifier head).
    from prisma_lightning.callbacks import SAEEvaluator

    evaluator = SAEEvaluator(n_batches=None)
    labelled = DataLoader(TensorDataset(torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))), batch_size=3)
    pl.Trainer(default_root_dir=tmp_path, callbacks=[evaluator], **quiet).validate(module, labelled)
    results = evaluator.results
    assert results["hook_name"] == "hook_ln_final"
    assert -1.0 <= results["recon_cos_sim"] <= 1.0 and results["recon_cos_sim"] < 1.0 - 1e-6
    assert results["ce_recon"] != results["ce_clean"]
