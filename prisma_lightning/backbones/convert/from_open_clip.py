"""Convert open_clip image towers (``open_clip.transformer.VisionTransformer``, or the ``.visual`` of a
``CLIP`` / ``CustomTextCLIP`` / ``CoCa``) into a HookedViT whose output is open_clip's projected image embedding.

open_clip's layout maps onto ours as follows: ``conv1`` (no bias) -> ``patch_embed``, ``class_embedding`` ->
``cls_token``, ``positional_embedding`` -> ``pos_embed``, ``ln_pre``, resblocks (``nn.MultiheadAttention``'s fused
``in_proj`` is already ordered q, k, v with heads contiguous, like our ``qkv``), ``ln_post`` -> ``ln_final`` (norm
before pooling) or ``fc_norm`` (``final_ln_after_pool`` or after the attentional pooler) and ``proj [width, out]``
-> a bias-free projection head with weight ``proj.T``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.hooked_vit import HookedViT

# open_clip ``pool_type`` -> our ``pool`` (without an attentional pooler).
_POOLS = {"tok": "cls", "avg": "mean", "none": "none"}

# CustomResidualAttentionBlock options (CLIPVisionCfg field -> (module path in the block, what it is)).
_CUSTOM_OPTIONS = {
    "qk_norm": ("attn.ln_q", "LayerNorm on queries and keys"),
    "scale_attn_inner": ("attn.ln_inner", "LayerNorm on the attention context before out_proj"),
    "scale_attn": ("ln_attn", "LayerNorm after the attention branch"),
    "scale_fc": ("mlp.ln", "LayerNorm inside the MLP"),
}


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _activation_name(act: nn.Module) -> str:
    """Map open_clip's MLP activation (``nn.GELU`` or ``QuickGELU``) to our ``act_fn``."""
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    table = {"QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}
    if name not in table:
        raise TypeError(f"Unsupported open_clip MLP activation {name}; supported: GELU, QuickGELU, SiLU, ReLU.")
    return table[name]


def _check_block(block: nn.Module, index: int) -> None:
    """Raise TypeError for resblocks whose computation a HookedViT Block cannot reproduce exactly."""
    kind = type(block).__name__
    if kind not in ("ResidualAttentionBlock", "CustomResidualAttentionBlock"):
        raise TypeError(f"Unsupported open_clip resblock {kind} (resblocks[{index}]).")
    if hasattr(block, "ln_1_kv"):
        raise TypeError("open_clip cross-attention blocks (is_cross_attention=True) are not supported.")
    attn = block.attn
    if kind == "ResidualAttentionBlock":
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(f"Unsupported attention {type(attn).__name__} in resblocks[{index}].")
        if attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            raise TypeError("nn.MultiheadAttention with add_bias_kv, add_zero_attn or kdim/vdim is not supported.")
        return
    # CustomResidualAttentionBlock: open_clip's own Attention; plain when every extra option is off.
    if attn.logit_scale is not None:
        raise TypeError("open_clip scaled_cosine_attn=True (cosine attention logits) is not supported.")
    if attn.head_scale is not None:
        raise TypeError("open_clip scale_heads=True (per-head output scale) is not supported.")
    for option, (path, what) in _CUSTOM_OPTIONS.items():
        if not _is_identity(block.get_submodule(path)):
            raise TypeError(f"open_clip {option}=True ({what}) is not supported.")


def _layer_norm_eps(visual: nn.Module) -> float:
    eps = {m.eps for m in visual.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        raise TypeError(
            f"This open_clip tower mixes LayerNorm epsilons {sorted(eps)}; a HookedViT uses one layer_norm_eps."
        )
    return eps.pop() if eps else 1e-5


def _pooling(visual: Any) -> dict[str, Any]:
    """Our pooling/norm/head fields reproducing open_clip's ``_pool`` + ``proj``."""
    has_ln_post = not _is_identity(visual.ln_post)
    attn_pool = getattr(visual, "attn_pool", None)
    if attn_pool is not None:
        if getattr(visual, "attn_pool_contrastive", None) is not None:
            raise TypeError(
                f"open_clip attentional_pool={visual.attn_pool_type!r} (a second, contrastive pooler) is not "
                "supported; only attentional_pool=True (the original CoCa pooler) converts exactly."
            )
        if visual.pool_type != "tok":
            raise TypeError(
                f"open_clip attentional_pool=True with pool_type={visual.pool_type!r} pools several of the pooler's "
                "queries; only pool_type='tok' (the first query, as in CoCa) is supported."
            )
        mha = attn_pool.attn
        if mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError("An attentional pooler with add_bias_kv or add_zero_attn is not supported.")
        # ln_post runs per query on the pooler output, so on the first query it is our fc_norm.
        return dict(
            pool="attn",
            final_norm=False,
            fc_norm=has_ln_post,
            attn_pool_heads=mha.num_heads,
            attn_pool_queries=attn_pool.query.shape[0],
            attn_pool_norm_q=not _is_identity(attn_pool.ln_q),
            attn_pool_norm_kv=not _is_identity(attn_pool.ln_k),
            attn_pool_dim=mha.embed_dim,
        )
    if visual.pool_type not in _POOLS:
        raise TypeError(f"open_clip pool_type={visual.pool_type!r} is not supported; supported: {sorted(_POOLS)}.")
    pool = _POOLS[visual.pool_type]
    # final_ln_after_pool normalises the pooled vector; with pool_type='none' that is every token anyway.
    after_pool = bool(visual.final_ln_after_pool) and pool != "none"
    return dict(pool=pool, final_norm=has_ln_post and not after_pool, fc_norm=has_ln_post and after_pool)


def open_clip_config(visual: Any) -> HookedViTConfig:
    """The HookedViTConfig describing an open_clip ``VisionTransformer``."""
    if getattr(visual, "class_embedding", None) is None:
        raise TypeError("open_clip towers without a class embedding are not supported.")
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        _check_block(block, i)
    block = blocks[0]
    attn = block.attn
    width = visual.conv1.out_channels
    n_heads = attn.num_heads
    has_ls = not _is_identity(block.ls_1)
    proj = visual.proj
    pooling = _pooling(visual)
    return HookedViTConfig(
        d_model=width,
        n_layers=len(blocks),
        n_heads=n_heads,
        d_head=width // n_heads,
        d_mlp=block.mlp.c_fc.out_features,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        in_channels=visual.conv1.in_channels,
        patch_bias=visual.conv1.bias is not None,
        class_token=True,
        pos_embed="learned",  # a 'sin_cos_2d' table is stored as a (frozen) parameter: copied as is
        pos_interp_mode="bicubic",
        pos_interp_antialias=True,  # open_clip's resize_pos_embed
        dynamic_img_size=False,
        ln_pre=not _is_identity(visual.ln_pre),
        layer_norm_eps=_layer_norm_eps(visual),
        qkv_bias=attn.in_proj_bias is not None,
        attn_out_bias=attn.out_proj.bias is not None,
        mlp_bias=block.mlp.c_fc.bias is not None,
        layer_scale_init=float(block.ls_1.gamma.detach().flatten()[0]) if has_ls else None,
        act_fn=_activation_name(block.mlp.gelu),
        head="projection" if proj is not None else "none",
        projection_dim=proj.shape[1] if proj is not None else 512,
        head_bias=False,
        model_name=f"open_clip.{type(visual).__name__}",
        preprocess=_preprocess(visual),
        **pooling,
    )


def _preprocess(visual: Any) -> dict[str, Any] | None:
    """open_clip's eval preprocessing: ``visual.preprocess_cfg`` (set by ``create_model``), else its defaults."""
    from prisma_lightning.backbones.transforms import PreprocessConfig

    preprocess_cfg = getattr(visual, "preprocess_cfg", None) or {"size": tuple(visual.image_size)}
    try:
        return PreprocessConfig.from_open_clip(preprocess_cfg).to_dict()
    except (KeyError, ValueError):
        return None


def _norm(sd: dict[str, torch.Tensor], prefix: str, norm: nn.LayerNorm) -> None:
    # LayerNorms built without affine parameters act as weight 1, bias 0.
    sd[prefix + "weight"] = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape)
    sd[prefix + "bias"] = norm.bias if norm.bias is not None else torch.zeros(norm.normalized_shape)


def _attn_pool_state(sd: dict[str, torch.Tensor], pooler: nn.Module, cfg: HookedViTConfig) -> None:
    mha: nn.MultiheadAttention = pooler.attn
    e = mha.embed_dim
    sd["attn_pool.probe"] = pooler.query[None]  # [1, n_queries, d_pool]
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.split(e)
    else:  # kdim/vdim = width != output_dim
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bias = mha.in_proj_bias if mha.in_proj_bias is not None else w_q.new_zeros(3 * e)
    sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = w_q, bias[:e]
    sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"] = torch.cat([w_k, w_v]), bias[e:]
    sd["attn_pool.out.weight"] = mha.out_proj.weight
    sd["attn_pool.out.bias"] = mha.out_proj.bias if mha.out_proj.bias is not None else w_q.new_zeros(e)
    if cfg.attn_pool_norm_q:
        _norm(sd, "attn_pool.ln_q.", pooler.ln_q)
    if cfg.attn_pool_norm_kv:
        _norm(sd, "attn_pool.ln_kv.", pooler.ln_k)


def open_clip_state_dict(visual: Any, cfg: HookedViTConfig) -> dict[str, torch.Tensor]:
    """Our state dict from an open_clip ``VisionTransformer``'s weights."""
    d = cfg.d_model
    sd: dict[str, torch.Tensor] = {"patch_embed.weight": visual.conv1.weight}
    if cfg.patch_bias:
        sd["patch_embed.bias"] = visual.conv1.bias
    sd["cls_token"] = visual.class_embedding.reshape(1, 1, d)
    sd["pos_embed"] = visual.positional_embedding.reshape(1, -1, d)
    if cfg.ln_pre:
        _norm(sd, "ln_pre.", visual.ln_pre)
    for i, blk in enumerate(visual.transformer.resblocks):
        p = f"blocks.{i}."
        _norm(sd, p + "ln1.", blk.ln_1)
        sd[p + "attn.qkv.weight"] = blk.attn.in_proj_weight
        if cfg.qkv_bias == "qkv":
            sd[p + "attn.qkv.bias"] = blk.attn.in_proj_bias
        sd[p + "attn.out.weight"] = blk.attn.out_proj.weight
        if cfg.attn_out_bias:
            sd[p + "attn.out.bias"] = blk.attn.out_proj.bias
        _norm(sd, p + "ln2.", blk.ln_2)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc2.weight"] = blk.mlp.c_fc.weight, blk.mlp.c_proj.weight
        if cfg.mlp_bias:
            sd[p + "mlp.fc1.bias"], sd[p + "mlp.fc2.bias"] = blk.mlp.c_fc.bias, blk.mlp.c_proj.bias
        if cfg.layer_scale_init is not None:
            sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = blk.ls_1.gamma, blk.ls_2.gamma
    if cfg.pool == "attn":
        _attn_pool_state(sd, visual.attn_pool, cfg)
    if cfg.final_norm:
        _norm(sd, "ln_final.", visual.ln_post)
    if cfg.fc_norm:
        _norm(sd, "fc_norm.", visual.ln_post)
    if cfg.head == "projection":
        sd["head.weight"] = visual.proj.T  # proj is [pooled_dim, output_dim]
    return sd


def convert_open_clip_vit(visual: Any) -> HookedViT:
    """open_clip ``VisionTransformer`` -> HookedViT whose output equals ``visual(images)`` (the pooled embedding)."""
    cfg = open_clip_config(visual)
    return HookedViT.from_state_dict(
        cfg, {k: v.detach().clone().float() for k, v in open_clip_state_dict(visual, cfg).items()}
    )


def convert_open_clip_model(model: Any) -> HookedViT:
    """open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` -> HookedViT of its image tower (``model.visual``).

    The output equals ``model.encode_image(images, normalize=False)``.
    """
    visual = model.visual
    kind = type(visual).__name__
    if kind != "VisionTransformer" or not type(visual).__module__.startswith("open_clip"):
        hint = (
            " A timm-backed tower's trunk (model.visual.trunk) converts with the timm converter, without "
            "open_clip's projection head."
            if kind == "TimmModel"
            else ""
        )
        raise TypeError(
            f"Only open_clip VisionTransformer image towers convert; this {type(model).__name__} has a {kind}.{hint}"
        )
    return convert_open_clip_vit(visual)
