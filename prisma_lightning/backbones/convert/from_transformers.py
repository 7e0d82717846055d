"""Convert Hugging Face ``transformers`` ViT models (``ViTModel``, ``ViTForImageClassification``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.hooked_vit import HookedViT

HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def hf_activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise TypeError(f"Unsupported Hugging Face hidden_act {name!r}; supported: {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _layers(vit: nn.Module) -> list[nn.Module]:
    """Encoder layers in either transformers layout (5.x ``layers`` or 4.x ``encoder.layer``)."""
    if hasattr(vit, "layers"):
        return list(vit.layers)
    return list(vit.encoder.layer)


def _layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """q, k, v, o, fc1, fc2 of one HF ViT layer, whichever transformers version built it."""
    attn = layer.attention
    if hasattr(attn, "q_proj"):
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2}  # fmt: skip
    return {"q": attn.attention.query, "k": attn.attention.key, "v": attn.attention.value,
            "o": attn.output.dense, "fc1": layer.intermediate.dense, "fc2": layer.output.dense}  # fmt: skip


def _cat_bias(linears: list[nn.Linear]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears])


def convert_hf_vit(model: Any) -> HookedViT:
    """``ViTModel`` (output: pooler output, or the final class token without a pooler) or
    ``ViTForImageClassification`` (output: logits) -> HookedViT."""
    is_classifier = hasattr(model, "classifier")
    vit = model.vit if is_classifier else model
    hf = model.config
    patch = hf.patch_size
    pooler = getattr(vit, "pooler", None)
    head: dict[str, Any] = {"head": "none"}
    if is_classifier and isinstance(model.classifier, nn.Linear):
        head = {"head": "classifier", "n_classes": model.classifier.out_features}
    elif pooler is not None:
        pooler_act = getattr(hf, "pooler_act", "tanh")
        if pooler_act not in ("tanh",):
            raise TypeError(f"Only a tanh pooler is supported, got pooler_act={pooler_act!r}.")
        head = {"head": "classifier", "n_classes": pooler.dense.out_features, "head_act": "tanh"}
    layers = _layers(vit)
    first = _layer_linears(layers[0])
    cfg = HookedViTConfig(
        d_model=hf.hidden_size,
        n_layers=len(layers),
        n_heads=hf.num_attention_heads,
        d_head=first["q"].out_features // hf.num_attention_heads,
        d_mlp=first["fc1"].out_features,
        image_size=hf.image_size,
        patch_size=patch,
        in_channels=hf.num_channels,
        class_token=True,
        pos_embed_prefix_tokens=1,
        pos_interp_antialias=False,
        layer_norm_eps=hf.layer_norm_eps,
        qkv_bias=first["q"].bias is not None,
        act_fn=hf_activation(hf.hidden_act),
        final_norm=True,
        pool="cls",
        model_name=getattr(hf, "_name_or_path", "") or type(model).__name__,
        **head,
    )
    emb = vit.embeddings
    sd: dict[str, torch.Tensor] = {
        "patch_embed.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.bias": emb.patch_embeddings.projection.bias,
        "cls_token": emb.cls_token,
        "pos_embed": emb.position_embeddings,
        "ln_final.weight": vit.layernorm.weight,
        "ln_final.bias": vit.layernorm.bias,
    }
    for i, layer in enumerate(layers):
        lin = _layer_linears(layer)
        p = f"blocks.{i}."
        sd[p + "ln1.weight"], sd[p + "ln1.bias"] = layer.layernorm_before.weight, layer.layernorm_before.bias
        sd[p + "ln2.weight"], sd[p + "ln2.bias"] = layer.layernorm_after.weight, layer.layernorm_after.bias
        sd[p + "attn.qkv.weight"] = torch.cat([lin["q"].weight, lin["k"].weight, lin["v"].weight])
        qkv_bias = _cat_bias([lin["q"], lin["k"], lin["v"]])
        if qkv_bias is not None:
            sd[p + "attn.qkv.bias"] = qkv_bias
        sd[p + "attn.out.weight"], sd[p + "attn.out.bias"] = lin["o"].weight, lin["o"].bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = lin["fc1"].weight, lin["fc1"].bias
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = lin["fc2"].weight, lin["fc2"].bias
    if cfg.head != "none":
        src = model.classifier if is_classifier else pooler.dense
        sd["head.weight"], sd["head.bias"] = src.weight, src.bias
    hooked = HookedViT(cfg)
    hooked.load_state_dict({k: v.detach().clone().float() for k, v in sd.items()}, strict=True)
    return hooked
