"""HookPoint / HookedModule behaviour on tiny HookedViTs (eval mode, fixed seeds, random 16x16 images)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from prisma_lightning.backbones.hooked_vit import HookedViT
from prisma_lightning.backbones.registry import TEST_CONFIGS, load_hooked_model
from prisma_lightning.hooks import ActivationCache, HookedModule, HookPoint

N_LAYERS = 2


def make_model(name: str = "test/vit-tiny", **overrides) -> HookedViT:
    """A tiny HookedViT with non-trivial random weights (biases and LayerNorms perturbed too)."""
    torch.manual_seed(0)
    model = HookedViT(dataclasses.replace(TEST_CONFIGS[name], **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> HookedViT:
    return make_model()


@pytest.fixture
def images() -> torch.Tensor:
    return make_images()


def no_hooks_left(model: HookedModule) -> bool:
    return not any(hp.has_hooks for hp in model.hook_dict.values())


def design_hook_names(cfg) -> list[str]:
    """Every hook name DESIGN.md lists for a config (hook_result exists as a point on every model)."""
    names = ["hook_embed", "hook_pos_embed", "hook_full_embed", "hook_pooled", "hook_head_out"]
    if cfg.ln_pre:
        names.append("ln_pre.hook_normalized")
    if cfg.final_norm:
        names.append("ln_final.hook_normalized")
    for i in range(cfg.n_layers):
        names += [
            f"blocks.{i}.hook_resid_pre",
            f"blocks.{i}.ln1.hook_normalized",
            f"blocks.{i}.attn.hook_q",
            f"blocks.{i}.attn.hook_k",
            f"blocks.{i}.attn.hook_v",
            f"blocks.{i}.attn.hook_attn_scores",
            f"blocks.{i}.attn.hook_pattern",
            f"blocks.{i}.attn.hook_z",
            f"blocks.{i}.attn.hook_result",
            f"blocks.{i}.hook_attn_out",
            f"blocks.{i}.hook_resid_post",
        ]
        if not cfg.attn_only:
            names += [
                f"blocks.{i}.hook_resid_mid",
                f"blocks.{i}.ln2.hook_normalized",
                f"blocks.{i}.mlp.hook_pre",
                f"blocks.{i}.mlp.hook_post",
                f"blocks.{i}.hook_mlp_out",
            ]
    return names


MLP_HOOK_SUFFIXES = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out")


# ---------------------------------------------------------------------------------------------- hook names
@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-reg", "test/vit-tiny-attn-only"])
def test_design_hook_names_exist(name: str) -> None:
    model = load_hooked_model(name, pretrained=False)
    expected = design_hook_names(model.cfg)
    missing = [n for n in expected if n not in model.hook_dict]
    assert missing == []
    for n in expected:
        hp = model.hook_dict[n]
        assert isinstance(hp, HookPoint)
        assert hp.name == n
        assert model.get_submodule(n) is hp
    # ln_pre only where the config asks for it.
    assert ("ln_pre.hook_normalized" in model.hook_dict) == model.cfg.ln_pre
    # Attention-only models have no mid-residual or MLP hooks at all.
    has_mlp_hooks = any(n.endswith(MLP_HOOK_SUFFIXES) for n in model.hook_dict)
    assert has_mlp_hooks == (not model.cfg.attn_only)


def test_every_hook_fires_with_design_shapes_and_values() -> None:
    model = make_model(use_attn_result=True)
    x = make_images(batch=3)
    out, cache = model.run_with_cache(x)
    cfg = model.cfg
    B, T, d, h, dh = 3, cfg.n_tokens, cfg.d_model, cfg.n_heads, cfg.d_head
    # Everything in hook_dict fired (no ln_pre and hook_scale fires because the cache asks for it).
    assert set(cache.keys()) == set(model.hook_dict)
    assert cache["hook_embed"].shape == (B, cfg.n_patches, d)
    assert cache["hook_full_embed"].shape == (B, T, d)
    assert cache["blocks.0.attn.hook_q"].shape == (B, T, h, dh)
    assert cache["blocks.0.attn.hook_pattern"].shape == (B, h, T, T)
    assert cache["blocks.0.attn.hook_attn_scores"].shape == (B, h, T, T)
    assert cache["blocks.0.attn.hook_result"].shape == (B, T, h, d)
    assert cache["hook_pooled"].shape == (B, d)
    assert cache["hook_head_out"].shape == (B, cfg.n_classes)
    # Values: the hooks sit where the design says.
    assert_close(cache["hook_head_out"], out)
    assert_close(cache["hook_pooled"], cache["ln_final.hook_normalized"][:, 0])
    embed = torch.cat([model.cls_token.expand(B, -1, -1), cache["hook_embed"]], dim=1)
    assert_close(cache["hook_full_embed"], embed + cache["hook_pos_embed"])
    assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_full_embed"])
    for i in range(N_LAYERS):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        assert_close(mid, pre + cache[f"blocks.{i}.hook_attn_out"])
        assert_close(post, mid + cache[f"blocks.{i}.hook_mlp_out"])
        assert_close(cache[f"blocks.{i}.mlp.hook_post"], F.gelu(cache[f"blocks.{i}.mlp.hook_pre"]))
        if i + 1 < N_LAYERS:
            assert_close(cache[f"blocks.{i + 1}.hook_resid_pre"], post)


def test_hook_result_fires_only_with_use_attn_result(images: torch.Tensor) -> None:
    is_result = lambda n: n.endswith("attn.hook_result")  # noqa: E731
    _, cache = make_model().run_with_cache(images, names_filter=is_result)
    assert len(cache) == 0
    _, cache = make_model(use_attn_result=True).run_with_cache(images, names_filter=is_result)
    assert sorted(cache.keys()) == [f"blocks.{i}.attn.hook_result" for i in range(N_LAYERS)]


def test_use_attn_result_does_not_change_output(images: torch.Tensor) -> None:
    assert_close(make_model(use_attn_result=True)(images), make_model()(images), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- contexts
def zero_hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return torch.zeros_like(x)


def double_hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return 2 * x


def test_hooks_context_removes_hooks_on_normal_exit(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    hp = model.hook_dict["blocks.0.hook_attn_out"]
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero_hook)]) as m:
        assert m is model
        assert hp.has_hooks
        ablated = model(images)
    assert not torch.allclose(ablated, clean)
    assert not hp.has_hooks
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)


def test_hooks_context_removes_hooks_after_exception(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    hp = model.hook_dict["blocks.0.hook_attn_out"]
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(
            fwd_hooks=[("blocks.0.hook_attn_out", zero_hook)],
            bwd_hooks=[("blocks.1.hook_resid_post", lambda g, hook: None)],
        ):
            assert hp.has_hooks
            model(images)
            raise RuntimeError("boom")
    assert not hp.has_hooks
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)


def test_exception_raised_inside_a_hook_still_removes_hooks(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)

    def failing(x: torch.Tensor, hook: HookPoint) -> None:
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        model.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_mlp_out", failing)])
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)


def test_unknown_name_in_context_removes_hooks_added_before_it(model: HookedViT, images: torch.Tensor) -> None:
    with pytest.raises(KeyError):
        with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero_hook), ("blocks.0.hook_nope", zero_hook)]):
            pass  # pragma: no cover - never reached
    assert no_hooks_left(model)


def test_nested_contexts_remove_only_their_own_hooks(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    outer_hp = model.hook_dict["blocks.0.hook_attn_out"]
    inner_hp = model.hook_dict["blocks.1.hook_mlp_out"]
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", double_hook)]):
        outer_only = model(images)
        with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", zero_hook), ("blocks.0.hook_attn_out", double_hook)]):
            assert len(outer_hp._handles) == 2
            both = model(images)
        assert len(outer_hp._handles) == 1
        assert not inner_hp.has_hooks
        assert torch.equal(model(images), outer_only)
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)
    assert not torch.allclose(outer_only, clean)
    assert not torch.allclose(both, outer_only)
    # The two stacked doublings on the same point really compose: 4 * attn_out.
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: 4 * x)]):
        x4 = model.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_mlp_out", zero_hook)])
    assert_close(x4, both)


def test_permanent_hooks_survive_reset_and_contexts(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    hp = model.hook_dict["blocks.0.hook_attn_out"]
    model.add_perma_hook("blocks.0.hook_attn_out", zero_hook)
    perma = model(images)
    assert not torch.allclose(perma, clean)
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", double_hook)]):
        assert not torch.allclose(model(images), perma)
    assert torch.equal(model(images), perma)
    model.add_hook("blocks.1.hook_mlp_out", double_hook)  # a temporary hook outside any context
    model.reset_hooks()
    assert len(hp._handles) == 1 and hp._handles[0].is_permanent
    assert not model.hook_dict["blocks.1.hook_mlp_out"].has_hooks
    assert torch.equal(model(images), perma)
    with model.hooks():
        model.reset_hooks()  # also inside a context
    assert torch.equal(model(images), perma)
    model.reset_hooks(including_permanent=True)
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)


def test_reset_hooks_by_direction(model: HookedViT) -> None:
    name = "blocks.0.hook_resid_post"
    model.add_hook(name, lambda x, hook: None, dir="fwd")
    model.add_hook(name, lambda g, hook: None, dir="bwd")
    model.reset_hooks(direction="fwd")
    assert [h.direction for h in model.hook_dict[name]._handles] == ["bwd"]
    model.reset_hooks(direction="bwd")
    assert not model.hook_dict[name].has_hooks


def test_add_hook_rejects_bad_direction(model: HookedViT) -> None:
    with pytest.raises(ValueError, match="dir"):
        model.hook_dict["hook_embed"].add_hook(lambda x, hook: None, dir="sideways")


def test_handle_remove_is_idempotent(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    (handle,) = model.add_hook("blocks.0.hook_attn_out", zero_hook)
    assert not torch.allclose(model(images), clean)
    handle.remove()
    handle.remove()
    assert no_hooks_left(model)
    assert torch.equal(model(images), clean)


def test_prepend_runs_first(model: HookedViT, images: torch.Tensor) -> None:
    order: list[str] = []
    seen: dict[str, torch.Tensor] = {}

    def recorder(tag: str, replace: bool = False):
        def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            order.append(tag)
            seen[tag] = x
            return torch.zeros_like(x) if replace else None

        return fn

    name = "blocks.0.hook_resid_mid"
    model.add_hook(name, recorder("appended"))
    model.add_hook(name, recorder("prepended", replace=True), prepend=True)
    model(images)
    assert order == ["prepended", "appended"]
    # The appended hook sees what the prepended one returned.
    assert torch.count_nonzero(seen["appended"]) == 0
    assert torch.count_nonzero(seen["prepended"]) > 0
    model.reset_hooks()

    order.clear()
    with model.hooks(fwd_hooks=[(name, recorder("a"))]):
        with model.hooks(fwd_hooks=[(name, recorder("b"))], prepend=True):
            model(images)
    assert order == ["b", "a"]


def test_predicate_names_hook_every_matching_point(model: HookedViT, images: torch.Tensor) -> None:
    calls: list[str] = []
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_resid_post"), lambda x, hook: calls.append(hook.name))]):
        model(images)
    assert calls == [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]


# ---------------------------------------------------------------------------------------------- ablation
def test_zero_ablation_changes_output_and_cache_sees_it(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero_hook)]):
        ablated, cache = model.run_with_cache(images)
    assert not torch.allclose(ablated, clean)
    assert torch.count_nonzero(cache["blocks.0.hook_attn_out"]) == 0
    assert torch.equal(cache["blocks.0.hook_resid_mid"], cache["blocks.0.hook_resid_pre"])
    assert_close(ablated, cache["hook_head_out"])


def test_returned_tensor_replaces_activation(model: HookedViT, images: torch.Tensor) -> None:
    clean_out, clean = model.run_with_cache(images, names_filter="blocks.1.hook_resid_post")
    bump = torch.randn(model.cfg.d_model)  # a direction, not a constant (LayerNorm would remove that)
    out = model.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: x + bump)])
    assert not torch.allclose(out, clean_out)
    # Replacing the final residual by x + bump is exactly what the head then sees.
    expected = model.forward_head(clean["blocks.1.hook_resid_post"] + bump)
    assert_close(out, expected)


def test_hook_returning_none_leaves_output_unchanged(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    calls: list[str] = []
    out = model.run_with_hooks(
        images, fwd_hooks=[(lambda n: "hook_resid" in n or n.endswith("hook_z"), lambda x, hook: calls.append(1))]
    )
    assert len(calls) == 3 * N_LAYERS + N_LAYERS
    assert torch.equal(out, clean)


# ---------------------------------------------------------------------------------------------- run_with_cache
def test_run_with_cache_names_filter_variants(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)
    name = "blocks.1.hook_resid_post"
    _, full = model.run_with_cache(images)

    out, cache = model.run_with_cache(images, names_filter=name)
    assert list(cache.keys()) == [name]
    assert torch.equal(out, clean)
    assert_close(cache[name], full[name])

    wanted = ["blocks.0.attn.hook_q", "hook_embed", "ln_final.hook_normalized"]
    _, cache = model.run_with_cache(images, names_filter=wanted)
    assert set(cache.keys()) == set(wanted)
    for n in wanted:
        assert_close(cache[n], full[n])

    pred = lambda n: n.startswith("blocks.1.") and "ln" not in n  # noqa: E731
    _, cache = model.run_with_cache(images, names_filter=pred)
    expected = {n for n in model.hook_dict if pred(n) and not n.endswith("hook_result")}
    assert set(cache.keys()) == expected

    # None caches every hook that fires; only hook_result (off by default) does not.
    assert set(full.keys()) == {n for n in model.hook_dict if not n.endswith("hook_result")}
    assert isinstance(full, ActivationCache)
    assert no_hooks_left(model)


def test_run_with_cache_output_matches_plain_forward(model: HookedViT, images: torch.Tensor) -> None:
    out, _ = model.run_with_cache(images)  # caches patterns and LN scales: the explicit paths
    assert_close(out, model(images), atol=1e-5, rtol=1e-5)


def test_unknown_hook_name_suggests_close_name(model: HookedViT, images: torch.Tensor) -> None:
    with pytest.raises(KeyError) as err:
        model.run_with_cache(images, names_filter="blocks.0.hook_resid_pst")
    assert "blocks.0.hook_resid_post" in str(err.value)
    with pytest.raises(KeyError) as err:
        model.run_with_cache(images, names_filter=["hook_embed", "blocks.1.attn.hook_patern"])
    assert "blocks.1.attn.hook_pattern" in str(err.value)
    with pytest.raises(KeyError) as err:
        model.run_with_hooks(images, fwd_hooks=[("blocks.1.mlp.hook_psot", zero_hook)])
    assert "blocks.1.mlp.hook_post" in str(err.value)
    with pytest.raises(KeyError) as err:
        model.add_hook("blocks.0.ln1.hook_normalised", zero_hook)
    assert "blocks.0.ln1.hook_normalized" in str(err.value)
    assert no_hooks_left(model)


def test_names_filter_rejects_non_strings(model: HookedViT, images: torch.Tensor) -> None:
    with pytest.raises(TypeError):
        model.run_with_cache(images, names_filter=["hook_embed", 3])


@pytest.mark.parametrize("stop", [0, 1, 2])
def test_stop_at_layer(model: HookedViT, images: torch.Tensor, stop: int) -> None:
    _, full = model.run_with_cache(images)
    out, cache = model.run_with_cache(images, stop_at_layer=stop)
    expected = full["blocks.0.hook_resid_pre"] if stop == 0 else full[f"blocks.{stop - 1}.hook_resid_post"]
    assert out.shape == (2, model.cfg.n_tokens, model.cfg.d_model)
    assert_close(out, expected)
    later = [n for n in cache.keys() if n.startswith("blocks.") and int(n.split(".")[1]) >= stop]
    assert later == []
    for n in ("ln_final.hook_normalized", "hook_pooled", "hook_head_out"):
        assert n not in cache
    for i in range(stop):
        assert_close(cache[f"blocks.{i}.hook_resid_post"], full[f"blocks.{i}.hook_resid_post"])
    assert_close(model(images, stop_at_layer=stop), expected)


def test_stop_at_layer_needs_a_forward_that_takes_it(images: torch.Tensor) -> None:
    class Plain(HookedModule):
        def __init__(self) -> None:
            super().__init__()
            self.hook_x = HookPoint()
            self.setup_hooks()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.hook_x(x) * 2

    plain = Plain()
    assert list(plain.hook_dict) == ["hook_x"]
    out, cache = plain.run_with_cache(images)
    assert_close(out, 2 * images)
    assert_close(cache["hook_x"], images)
    with pytest.raises(TypeError, match="stop_at_layer"):
        plain.run_with_cache(images, stop_at_layer=1)


def test_run_with_cache_device_cpu(model: HookedViT, images: torch.Tensor) -> None:
    _, ref = model.run_with_cache(images, names_filter="blocks.0.attn.hook_z")
    _, cache = model.run_with_cache(images, names_filter="blocks.0.attn.hook_z", device="cpu")
    z = cache["blocks.0.attn.hook_z"]
    assert z.device.type == "cpu"
    assert not z.requires_grad
    assert_close(z, ref["blocks.0.attn.hook_z"])
    _, cache = model.run_with_cache(images, names_filter="blocks.0.attn.hook_z", device=torch.device("cpu"))
    assert_close(cache["blocks.0.attn.hook_z"], ref["blocks.0.attn.hook_z"])


def test_run_with_cache_remove_batch_dim(model: HookedViT, images: torch.Tensor) -> None:
    one = images[:1]
    _, ref = model.run_with_cache(one)
    out, cache = model.run_with_cache(one, remove_batch_dim=True)
    assert out.shape == (1, model.cfg.n_classes)
    assert not cache.has_batch_dim
    assert set(cache.keys()) == set(ref.keys())
    for n in ref.keys():
        assert cache[n].shape == ref[n].shape[1:]
        assert_close(cache[n], ref[n][0])
    assert cache.remove_batch_dim() is cache  # already removed: a no-op


# ---------------------------------------------------------------------------------------------- backward hooks
def independent_resid_grad(model: HookedViT, images: torch.Tensor) -> torch.Tensor:
    """d(sum of logits) / d(blocks.0.hook_resid_post), computed without any hooks."""
    resid = model(images, stop_at_layer=1).detach().requires_grad_(True)
    logits = model.forward_head(model.blocks[1](resid))
    (grad,) = torch.autograd.grad(logits.sum(), resid)
    return grad


def test_run_with_cache_incl_bwd_fills_grads_after_the_call(model: HookedViT, images: torch.Tensor) -> None:
    names = ["blocks.0.hook_resid_post", "ln_final.hook_normalized", "blocks.1.attn.hook_pattern"]
    out, cache = model.run_with_cache(images, names_filter=names, incl_bwd=True)
    assert set(cache.keys()) == set(names)  # no gradient yet: the output is not a scalar
    assert no_hooks_left(model)  # hooks are off the points, only the pending gradient hooks remain
    out.sum().backward()
    assert set(cache.keys()) == set(names) | {n + "_grad" for n in names}
    assert_close(cache["blocks.0.hook_resid_post_grad"], independent_resid_grad(model, images))
    # Logits = head(ln_final[:, 0]): the gradient is head.weight summed over classes, only on the class token.
    grad = cache["ln_final.hook_normalized_grad"]
    assert torch.count_nonzero(grad[:, 1:]) == 0
    assert_close(grad[:, 0], model.head.weight.sum(0).expand(2, -1).detach())
    assert cache["blocks.1.attn.hook_pattern_grad"].shape == cache["blocks.1.attn.hook_pattern"].shape

    # Gradient hooks fire once: a later forward/backward does not touch the cache.
    before = {k: v.clone() for k, v in cache.items()}
    model(make_images(seed=5)).sum().backward()
    assert set(cache.keys()) == set(before)
    for k, v in before.items():
        assert torch.equal(cache[k], v)


def test_run_with_cache_incl_bwd_on_scalar_output(images: torch.Tensor) -> None:
    class ScalarViT(HookedViT):
        def forward(self, images: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
            out = super().forward(images, stop_at_layer=stop_at_layer)
            return out if stop_at_layer is not None else out.sum()

    model = make_model()
    scalar = ScalarViT(model.cfg).eval()
    scalar.load_state_dict(model.state_dict())
    out, cache = scalar.run_with_cache(images, names_filter="blocks.0.hook_resid_post", incl_bwd=True)
    assert out.ndim == 0
    # The scalar's backward() ran inside run_with_cache.
    assert_close(cache["blocks.0.hook_resid_post_grad"], independent_resid_grad(model, images))


def test_bwd_hook_in_plain_context_does_not_fire_after_exit(model: HookedViT, images: torch.Tensor) -> None:
    calls: list[str] = []
    bwd = [("blocks.0.hook_resid_post", lambda g, hook: calls.append(hook.name))]
    with model.hooks(bwd_hooks=bwd):
        out = model(images)
    out.sum().backward()
    assert calls == []
    # Control: inside the context it fires, once.
    with model.hooks(bwd_hooks=bwd):
        model(images).sum().backward()
    assert calls == ["blocks.0.hook_resid_post"]


def test_bwd_hook_with_run_with_hooks_fires_once_on_later_backward(model: HookedViT, images: torch.Tensor) -> None:
    grads: list[torch.Tensor] = []
    out = model.run_with_hooks(
        images, bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: grads.append(g.detach().clone()))]
    )
    assert grads == []
    assert no_hooks_left(model)
    out.sum().backward()
    assert len(grads) == 1
    assert_close(grads[0], independent_resid_grad(model, images))
    model(images).sum().backward()  # a new graph: the hook is gone
    assert len(grads) == 1


def test_bwd_hook_returning_tensor_replaces_gradient(model: HookedViT, images: torch.Tensor) -> None:
    with model.hooks(bwd_hooks=[("hook_full_embed", lambda g, hook: torch.zeros_like(g))]):
        model(images).sum().backward()
    assert torch.count_nonzero(model.patch_embed.weight.grad) == 0
    assert torch.count_nonzero(model.cls_token.grad) == 0
    assert torch.count_nonzero(model.blocks[0].attn.qkv.weight.grad) > 0
    model.zero_grad()
    model(images).sum().backward()
    assert torch.count_nonzero(model.patch_embed.weight.grad) > 0


# ---------------------------------------------------------------------------------------------- attention paths
def is_pattern(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


def test_sdpa_and_explicit_paths_agree(model: HookedViT, images: torch.Tensor) -> None:
    z_names = lambda n: n.endswith("attn.hook_z")  # noqa: E731
    attn = model.blocks[0].attn
    assert not attn.explicit
    sdpa_out, sdpa_cache = model.run_with_cache(images, names_filter=z_names)
    calls: list[str] = []
    with model.hooks(fwd_hooks=[(is_pattern, lambda x, hook: calls.append(hook.name))]):
        assert all(block.attn.explicit for block in model.blocks)
        explicit_out, explicit_cache = model.run_with_cache(images, names_filter=z_names)
    assert calls == [f"blocks.{i}.attn.hook_pattern" for i in range(N_LAYERS)]  # the explicit path ran
    assert not attn.explicit
    assert_close(explicit_out, sdpa_out, atol=1e-5, rtol=1e-5)
    for n in sdpa_cache.keys():
        assert_close(explicit_cache[n], sdpa_cache[n], atol=1e-5, rtol=1e-5)


def test_cached_pattern_is_softmax_of_scores(model: HookedViT, images: torch.Tensor) -> None:
    _, cache = model.run_with_cache(images)
    B, h, T, dh = 2, model.cfg.n_heads, model.cfg.n_tokens, model.cfg.d_head
    for i in range(N_LAYERS):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (B, h, T, T)
        assert bool((pattern >= 0).all())
        assert_close(pattern.sum(-1), torch.ones(B, h, T))
        q, k, v = (cache[f"blocks.{i}.attn.hook_{s}"] for s in "qkv")
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * dh**-0.5
        assert_close(cache[f"blocks.{i}.attn.hook_attn_scores"], scores, atol=1e-5, rtol=1e-5)
        assert_close(pattern, scores.softmax(-1), atol=1e-6, rtol=1e-5)
        assert_close(cache[f"blocks.{i}.attn.hook_z"], torch.einsum("bhqk,bkhd->bqhd", pattern, v))


def test_patching_the_pattern_changes_the_output(model: HookedViT, images: torch.Tensor) -> None:
    clean = model(images)

    def uniform(pattern: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
        patched, cache = model.run_with_cache(images, names_filter=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"])
    assert not torch.allclose(patched, clean, atol=1e-4)
    # Uniform attention: every query position gets the mean value vector.
    z, v = cache["blocks.0.attn.hook_z"], cache["blocks.0.attn.hook_v"]
    assert_close(z, v.mean(dim=1, keepdim=True).expand_as(z))
    assert torch.equal(model(images), clean)


# ---------------------------------------------------------------------------------------------- HookPoint
def test_hook_point_layer(model: HookedViT) -> None:
    assert model.hook_dict["blocks.1.attn.hook_q"].layer() == 1
    assert model.hook_dict["blocks.0.ln2.hook_normalized"].layer() == 0
    for name, hp in model.hook_dict.items():
        if name.startswith("blocks."):
            assert hp.layer() == int(name.split(".")[1])
    with pytest.raises(ValueError, match="not inside a block"):
        model.hook_dict["hook_embed"].layer()
    with pytest.raises(ValueError, match="no name"):
        HookPoint().layer()


def test_hook_point_is_identity() -> None:
    x = torch.randn(3, 4)
    assert HookPoint()(x) is x


def test_hook_ctx_keeps_state_between_calls(model: HookedViT, images: torch.Tensor) -> None:
    name = "blocks.0.hook_resid_pre"
    hp = model.hook_dict[name]

    def count(x: torch.Tensor, hook: HookPoint) -> None:
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        hook.ctx["last_norm"] = x.norm().item()

    with model.hooks(fwd_hooks=[(name, count)]):
        model(images)
        model(images[:1])
    assert hp.ctx["calls"] == 2
    assert hp.ctx["last_norm"] == pytest.approx(model(images[:1], stop_at_layer=0).norm().item(), rel=1e-5)

    with model.hooks(fwd_hooks=[(name, count)], clear_contexts=True):
        model(images)
        assert hp.ctx["calls"] == 3
    assert hp.ctx == {}

    with model.hooks(fwd_hooks=[(name, count)]):
        model(images)
    assert hp.ctx["calls"] == 1
    model.reset_hooks()
    assert hp.ctx == {}
