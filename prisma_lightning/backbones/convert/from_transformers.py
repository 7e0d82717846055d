"""Convert Hugging Face ``transformers`` vision models into HookedViTs.

Families: ViT (and DINO v1 checkpoints, which are ``ViTModel``s), CLIP vision towers, DINOv2 (+ registers),
SigLIP vision towers, ViViT and VideoMAE. Every family is a pre-LN transformer; they differ in attribute names,
embeddings and heads, which :func:`hf_layer_parts` and the per-family functions below map onto HookedViT.

``hf_hooked_config(model)`` works on models built on the ``meta`` device, so the registry can derive exact
architectures without allocating weights.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.hooked_vit import HookedViT
from prisma_lightning.backbones.transforms import PreprocessConfig

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

State = dict[str, torch.Tensor]

_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
_CLIP = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
# The image-processor settings the published checkpoints of each family ship (preprocessor_config.json); used
# when no processor is passed to the conversion. Resample codes are PIL's (2 bilinear, 3 bicubic).
DEFAULT_PROCESSORS: dict[str, dict[str, Any]] = {
    "vit": {"size": {"height": 224, "width": 224}, "resample": 2, **_HALF},
    "dino": {"size": {"height": 224, "width": 224}, "resample": 3, **_IMAGENET},
    "dinov2": {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
               "resample": 3, **_IMAGENET},
    "clip": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
             "resample": 3, **_CLIP},
    "siglip": {"size": {"height": 224, "width": 224}, "resample": 3, **_HALF},
    "vivit": {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
              "resample": 2, "offset": True, **_HALF},
    "videomae": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                 "resample": 2, **_IMAGENET},
}  # fmt: skip


def _default_preprocess(family: str, image_size: Any) -> dict[str, Any]:
    """The family's default processor, scaled to the model's own input size."""
    proc = dict(DEFAULT_PROCESSORS[family])
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if family == "dinov2":
        h = w = 224  # DINOv2 checkpoints declare 518 px positions but are run at 224 px
    scale = h / 224
    if "height" in proc["size"]:
        proc["size"] = {"height": h, "width": w}
    else:
        proc["size"] = {"shortest_edge": round(proc["size"]["shortest_edge"] * scale)}
    if "crop_size" in proc:
        proc["crop_size"] = {"height": h, "width": w}
    return PreprocessConfig.from_hf_processor(proc).to_dict()


def hf_activation(name: Any) -> str:
    if not isinstance(name, str) or name not in HF_ACTIVATIONS:
        raise TypeError(f"Unsupported Hugging Face hidden_act {name!r}; supported: {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _find(obj: Any, *paths: str) -> Any:
    """The first attribute path that exists on ``obj`` (layouts differ across models and transformers versions)."""
    for path in paths:
        try:
            return operator.attrgetter(path)(obj)
        except AttributeError:
            continue
    return None


def hf_layer_parts(layer: nn.Module) -> dict[str, Any]:
    """The pieces of one encoder layer, whichever family and transformers version built it."""
    parts = {
        "ln1": _find(layer, "layernorm_before", "layer_norm1", "norm1"),
        "ln2": _find(layer, "layernorm_after", "layer_norm2", "norm2"),
        "q": _find(layer, "attention.q_proj", "self_attn.q_proj", "attention.attention.query"),
        "k": _find(layer, "attention.k_proj", "self_attn.k_proj", "attention.attention.key"),
        "v": _find(layer, "attention.v_proj", "self_attn.v_proj", "attention.attention.value"),
        "o": _find(layer, "attention.o_proj", "self_attn.out_proj", "attention.output.dense"),
        "fc1": _find(layer, "mlp.fc1", "intermediate.dense", "mlp.weights_in"),
        "gate": _find(layer, "mlp.gate_proj"),
        "up": _find(layer, "mlp.up_proj"),
        "fc2": _find(layer, "mlp.fc2", "mlp.down_proj", "mlp.weights_out", "output.dense"),
        "ls1": _find(layer, "layer_scale1.lambda1"),
        "ls2": _find(layer, "layer_scale2.lambda1"),
        # VideoMAE before transformers 5 kept separate q/v biases on the attention module.
        "q_bias": _find(layer, "attention.attention.q_bias"),
        "v_bias": _find(layer, "attention.attention.v_bias"),
    }
    missing = [k for k in ("ln1", "ln2", "q", "k", "v", "o", "fc2") if parts[k] is None]
    if missing or (parts["fc1"] is None and parts["gate"] is None):
        raise TypeError(f"Unrecognised encoder layer {type(layer).__name__}: could not find {missing or ['fc1']}.")
    return parts


def _is_swiglu(parts: dict[str, Any], layer: nn.Module) -> bool:
    return parts["gate"] is not None or _find(layer, "mlp.weights_in") is not None


def _bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _block_config(layer: nn.Module, hidden_act: str | None) -> dict[str, Any]:
    """Config fields read off the first encoder layer."""
    parts = hf_layer_parts(layer)
    swiglu = _is_swiglu(parts, layer)
    q, k = parts["q"], parts["k"]
    if parts["q_bias"] is not None or (q.bias is not None and k.bias is None):
        qkv_bias = "qv"
    else:
        qkv_bias = "qkv" if q.bias is not None else "none"
    d_mlp = parts["fc2"].in_features
    return {
        "d_mlp": d_mlp,
        "qkv_bias": qkv_bias,
        "act_fn": "swiglu" if swiglu else hf_activation(hidden_act),
        "layer_scale_init": 1.0 if parts["ls1"] is not None else None,
        "mlp_bias": parts["fc2"].bias is not None,
        "attn_out_bias": parts["o"].bias is not None,
        "layer_norm_eps": parts["ln1"].eps,
    }


def _block_state(i: int, layer: nn.Module, cfg: HookedViTConfig) -> State:
    parts = hf_layer_parts(layer)
    p = f"blocks.{i}."
    sd: State = {
        p + "ln1.weight": parts["ln1"].weight,
        p + "ln1.bias": parts["ln1"].bias,
        p + "ln2.weight": parts["ln2"].weight,
        p + "ln2.bias": parts["ln2"].bias,
        p + "attn.qkv.weight": torch.cat([parts["q"].weight, parts["k"].weight, parts["v"].weight]),
        p + "attn.out.weight": parts["o"].weight,
        p + "mlp.fc2.weight": parts["fc2"].weight,
    }
    if cfg.qkv_bias == "qkv":
        sd[p + "attn.qkv.bias"] = torch.cat([_bias_or_zeros(parts[n]) for n in ("q", "k", "v")])
    elif cfg.qkv_bias == "qv":
        sd[p + "attn.q_bias"] = parts["q_bias"] if parts["q_bias"] is not None else parts["q"].bias
        sd[p + "attn.v_bias"] = parts["v_bias"] if parts["v_bias"] is not None else parts["v"].bias
    if parts["o"].bias is not None:
        sd[p + "attn.out.bias"] = parts["o"].bias
    if parts["gate"] is not None:  # SwiGLU with separate gate/up layers: pack gate first
        sd[p + "mlp.fc1.weight"] = torch.cat([parts["gate"].weight, parts["up"].weight])
        if parts["gate"].bias is not None:
            sd[p + "mlp.fc1.bias"] = torch.cat([parts["gate"].bias, parts["up"].bias])
    else:
        sd[p + "mlp.fc1.weight"] = parts["fc1"].weight
        if parts["fc1"].bias is not None:
            sd[p + "mlp.fc1.bias"] = parts["fc1"].bias
    if parts["fc2"].bias is not None:
        sd[p + "mlp.fc2.bias"] = parts["fc2"].bias
    if parts["ls1"] is not None:
        sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = parts["ls1"], parts["ls2"]
    return sd


def _layers(encoder_owner: nn.Module) -> list[nn.Module]:
    layers = _find(encoder_owner, "layers", "encoder.layers", "encoder.layer")
    if layers is None:
        raise TypeError(f"Could not find the encoder layers of {type(encoder_owner).__name__}.")
    return list(layers)


def _name(model: nn.Module) -> str:
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def _ln(sd: State, prefix: str, ln: nn.LayerNorm) -> None:
    sd[prefix + ".weight"], sd[prefix + ".bias"] = ln.weight, ln.bias


# ---------------------------------------------------------------------------------------------- families
def _vit_family(model: nn.Module) -> tuple[dict[str, Any], State, nn.Module]:
    """ViTModel / ViTForImageClassification / Dinov2Model / Dinov2WithRegistersModel."""
    kind = type(model).__name__
    is_classifier = kind == "ViTForImageClassification"
    vit = model.vit if is_classifier else model
    hf = vit.config
    emb = vit.embeddings
    n_reg = emb.register_tokens.shape[1] if getattr(emb, "register_tokens", None) is not None else 0
    fields: dict[str, Any] = {
        "image_size": hf.image_size,
        "patch_size": hf.patch_size,
        "in_channels": hf.num_channels,
        "class_token": True,
        "n_registers": n_reg,
        "pos_embed_prefix_tokens": 1,
        "pos_interp_antialias": kind.startswith("Dinov2WithRegisters"),
        "dynamic_img_size": kind.startswith("Dinov2"),  # DINOv2 always interpolates (trained at 518 px)
        "final_norm": True,
        "pool": "cls",
        "head": "none",
        "preprocess": _default_preprocess("dinov2" if kind.startswith("Dinov2") else "vit", hf.image_size),
    }
    sd: State = {
        "patch_embed.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.bias": emb.patch_embeddings.projection.bias,
        "cls_token": emb.cls_token,
        "pos_embed": emb.position_embeddings,
    }
    if n_reg:
        sd["register_tokens"] = emb.register_tokens
    _ln(sd, "ln_final", vit.layernorm)
    pooler = getattr(vit, "pooler", None)
    if is_classifier and isinstance(model.classifier, nn.Linear):
        fields.update(head="classifier", n_classes=model.classifier.out_features)
        sd["head.weight"], sd["head.bias"] = model.classifier.weight, model.classifier.bias
    elif pooler is not None:
        if getattr(hf, "pooler_act", "tanh") != "tanh":
            raise TypeError(f"Only a tanh pooler is supported, got pooler_act={hf.pooler_act!r}.")
        fields.update(head="classifier", n_classes=pooler.dense.out_features, head_act="tanh")
        sd["head.weight"], sd["head.bias"] = pooler.dense.weight, pooler.dense.bias
    return fields, sd, vit


def _clip_family(model: nn.Module) -> tuple[dict[str, Any], State, nn.Module]:
    """CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel (vision tower + visual_projection)."""
    tower = _find(model, "vision_model.vision_model", "vision_model") or model  # layouts differ across versions
    hf = tower.config
    emb = tower.embeddings
    projection = getattr(model, "visual_projection", None)
    fields: dict[str, Any] = {
        "image_size": hf.image_size,
        "patch_size": hf.patch_size,
        "in_channels": hf.num_channels,
        "patch_bias": emb.patch_embedding.bias is not None,
        "class_token": True,
        "pos_embed_prefix_tokens": 1,
        "pos_interp_antialias": False,
        "ln_pre": True,
        "final_norm": False,
        "fc_norm": True,  # post_layernorm normalises the pooled class token only
        "pool": "cls",
        "head": "projection" if projection is not None else "none",
        "preprocess": _default_preprocess("clip", hf.image_size),
    }
    sd: State = {
        "patch_embed.weight": emb.patch_embedding.weight,
        "cls_token": emb.class_embedding.reshape(1, 1, -1),
        "pos_embed": emb.position_embedding.weight[None],
    }
    if emb.patch_embedding.bias is not None:
        sd["patch_embed.bias"] = emb.patch_embedding.bias
    _ln(sd, "ln_pre", tower.pre_layrnorm)
    _ln(sd, "fc_norm", tower.post_layernorm)
    if projection is not None:
        fields["projection_dim"] = projection.out_features
        sd["head.weight"] = projection.weight
    return fields, sd, tower


def _siglip_family(model: nn.Module) -> tuple[dict[str, Any], State, nn.Module]:
    """SiglipVisionModel (or SiglipModel's vision tower): no class token, attention-pooling head."""
    tower = _find(model, "vision_model.vision_model", "vision_model") or model
    hf = tower.config
    emb = tower.embeddings
    head = getattr(tower, "head", None) if getattr(tower, "use_head", True) else None
    fields: dict[str, Any] = {
        "image_size": hf.image_size,
        "patch_size": hf.patch_size,
        "in_channels": hf.num_channels,
        "class_token": False,
        "pos_embed_prefix_tokens": 0,
        "pos_interp_antialias": False,
        "final_norm": True,
        "pool": "attn" if head is not None else "none",
        "head": "none",
        "preprocess": _default_preprocess("siglip", hf.image_size),
    }
    sd: State = {
        "patch_embed.weight": emb.patch_embedding.weight,
        "patch_embed.bias": emb.patch_embedding.bias,
        "pos_embed": emb.position_embedding.weight[None],
    }
    _ln(sd, "ln_final", tower.post_layernorm)
    if head is not None:
        mha = head.attention
        d = mha.embed_dim
        fields.update(attn_pool_heads=mha.num_heads, attn_pool_mlp=True)
        sd["attn_pool.probe"] = head.probe
        sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = mha.in_proj_weight[:d], mha.in_proj_bias[:d]
        sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"] = mha.in_proj_weight[d:], mha.in_proj_bias[d:]
        sd["attn_pool.out.weight"], sd["attn_pool.out.bias"] = mha.out_proj.weight, mha.out_proj.bias
        _ln(sd, "attn_pool.ln", head.layernorm)
        sd["attn_pool.mlp.fc1.weight"], sd["attn_pool.mlp.fc1.bias"] = head.mlp.fc1.weight, head.mlp.fc1.bias
        sd["attn_pool.mlp.fc2.weight"], sd["attn_pool.mlp.fc2.bias"] = head.mlp.fc2.weight, head.mlp.fc2.bias
    return fields, sd, tower


def _video_family(model: nn.Module) -> tuple[dict[str, Any], State, nn.Module]:
    """VivitModel / VivitForVideoClassification / VideoMAEModel / VideoMAEForVideoClassification."""
    kind = type(model).__name__
    is_videomae = kind.startswith("VideoMAE")
    backbone = _find(model, "vivit", "videomae") or model
    hf = backbone.config
    emb = backbone.embeddings
    proj = emb.patch_embeddings.projection
    t, ph, pw = proj.kernel_size
    fields: dict[str, Any] = {
        "image_size": hf.image_size,
        "patch_size": (ph, pw),
        "in_channels": hf.num_channels,
        "num_frames": hf.num_frames,
        "tubelet_size": t,
        "head": "none",
        "preprocess": _default_preprocess("videomae" if is_videomae else "vivit", hf.image_size),
    }
    sd: State = {"patch_embed.weight": proj.weight, "patch_embed.bias": proj.bias}
    classifier = getattr(model, "classifier", None)
    if is_videomae:
        fields.update(class_token=False, pos_embed="sincos", pos_embed_prefix_tokens=0)
        final_ln = backbone.layernorm
        fields["final_norm"] = final_ln is not None
        if final_ln is not None:
            _ln(sd, "ln_final", final_ln)
        fc_norm = getattr(model, "fc_norm", None)
        if classifier is None:
            fields["pool"] = "none"
        elif fc_norm is not None:
            fields.update(pool="mean", fc_norm=True, fc_norm_eps=fc_norm.eps)
            _ln(sd, "fc_norm", fc_norm)
        else:
            raise TypeError("VideoMAEForVideoClassification without mean pooling (use_mean_pooling=False) pools "
                            "the first patch token, which HookedViT does not represent; use mean pooling.")  # fmt: skip
    else:
        fields.update(class_token=True, pos_embed_prefix_tokens=1, final_norm=True, pool="cls")
        sd["cls_token"], sd["pos_embed"] = emb.cls_token, emb.position_embeddings
        _ln(sd, "ln_final", backbone.layernorm)
        pooler = getattr(backbone, "pooler", None)
        if classifier is None and pooler is not None:
            fields.update(head="classifier", n_classes=pooler.dense.out_features, head_act="tanh")
            sd["head.weight"], sd["head.bias"] = pooler.dense.weight, pooler.dense.bias
    if isinstance(classifier, nn.Linear):
        fields.update(head="classifier", n_classes=classifier.out_features)
        sd["head.weight"], sd["head.bias"] = classifier.weight, classifier.bias
    return fields, sd, backbone


FAMILIES = {
    "ViTModel": _vit_family,
    "ViTForImageClassification": _vit_family,
    "Dinov2Model": _vit_family,
    "Dinov2WithRegistersModel": _vit_family,
    "CLIPVisionModel": _clip_family,
    "CLIPVisionModelWithProjection": _clip_family,
    "CLIPModel": _clip_family,
    "SiglipVisionModel": _siglip_family,
    "SiglipModel": _siglip_family,
    "VivitModel": _video_family,
    "VivitForVideoClassification": _video_family,
    "VideoMAEModel": _video_family,
    "VideoMAEForVideoClassification": _video_family,
}


def _hooked_config_and_state(model: nn.Module) -> tuple[HookedViTConfig, State]:
    kind = type(model).__name__
    if kind not in FAMILIES:
        raise TypeError(f"Unsupported transformers class {kind}; supported: {sorted(FAMILIES)}.")
    fields, sd, backbone = FAMILIES[kind](model)
    layers = _layers(backbone)
    hf = backbone.config
    first = hf_layer_parts(layers[0])
    n_heads = hf.num_attention_heads
    cfg = HookedViTConfig(
        d_model=hf.hidden_size,
        n_layers=len(layers),
        n_heads=n_heads,
        d_head=first["q"].out_features // n_heads,
        model_name=_name(model),
        **_block_config(layers[0], getattr(hf, "hidden_act", None)),
        **fields,
    )
    for i, layer in enumerate(layers):
        sd.update(_block_state(i, layer, cfg))
    return cfg, sd


def hf_hooked_config(model: nn.Module) -> HookedViTConfig:
    """The HookedViTConfig of a transformers model (works on ``meta``-device models)."""
    return _hooked_config_and_state(model)[0]


def convert_hf_vit(model: nn.Module) -> HookedViT:
    """Any supported transformers vision model -> HookedViT with identical outputs (see ``FAMILIES``)."""
    cfg, sd = _hooked_config_and_state(model)
    return HookedViT.from_state_dict(cfg, {k: v.detach().clone().float() for k, v in sd.items()})
