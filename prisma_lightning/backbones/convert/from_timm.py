"""Convert timm ``VisionTransformer`` models (class token or not, registers, layer scale, pre-norm, fc_norm)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.hooked_vit import HookedViT
from prisma_lightning.backbones.transforms import PreprocessConfig

_POOLS = {"token": "cls", "avg": "mean", "": "none"}


def _activation_name(mlp: nn.Module) -> str:
    """Map a timm MLP to our ``act_fn``."""
    kind = type(mlp).__name__
    if kind in ("GluMlp", "SwiGLU"):
        if kind == "GluMlp" and (mlp.gate_last or type(mlp.act).__name__ != "SiLU"):
            raise TypeError("Only SiLU-gated GLU MLPs with the gate first (timm SwiGLUPacked) are supported.")
        return "swiglu"
    if kind != "Mlp":
        raise TypeError(f"Unsupported timm MLP {kind}; supported: Mlp, GluMlp (SwiGLUPacked), SwiGLU.")
    act = mlp.act
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    table = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}
    if name not in table:
        raise TypeError(f"Unsupported timm activation {name}; supported: GELU, GELUTanh, QuickGELU, SiLU, ReLU.")
    return table[name]


def _check_identity(module: nn.Module | None, what: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise TypeError(f"timm models with {what} ({type(module).__name__}) are not supported by convert_model.")


def timm_config(model: Any) -> HookedViTConfig:
    """The HookedViTConfig describing a timm ``VisionTransformer``."""
    if model.global_pool not in _POOLS:
        raise TypeError(
            f"timm global_pool={model.global_pool!r} is not supported; supported: {sorted(_POOLS)} "
            "(attention pooling 'map' arrives with the SigLIP conversion)."
        )
    if getattr(model, "pool_include_prefix", False) and model.global_pool == "avg":
        raise TypeError("timm avg pooling that includes prefix tokens (pool_include_prefix=True) is not supported.")
    block = model.blocks[0]
    if type(block).__name__ != "Block":
        raise TypeError(f"Only timm's standard pre-norm Block is supported, got {type(block).__name__}.")
    attn = block.attn
    if type(attn).__name__ != "Attention":
        raise TypeError(f"Only timm's standard Attention is supported, got {type(attn).__name__}.")
    _check_identity(attn.q_norm, "qk_norm")
    _check_identity(attn.norm, "scale_attn_norm")
    if getattr(attn, "gate", None) is not None:
        raise TypeError("timm gated attention is not supported.")
    _check_identity(getattr(block.mlp, "norm", None), "scale_mlp_norm")
    _check_identity(getattr(model.patch_embed, "norm", None), "a patch-embedding norm")
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        raise TypeError("timm dynamic_img_pad is not supported; resize images to a multiple of the patch size.")

    act = _activation_name(block.mlp)
    d_mlp = block.mlp.fc2.in_features
    has_norm = not isinstance(model.norm, nn.Identity)
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    eps = next(m.eps for m in model.modules() if isinstance(m, nn.LayerNorm))
    ls = block.ls1
    head = model.head
    conv = model.patch_embed.proj
    return HookedViTConfig(
        d_model=model.embed_dim,
        n_layers=len(model.blocks),
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=d_mlp,
        image_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        in_channels=conv.in_channels,
        patch_bias=conv.bias is not None,
        class_token=model.cls_token is not None,
        n_registers=model.num_reg_tokens,
        pos_embed="learned" if model.pos_embed is not None else "none",
        pos_embed_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
        pos_interp_mode="bicubic",
        pos_interp_antialias=True,
        dynamic_img_size=bool(model.dynamic_img_size),
        ln_pre=not isinstance(model.norm_pre, nn.Identity),
        layer_norm_eps=eps,
        qkv_bias=attn.qkv.bias is not None,
        attn_out_bias=attn.proj.bias is not None,
        mlp_bias=block.mlp.fc2.bias is not None,
        attn_scale=attn.scale,
        layer_scale_init=float(getattr(ls, "init_values", 1.0)) if hasattr(ls, "gamma") else None,
        act_fn=act,
        final_norm=has_norm,
        fc_norm=has_fc_norm,
        pool=_POOLS[model.global_pool],
        head="classifier" if isinstance(head, nn.Linear) else "none",
        n_classes=head.out_features if isinstance(head, nn.Linear) else 1000,
        head_bias=head.bias is not None if isinstance(head, nn.Linear) else None,
        model_name=getattr(model, "default_cfg", {}).get("hf_hub_id", "") or type(model).__name__,
        preprocess=_preprocess(model),
    )


def _preprocess(model: Any) -> dict[str, Any] | None:
    """timm's own eval data config for this model (resize, crop_pct, interpolation, mean/std)."""
    from timm.data import resolve_data_config

    try:
        return PreprocessConfig.from_timm_data_config(resolve_data_config({}, model=model)).to_dict()
    except (KeyError, ValueError):
        return None


def _fc1_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(mlp).__name__ == "SwiGLU":  # separate gate and value layers: pack gate first
        bias = None if mlp.fc1_g.bias is None else torch.cat([mlp.fc1_g.bias, mlp.fc1_x.bias])
        return torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]), bias
    return mlp.fc1.weight, mlp.fc1.bias


def timm_state_dict(model: Any, cfg: HookedViTConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a timm ``VisionTransformer``'s weights."""
    sd: dict[str, torch.Tensor] = {"patch_embed.weight": model.patch_embed.proj.weight}
    if cfg.patch_bias:
        sd["patch_embed.bias"] = model.patch_embed.proj.bias
    if cfg.class_token:
        sd["cls_token"] = model.cls_token
    if cfg.n_registers:
        sd["register_tokens"] = model.reg_token
    if model.pos_embed is not None:
        sd["pos_embed"] = model.pos_embed
    if cfg.ln_pre:
        sd["ln_pre.weight"], sd["ln_pre.bias"] = model.norm_pre.weight, model.norm_pre.bias
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = blk.norm1.weight, blk.norm1.bias
        sd[p + "attn.qkv.weight"] = blk.attn.qkv.weight
        if blk.attn.qkv.bias is not None:
            sd[p + "attn.qkv.bias"] = blk.attn.qkv.bias
        sd[p + "attn.out.weight"] = blk.attn.proj.weight
        if blk.attn.proj.bias is not None:
            sd[p + "attn.out.bias"] = blk.attn.proj.bias
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = blk.norm2.weight, blk.norm2.bias
        sd[p + "mlp.fc1.weight"], fc1_bias = _fc1_weights(blk.mlp)
        if fc1_bias is not None:
            sd[p + "mlp.fc1.bias"] = fc1_bias
        sd[p + "mlp.fc2.weight"] = blk.mlp.fc2.weight
        if blk.mlp.fc2.bias is not None:
            sd[p + "mlp.fc2.bias"] = blk.mlp.fc2.bias
        if cfg.layer_scale_init is not None:
            sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = blk.ls1.gamma, blk.ls2.gamma
    if cfg.final_norm:
        sd["ln_final.weight"], sd["ln_final.bias"] = model.norm.weight, model.norm.bias
    if cfg.fc_norm:
        sd["fc_norm.weight"], sd["fc_norm.bias"] = model.fc_norm.weight, model.fc_norm.bias
    if cfg.head != "none":
        sd["head.weight"] = model.head.weight
        if model.head.bias is not None:
            sd["head.bias"] = model.head.bias
    return sd


def convert_timm_vit(model: Any) -> HookedViT:
    """timm ``VisionTransformer`` -> HookedViT with identical outputs."""
    cfg = timm_config(model)
    return HookedViT.from_state_dict(
        cfg, {k: v.detach().clone().float() for k, v in timm_state_dict(model, cfg).items()}
    )
