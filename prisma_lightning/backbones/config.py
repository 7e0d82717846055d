"""`HookedViTConfig`: every architectural choice of a HookedViT as a typed, documented field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

ActFn = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "swiglu"]


def _pair(value: int | tuple[int, int] | list[int], field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{field} must be an int or a (height, width) pair, got {value!r}.")
    return (int(value[0]), int(value[1]))


@dataclass
class HookedViTConfig:
    """Architecture of a :class:`~prisma_lightning.backbones.HookedViT` (images; video arrives via tubelets)."""

    d_model: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Attention heads per block."""
    d_head: int | None = None
    """Width of one head; defaults to ``d_model // n_heads``."""
    d_mlp: int | None = None
    """Hidden width of the MLP (per branch for SwiGLU); defaults to ``4 * d_model``."""
    image_size: int | tuple[int, int] = 224
    """Input resolution the position embeddings were trained for (height, width)."""
    patch_size: int | tuple[int, int] = 16
    """Patch (convolution kernel and stride) size."""
    in_channels: int = 3
    """Image channels."""
    num_frames: int = 1
    """Frames per clip for video models (input ``[B, T, C, H, W]``); 1 means an image model."""
    tubelet_size: int = 1
    """Frames per tubelet, the temporal patch size of a video model's Conv3d embedding."""
    patch_bias: bool = True
    """Whether the patch-embedding convolution has a bias (CLIP's has none)."""
    class_token: bool = True
    """Prepend a learned class token."""
    n_registers: int = 0
    """Learned register tokens placed after the class token (DINOv2-reg, timm ``reg_tokens``)."""
    pos_embed: Literal["learned", "sincos", "none"] = "learned"
    """Absolute position embedding: learned, fixed 1-D sin-cos over the token index (VideoMAE), or none."""
    pos_embed_prefix_tokens: int | None = None
    """How many leading prefix tokens (class, then registers) have a position embedding; default: the class
    token only. timm's ``no_embed_class=True`` is 0; its default is all prefix tokens."""
    pos_interp_mode: Literal["bicubic", "bilinear"] = "bicubic"
    """Interpolation used to resize the patch position grid for another image size."""
    pos_interp_antialias: bool = True
    """Antialias when resizing position embeddings (timm: True; Hugging Face ViT: False)."""
    dynamic_img_size: bool = False
    """Accept any image size divisible by the patch size, interpolating position embeddings (timm's option)."""
    ln_pre: bool = False
    """LayerNorm on the embeddings before the first block (CLIP ``ln_pre``, timm ``norm_pre``)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""
    qkv_bias: Literal["qkv", "qv", "none"] | bool = "qkv"
    """Biases of the query/key/value projection: all three, query and value only (VideoMAE), or none."""
    attn_out_bias: bool = True
    """Bias on the attention output projection."""
    mlp_bias: bool = True
    """Biases on the MLP's two linear layers."""
    attn_scale: float | None = None
    """Attention logit scale; defaults to ``d_head ** -0.5``."""
    layer_scale_init: float | None = None
    """Initial value of per-channel layer scale (CaiT/DINOv2); None means no layer scale."""
    act_fn: ActFn = "gelu"
    """MLP activation. ``swiglu`` splits the first layer's output in two halves: silu(first) * second."""
    attn_only: bool = False
    """Blocks without MLPs (attention-only models)."""
    final_norm: bool = True
    """LayerNorm over all tokens after the last block (``ln_final``; timm ``norm``)."""
    fc_norm: bool = False
    """LayerNorm after pooling instead (timm ``fc_norm``, used with mean pooling)."""
    fc_norm_eps: float | None = None
    """Epsilon of ``fc_norm`` when it differs from ``layer_norm_eps`` (VideoMAE's classifier uses 1e-5)."""
    pool: Literal["cls", "mean", "attn", "none"] = "cls"
    """Pooling: the class token, the mean of the patch tokens (prefix tokens excluded), attention pooling with a
    learned probe (SigLIP, timm ``map``, open_clip attentional pooler), or none (all tokens)."""
    attn_pool_heads: int | None = None
    """Heads of the attention pool; defaults to ``n_heads``."""
    attn_pool_queries: int = 1
    """Learned queries of the attention pool; the pooled vector is the first query's output."""
    attn_pool_norm_q: bool = False
    """LayerNorm on the pool's query before attention (open_clip ``ln_q``)."""
    attn_pool_norm_kv: bool = False
    """LayerNorm on the tokens the pool attends to (open_clip ``ln_k``)."""
    attn_pool_mlp: bool = False
    """Residual LayerNorm + MLP after the pool's attention (SigLIP head, timm ``map``)."""
    attn_pool_dim: int | None = None
    """Width of the attention pool's output (open_clip CoCa pools into ``output_dim``); defaults to ``d_model``."""
    head: Literal["classifier", "projection", "none"] = "classifier"
    """Output head: a linear classifier with bias, a bias-free projection (CLIP), or none."""
    n_classes: int = 1000
    """Output width of a classifier head."""
    projection_dim: int = 512
    """Output width of a projection head."""
    head_bias: bool | None = None
    """Whether the head has a bias; default: True for a classifier, False for a projection."""
    head_act: Literal["none", "tanh"] = "none"
    """Activation after the head (Hugging Face ViT's pooler uses tanh)."""
    use_attn_result: bool = False
    """Compute per-head outputs ``attn.hook_result [B,T,h,d]`` (costs memory; off by default)."""
    use_attn_in: bool = False
    """Add ``blocks.{i}.hook_attn_in [B,T,h,d]``: one copy of ``hook_resid_pre`` per head, before ``ln1`` (ViT-Prisma
    and TransformerLens name). Head ``i``'s queries, keys and values read copy ``i``, so editing it changes that head
    only. Costs ``h`` times the memory of the residual stream; off by default."""
    use_split_qkv_input: bool = False
    """Add ``blocks.{i}.hook_q_input``, ``hook_k_input``, ``hook_v_input [B,T,h,d]``: per-head copies of
    ``hook_resid_pre`` (of ``hook_attn_in`` with ``use_attn_in``) before ``ln1``, one for each projection, so a
    head's query, key or value input can be edited on its own. Costs ``3 h`` times the memory of the residual
    stream; off by default."""
    use_hook_mlp_in: bool = False
    """Add ``blocks.{i}.hook_mlp_in [B,T,d]``: a copy of ``hook_resid_mid`` that ``ln2`` reads, so the MLP's input
    can be edited without changing the residual stream. Needs MLP blocks (``attn_only=False``); off by default."""
    model_name: str = ""
    """Name of the source model (provenance only)."""
    preprocess: dict[str, Any] | None = None
    """The source's eval preprocessing as a ``PreprocessConfig`` dict (None: resize to ``image_size``, ImageNet
    statistics). Set by conversions from the source library's own config."""

    def __post_init__(self) -> None:
        if isinstance(self.qkv_bias, bool):
            self.qkv_bias = "qkv" if self.qkv_bias else "none"
        for name in ("d_model", "n_layers", "n_heads", "in_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head explicitly "
                    "or choose n_heads dividing d_model."
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.num_frames < 1 or self.tubelet_size < 1 or self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames={self.num_frames} must be a positive multiple of tubelet_size={self.tubelet_size}."
            )
        if self.attn_pool_heads is None:
            self.attn_pool_heads = self.n_heads
        if self.attn_pool_dim is None:
            self.attn_pool_dim = self.d_model
        if self.pool == "attn" and self.attn_pool_dim % self.attn_pool_heads:
            raise ValueError(
                f"attn_pool_dim={self.attn_pool_dim} is not divisible by attn_pool_heads={self.attn_pool_heads}."
            )
        self.image_size = _pair(self.image_size, "image_size")
        self.patch_size = _pair(self.patch_size, "patch_size")
        for side, (size, patch) in enumerate(zip(self.image_size, self.patch_size, strict=True)):
            if size % patch:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by patch_size {self.patch_size} "
                    f"(dimension {side}); pick sizes that tile exactly."
                )
        if self.head_bias is None:
            self.head_bias = self.head == "classifier"
        if self.n_registers < 0:
            raise ValueError(f"n_registers must be >= 0, got {self.n_registers}.")
        if self.pos_embed_prefix_tokens is None:
            self.pos_embed_prefix_tokens = int(self.class_token)
        if not 0 <= self.pos_embed_prefix_tokens <= self.n_prefix_tokens:
            raise ValueError(
                f"pos_embed_prefix_tokens={self.pos_embed_prefix_tokens} must be between 0 and the number of "
                f"prefix tokens ({self.n_prefix_tokens} = class token + registers)."
            )
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='mean' for models without a class token.")
        if self.head == "classifier" and self.n_classes <= 0:
            raise ValueError(f"A classifier head needs n_classes > 0, got {self.n_classes}; or set head='none'.")
        if self.head == "projection" and self.projection_dim <= 0:
            raise ValueError(f"A projection head needs projection_dim > 0, got {self.projection_dim}.")
        if self.use_hook_mlp_in and self.attn_only:
            raise ValueError("use_hook_mlp_in adds a hook on the MLP's input, but attn_only=True blocks have no MLP.")
        if self.fc_norm and self.pool == "none":
            raise ValueError("fc_norm normalises the pooled vector, so it needs pool='cls' or 'mean'.")

    @property
    def n_prefix_tokens(self) -> int:
        """Class token plus registers (the tokens before the patches)."""
        return int(self.class_token) + self.n_registers

    @property
    def is_video(self) -> bool:
        """Video models take ``[B, T, C, H, W]`` clips and embed tubelets with a Conv3d."""
        return self.num_frames > 1

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per side at ``image_size``."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        """Patch tokens (tubelets for video: ``num_frames / tubelet_size`` time steps of the spatial grid)."""
        return (self.num_frames // self.tubelet_size) * self.grid_size[0] * self.grid_size[1]

    @property
    def n_tokens(self) -> int:
        """Sequence length at ``image_size``."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector (the head's input)."""
        return self.attn_pool_dim if self.pool == "attn" else self.d_model

    @property
    def d_out(self) -> int:
        """Width of the model's output (head output, or ``d_model`` without a head)."""
        if self.head == "classifier":
            return self.n_classes
        if self.head == "projection":
            return self.projection_dim
        return self.pooled_dim

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        out["patch_size"] = list(self.patch_size)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HookedViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown HookedViTConfig fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
