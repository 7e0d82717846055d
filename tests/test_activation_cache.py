"""ActivationCache: indexing shorthands, residual-stream stacks and decompositions, LayerNorm on stacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from prisma_lightning.backbones.hooked_vit import HookedViT
from prisma_lightning.backbones.registry import TEST_CONFIGS
from prisma_lightning.hooks import ActivationCache, act_name

N_LAYERS = 2
N_HEADS = 4


def make_model(name: str = "test/vit-tiny", **overrides) -> HookedViT:
    """A tiny HookedViT with non-trivial weights: random biases, LayerNorm weights/biases and layer scales."""
    torch.manual_seed(0)
    model = HookedViT(dataclasses.replace(TEST_CONFIGS[name], **overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "ln" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif ("ln" in pname and pname.endswith("bias")) or pname.endswith("gamma"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run(model: HookedViT, batch: int = 2, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
    with torch.no_grad():
        return model.run_with_cache(make_images(batch), **kwargs)


@pytest.fixture
def model() -> HookedViT:
    return make_model()


@pytest.fixture
def cache(model: HookedViT) -> ActivationCache:
    return run(model)[1]


def without(cache: ActivationCache, suffix: str) -> ActivationCache:
    """The same cache minus the entries whose names end with ``suffix``."""
    kept = {k: v for k, v in cache.items() if not k.endswith(suffix)}
    assert len(kept) < len(cache)
    return ActivationCache(kept, cache.model, has_batch_dim=cache.has_batch_dim)


# ---------------------------------------------------------------------------------------------- indexing
def test_full_names_and_shorthands_agree(cache: ActivationCache) -> None:
    full = cache["blocks.1.hook_resid_post"]
    assert cache["resid_post", 1] is full
    assert cache["resid_post", -1] is full
    assert cache["resid_pre", -2] is cache["blocks.0.hook_resid_pre"]
    assert cache["q", 0] is cache["blocks.0.attn.hook_q"]
    assert cache["z", 1] is cache["blocks.1.attn.hook_z"]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["attn", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["scores", 0] is cache["blocks.0.attn.hook_attn_scores"]
    assert cache["pre", 0] is cache["blocks.0.mlp.hook_pre"]
    assert cache["mlp_post", 1] is cache["blocks.1.mlp.hook_post"]
    assert cache["normalized", 0] is cache["blocks.0.ln1.hook_normalized"]
    assert cache["normalized", 1, "ln2"] is cache["blocks.1.ln2.hook_normalized"]
    assert cache["normalized", -1, "ln2"] is cache["blocks.1.ln2.hook_normalized"]
    assert cache["scale", 0, "ln1"] is cache["blocks.0.ln1.hook_scale"]
    assert cache["normalized"] is cache["ln_final.hook_normalized"]
    assert cache["embed"] is cache["hook_embed"]
    assert cache["pooled"] is cache["hook_pooled"]
    # Different shorthands really point to different tensors.
    assert not torch.allclose(cache["resid_post", 0], cache["resid_post", 1])
    assert ("resid_post", 1) in cache
    assert "blocks.1.hook_resid_post" in cache
    assert ("resid_post", 7) not in cache
    assert "nonsense" not in cache


def test_act_name() -> None:
    assert act_name("resid_post", 3) == "blocks.3.hook_resid_post"
    assert act_name("k", 2) == "blocks.2.attn.hook_k"
    assert act_name("post", 0) == "blocks.0.mlp.hook_post"
    assert act_name("normalized", 4, "ln2") == "blocks.4.ln2.hook_normalized"
    assert act_name("normalized", None, "ln_pre") == "ln_pre.hook_normalized"
    assert act_name("scale") == "ln_final.hook_scale"
    assert act_name("blocks.0.hook_attn_out") == "blocks.0.hook_attn_out"
    with pytest.raises(KeyError):
        act_name("resid_post")
    with pytest.raises(KeyError):
        act_name("nonsense", 0)


def test_missing_entries_raise_key_error(model: HookedViT, cache: ActivationCache) -> None:
    with pytest.raises(KeyError):
        cache["blocks.7.hook_resid_post"]
    with pytest.raises(KeyError):
        cache["resid_post", 5]
    with pytest.raises(KeyError):
        cache["resid_post"]  # shorthand without a layer
    with pytest.raises(KeyError):
        cache["nonsense", 0]
    _, small = run(model, names_filter="blocks.0.hook_resid_post")
    with pytest.raises(KeyError) as err:
        small["resid_post", 1]
    assert "blocks.0.hook_resid_post" in str(err.value)  # the closest cached name
    assert_close(small["resid_post", 0], cache["resid_post", 0])


def test_mapping_interface(cache: ActivationCache) -> None:
    assert len(cache) == len(list(cache))
    assert set(cache) == set(cache.keys())
    for k, v in cache.items():
        assert cache[k] is v
    assert "ActivationCache" in repr(cache)


# ---------------------------------------------------------------------------------------------- accumulated_resid
def test_accumulated_resid(model: HookedViT, cache: ActivationCache) -> None:
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert stack.shape == (N_LAYERS + 1, 2, model.cfg.n_tokens, model.cfg.d_model)
    assert_close(stack[-1], cache["blocks.1.hook_resid_post"])
    for i in range(N_LAYERS):
        assert_close(stack[i], cache["resid_pre", i])
    assert_close(cache.accumulated_resid(layer=-1), stack)

    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    assert_close(stack[1], cache["resid_mid", 0])
    assert_close(stack[3], cache["resid_mid", 1])

    stack, labels = cache.accumulated_resid(layer=1, return_labels=True)
    assert labels == ["0_pre", "1_pre"]
    assert_close(stack[-1], cache["resid_pre", 1])

    stack, labels = cache.accumulated_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    assert_close(stack[-1], cache["resid_mid", 1])

    cls_only = cache.accumulated_resid(pos_slice=0)
    assert cls_only.shape == (N_LAYERS + 1, 2, model.cfg.d_model)
    assert_close(cls_only, cache.accumulated_resid()[:, :, 0])

    with pytest.raises(ValueError):
        cache.accumulated_resid(layer=N_LAYERS + 1)


def test_accumulated_resid_apply_ln(model: HookedViT, cache: ActivationCache) -> None:
    ln = model.ln_final
    assert not torch.allclose(ln.bias, torch.zeros_like(ln.bias))
    raw = cache.accumulated_resid()
    normed = cache.accumulated_resid(apply_ln=True)
    expected = F.layer_norm(raw, (raw.shape[-1],), ln.weight, ln.bias, ln.eps)
    assert_close(normed, expected)
    # The last entry is exactly what the model's final LayerNorm produced.
    assert_close(normed[-1], cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    # At a block, the block's ln1 is used (ln2 when mlp_input).
    ln1 = model.blocks[1].ln1
    normed = cache.accumulated_resid(layer=1, apply_ln=True)
    assert_close(normed[-1], cache["normalized", 1, "ln1"], atol=1e-5, rtol=1e-5)
    assert_close(normed[0], F.layer_norm(cache["resid_pre", 0], (32,), ln1.weight, ln1.bias, ln1.eps))
    normed = cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True)
    assert_close(normed[-1], cache["normalized", 1, "ln2"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- decompose_resid
def resid_at(cache: ActivationCache, layer: int, mlp_input: bool = False) -> torch.Tensor:
    if mlp_input:
        return cache["resid_mid", layer]
    return cache["resid_post", N_LAYERS - 1] if layer == N_LAYERS else cache["resid_pre", layer]


@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-reg"])
def test_decompose_resid_sums_to_residual(name: str) -> None:
    model = make_model(name)
    _, cache = run(model)
    for layer in range(N_LAYERS + 1):
        stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
        assert labels[0] == "embed"
        assert len(labels) == 1 + 2 * layer
        assert_close(stack.sum(0), resid_at(cache, layer))
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert_close(stack[2], cache["mlp_out", 0])
    for layer in range(N_LAYERS):
        stack, labels = cache.decompose_resid(layer=layer, mlp_input=True, return_labels=True)
        assert labels[-1] == f"{layer}_attn_out"
        assert_close(stack.sum(0), resid_at(cache, layer, mlp_input=True))


def test_decompose_resid_embed_is_after_ln_pre_with_layer_scale() -> None:
    model = make_model("test/vit-tiny-reg")
    assert model.ln_pre is not None and model.blocks[0].ls1 is not None
    _, cache = run(model)
    stack = cache.decompose_resid()
    assert_close(stack[0], cache["ln_pre.hook_normalized"])
    assert not torch.allclose(stack[0], cache["hook_full_embed"])
    # Components are what the blocks wrote, layer scale included.
    assert_close(stack[1], cache["attn_out", 0])
    assert not torch.allclose(cache["attn_out", 0], model.blocks[0].attn(cache["normalized", 0, "ln1"]))


def test_decompose_resid_modes() -> None:
    model = make_model()
    _, cache = run(model)
    attn, attn_labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    mlp, mlp_labels = cache.decompose_resid(mode="mlp", incl_embeds=False, return_labels=True)
    assert attn_labels == ["0_attn_out", "1_attn_out"]
    assert mlp_labels == ["0_mlp_out", "1_mlp_out"]
    assert_close(cache["resid_pre", 0] + attn.sum(0) + mlp.sum(0), cache["resid_post", 1])
    attn_e, labels = cache.decompose_resid(mode="attn", return_labels=True)
    assert labels == ["embed", "0_attn_out", "1_attn_out"]
    assert_close(attn_e[1:], attn)
    # The MLP part in front of block 1's MLP input is only block 0's MLP.
    mlp_in = cache.decompose_resid(layer=1, mlp_input=True, mode="mlp", incl_embeds=False)
    assert_close(mlp_in, mlp[:1])
    with pytest.raises(ValueError):
        cache.decompose_resid(mode="heads")


def test_decompose_resid_attn_only() -> None:
    model = make_model("test/vit-tiny-attn-only")
    _, cache = run(model)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_attn_out", "1_attn_out"]
    assert_close(stack.sum(0), cache["resid_post", 1])


def test_decompose_resid_pos_slice(cache: ActivationCache) -> None:
    stack = cache.decompose_resid(pos_slice=[0, 3])
    assert stack.shape[-2] == 2
    assert_close(stack.sum(0), cache["resid_post", 1][:, [0, 3]])


# ---------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("name", ["test/vit-tiny", "test/vit-tiny-attn-only"])
def test_stack_head_results_from_z_equals_cached_result(name: str) -> None:
    model = make_model(name, use_attn_result=True)
    _, cache = run(model)
    from_result, labels = cache.stack_head_results(return_labels=True)
    from_z = without(cache, "attn.hook_result").stack_head_results()
    assert labels == [f"L{i}H{h}" for i in range(N_LAYERS) for h in range(N_HEADS)]
    assert from_result.shape == (N_LAYERS * N_HEADS, 2, model.cfg.n_tokens, model.cfg.d_model)
    assert_close(from_z, from_result, atol=1e-5, rtol=1e-5)
    assert_close(from_result[N_HEADS + 2], cache["result", 1][:, :, 2])
    b_o = model.b_O.detach()
    assert not torch.allclose(b_o, torch.zeros_like(b_o))
    for i in range(N_LAYERS):
        heads = from_z[i * N_HEADS : (i + 1) * N_HEADS]
        assert_close(heads.sum(0) + b_o[i], cache["attn_out", i], atol=1e-5, rtol=1e-5)


def test_stack_head_results_with_layer_scale_from_z() -> None:
    model = make_model("test/vit-tiny-reg")
    _, cache = run(model)
    stack = cache.stack_head_results(layer=1)
    assert stack.shape[0] == N_HEADS
    assert_close(stack.sum(0) + model.b_O[0].detach(), cache["attn_out", 0], atol=1e-5, rtol=1e-5)


def test_cached_hook_result_includes_layer_scale() -> None:
    model = make_model("test/vit-tiny-reg", use_attn_result=True)
    _, cache = run(model)
    from_result = cache.stack_head_results(layer=1)
    from_z = without(cache, "attn.hook_result").stack_head_results(layer=1)
    assert_close(from_result, from_z, atol=1e-5, rtol=1e-5)
    assert_close(from_result.sum(0) + model.b_O[0].detach(), cache["attn_out", 0], atol=1e-5, rtol=1e-5)


def test_stack_head_results_remainder(cache: ActivationCache) -> None:
    stack, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder"
    assert len(labels) == N_LAYERS * N_HEADS + 1
    assert_close(stack.sum(0), cache["resid_post", 1])
    stack = cache.stack_head_results(layer=1, incl_remainder=True, pos_slice=0)
    assert_close(stack.sum(0), cache["resid_pre", 1][:, 0])
    with pytest.raises(ValueError):
        cache.stack_head_results(layer=0)


# ---------------------------------------------------------------------------------------------- apply_ln_to_stack
@pytest.mark.parametrize("drop_scale", [False, True])
def test_apply_ln_to_stack_sums_to_layer_norm_output(
    model: HookedViT, cache: ActivationCache, drop_scale: bool
) -> None:
    ln = model.ln_final
    assert not torch.allclose(ln.weight, torch.ones_like(ln.weight))
    assert not torch.allclose(ln.bias, torch.zeros_like(ln.bias))
    if drop_scale:  # without cached hook_scale entries the scale is recomputed from the residual
        cache = without(cache, "hook_scale")
    stack = cache.decompose_resid(layer=None)
    normed = cache.apply_ln_to_stack(stack, None)
    assert normed.shape == stack.shape
    assert_close(normed.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    assert_close(cache.decompose_resid(apply_ln=True), normed)
    no_bias = cache.apply_ln_to_stack(stack, None, include_bias=False)
    assert_close(no_bias.sum(0), cache["ln_final.hook_normalized"] - ln.bias, atol=1e-5, rtol=1e-5)

    stack = cache.decompose_resid(layer=1)
    normed = cache.apply_ln_to_stack(stack, 1)
    assert_close(normed.sum(0), cache["blocks.1.ln1.hook_normalized"], atol=1e-5, rtol=1e-5)

    stack = cache.decompose_resid(layer=1, mlp_input=True)
    normed = cache.apply_ln_to_stack(stack, 1, mlp_input=True)
    assert_close(normed.sum(0), cache["blocks.1.ln2.hook_normalized"], atol=1e-5, rtol=1e-5)

    heads = cache.stack_head_results(incl_remainder=True, apply_ln=True)
    assert_close(heads.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)

    cls = cache.decompose_resid(apply_ln=True, pos_slice=0)
    assert_close(cls.sum(0), cache["hook_pooled"], atol=1e-5, rtol=1e-5)


def test_apply_ln_to_stack_without_final_norm() -> None:
    model = make_model("test/vit-tiny-gap")
    _, cache = run(model)
    stack = cache.decompose_resid()
    with pytest.raises(ValueError, match="final LayerNorm"):
        cache.apply_ln_to_stack(stack, None)
    stack = cache.decompose_resid(layer=1)
    assert_close(cache.apply_ln_to_stack(stack, 1).sum(0), cache["normalized", 1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- batch and device
def test_remove_batch_dim(model: HookedViT, cache: ActivationCache) -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        cache.remove_batch_dim()
    assert cache.has_batch_dim
    _, one = run(model, batch=1)
    ref = {k: v.clone() for k, v in one.items()}
    assert one.remove_batch_dim() is one
    assert not one.has_batch_dim
    for k, v in ref.items():
        assert_close(one[k], v[0])
    # The decompositions work without a batch dimension too.
    stack = one.decompose_resid()
    assert stack.shape == (5, model.cfg.n_tokens, model.cfg.d_model)
    assert_close(stack.sum(0), one["resid_post", 1])
    assert_close(one.apply_ln_to_stack(stack).sum(0), one["normalized"], atol=1e-5, rtol=1e-5)


def test_to_cpu(cache: ActivationCache) -> None:
    before = {k: v.clone() for k, v in cache.items()}
    assert cache.to("cpu") is cache
    assert cache.to(torch.device("cpu"), move_model=True) is cache
    assert set(cache.keys()) == set(before)
    for k, v in cache.items():
        assert v.device.type == "cpu"
        assert torch.equal(v, before[k])
