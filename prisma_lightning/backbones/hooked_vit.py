"""`HookedViT`: a vision transformer whose every intermediate activation is a named HookPoint.

Token order: class token (if any), register tokens (if any), then patches in row-major order. HookedViT satisfies
:class:`~prisma_lightning.backbones.protocol.HookedBackbone`, the interface SAE training, evaluation and the
interpretability tools use. ViT-Prisma's names are aliases of ours (:data:`VIT_PRISMA_ALIASES`), accepted wherever
a hook name is, so ViT-Prisma SAE configs work unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prisma_lightning.backbones.components import AttentionPool, Block, LayerNorm
from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.backbones.factored_matrix import FactoredMatrix
from prisma_lightning.backbones.transforms import PreprocessConfig, build_transform
from prisma_lightning.hooks import HookedModule, HookPoint
from prisma_lightning.hooks.protocol import ResidComponent, ResidNorm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

VIT_PRISMA_ALIASES = {
    "hook_ln_pre": "ln_pre.hook_normalized",
    "hook_ln_final": "ln_final.hook_normalized",
    "hook_post_head_pre_normalize": "hook_head_out",
}
"""ViT-Prisma hook name -> ours: ``ln_pre``'s output, ``ln_final``'s output, and the head output (on a model without
a head, the pooled vector ``hook_pooled``: ViT-Prisma's pre-logits output). An alias exists when its hook does."""


def resample_pos_grid(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str, antialias: bool
) -> torch.Tensor:
    """Resize patch position embeddings ``[1, gh*gw, d]`` from ``old_grid`` to ``new_grid`` (float32 math)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode=mode, antialias=antialias, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)


def sincos_table(n_positions: int, d: int) -> torch.Tensor:
    """Fixed 1-D sinusoid table ``[1, n_positions, d]`` (sin on even channels, cos on odd; VideoMAE's)."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(d, dtype=torch.float64) // 2) / d
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return table[None].float()


class HookedViT(HookedModule):
    """Vision transformer with TransformerLens-style hooks (see DESIGN.md for every hook name).

    ``forward(images [B, C, H, W])`` returns the head output (logits or projected embedding), the pooled
    vector when there is no head, or all tokens with ``pool='none'``. ``stop_at_layer=L`` returns the
    residual stream after ``blocks[:L]``.

    ViT-Prisma's ``hook_ln_pre``, ``hook_ln_final`` and ``hook_post_head_pre_normalize`` are aliases (``hook_aliases``);
    its optional input hooks ``blocks.{i}.hook_attn_in``, ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` and
    ``hook_mlp_in`` exist with ``cfg.use_attn_in``, ``cfg.use_split_qkv_input`` and ``cfg.use_hook_mlp_in``.
    """

    def __init__(self, cfg: HookedViTConfig | dict[str, Any]):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedViTConfig.from_dict(cfg)
        self.cfg = cfg
        d = cfg.d_model
        if cfg.is_video:
            kernel = (cfg.tubelet_size, *cfg.patch_size)
            self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=kernel, stride=kernel, bias=cfg.patch_bias)
        else:
            self.patch_embed = nn.Conv2d(
                cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, d)) if cfg.n_registers else None
        n_pos = cfg.pos_embed_prefix_tokens + cfg.n_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d)) if cfg.pos_embed == "learned" else None
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed_fixed", sincos_table(n_pos, d), persistent=False)
        else:
            self.pos_embed_fixed = None
        self.ln_pre = LayerNorm(d, cfg.layer_norm_eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = LayerNorm(d, cfg.layer_norm_eps) if cfg.final_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.pool == "attn" else None
        self.fc_norm = LayerNorm(cfg.pooled_dim, cfg.fc_norm_eps or cfg.layer_norm_eps) if cfg.fc_norm else None
        if cfg.head == "none":
            self.head = None
        else:
            self.head = nn.Linear(cfg.pooled_dim, cfg.d_out, bias=cfg.head_bias)
        self.hook_embed = HookPoint()  # [B, T_patch, d]
        self.hook_pos_embed = HookPoint()  # [B, T, d] (zero rows for prefix tokens without a position)
        self.hook_full_embed = HookPoint()  # [B, T, d]
        self.hook_pooled = HookPoint()  # [B, d] (the head's input; [B, T, d] with pool='none')
        self.hook_head_out = HookPoint()  # [B, d_out]
        self.init_weights()
        self.setup_hooks(aliases=self._vit_prisma_aliases())

    def _vit_prisma_aliases(self) -> dict[str, str]:
        aliases = dict(VIT_PRISMA_ALIASES)
        if self.head is None:
            aliases["hook_post_head_pre_normalize"] = "hook_pooled"
        present = {n for n, m in self.named_modules() if isinstance(m, HookPoint)}
        return {alias: target for alias, target in aliases.items() if target in present}

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """timm-style init: truncated normal (std 0.02) for linears and tokens, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for param in (self.cls_token, self.register_tokens, self.pos_embed):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.probe, std=0.02)
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=(1.0 / w[0].numel()) ** 0.5)

    # ------------------------------------------------------------------ embedding
    def _check_video(self, clips: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.num_frames, cfg.in_channels, *cfg.image_size)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(
                f"This video model expects clips [B, T, C, H, W] with (T, C, H, W) = {expected}, got a tensor of "
                f"shape {tuple(clips.shape)}. Sample {cfg.num_frames} frames, resize to {cfg.image_size} and stack "
                "frames on dimension 1 (the layout of Hugging Face video models)."
            )

    def _grid_for(self, images: torch.Tensor, interpolate_pos_encoding: bool | None) -> tuple[int, int]:
        cfg = self.cfg
        if cfg.is_video:
            self._check_video(images)
            return cfg.grid_size
        if images.ndim != 4:
            raise ValueError(
                f"HookedViT expects images [B, C, H, W], got a tensor of shape {tuple(images.shape)}; "
                "add a batch dimension with images.unsqueeze(0) for a single image."
            )
        if images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"Expected {cfg.in_channels} input channels, got {images.shape[1]} (images {tuple(images.shape)}); "
                "convert grayscale/RGBA images to RGB first."
            )
        size = tuple(images.shape[-2:])
        if size == cfg.image_size:
            return cfg.grid_size
        dynamic = cfg.dynamic_img_size if interpolate_pos_encoding is None else interpolate_pos_encoding
        if not dynamic:
            raise ValueError(
                f"Expected images of size {cfg.image_size}, got {size}. Resize them, or pass "
                "interpolate_pos_encoding=True (or set cfg.dynamic_img_size) to interpolate position embeddings."
            )
        if size[0] % cfg.patch_size[0] or size[1] % cfg.patch_size[1]:
            raise ValueError(f"Image size {size} is not divisible by the patch size {cfg.patch_size}.")
        return (size[0] // cfg.patch_size[0], size[1] // cfg.patch_size[1])

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """``[1, T, d]`` position embeddings for a patch grid, zero rows for prefix tokens without one."""
        table = self.pos_embed if self.pos_embed is not None else self.pos_embed_fixed
        if table is None:
            return None
        cfg = self.cfg
        n_pos_prefix = cfg.pos_embed_prefix_tokens
        prefix, patches = table[:, :n_pos_prefix], table[:, n_pos_prefix:]
        if tuple(grid) != cfg.grid_size:
            if cfg.pos_embed != "learned":
                raise ValueError(
                    f"Fixed sin-cos position embeddings cover a {cfg.grid_size} patch grid, got {grid}; "
                    f"resize inputs to {cfg.image_size}."
                )
            patches = resample_pos_grid(patches, cfg.grid_size, grid, cfg.pos_interp_mode, cfg.pos_interp_antialias)
        missing = cfg.n_prefix_tokens - n_pos_prefix
        parts = [prefix]
        if missing:
            parts.append(prefix.new_zeros(1, missing, cfg.d_model))
        return torch.cat(parts + [patches], dim=1) if (n_pos_prefix or missing) else patches

    def embed(self, images: torch.Tensor, interpolate_pos_encoding: bool | None = None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (clips ``[B, T, C, H, W]``) -> the residual entering block 0 ``[B, T, d]``."""
        grid = self._grid_for(images, interpolate_pos_encoding)
        B = images.shape[0]
        if self.cfg.is_video:
            images = images.transpose(1, 2)  # [B, C, T, H, W] for the Conv3d; tokens come out time-major
        x = self.hook_embed(self.patch_embed(images).flatten(2).transpose(1, 2))  # [B, T_patch, d]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        pos = self.position_embedding(grid)
        if pos is not None:
            x = x + self.hook_pos_embed(pos.expand(B, -1, -1))
        x = self.hook_full_embed(x)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        return x

    # ------------------------------------------------------------------ forward
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` -> ``[B, d]`` (class token or mean of patch tokens), unchanged with pool='none'."""
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "mean":
            return x[:, self.cfg.n_prefix_tokens :].mean(dim=1)
        if self.attn_pool is not None:
            return self.attn_pool(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Residual after the last block ``[B, T, d]`` -> model output."""
        if self.ln_final is not None:
            x = self.ln_final(x)
        x = self.pool(x)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        x = self.hook_pooled(x)
        if self.head is None:
            return x
        x = self.head(x)
        if self.cfg.head_act == "tanh":
            x = torch.tanh(x)
        return self.hook_head_out(x)

    def forward_head_tokens(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual vectors ``[..., d_model]`` -> ``[..., d_out]``, each read as if it were the pooled vector.

        Applies ``ln_final`` (weight and bias), the attention pool with all its attention on the single token
        (``pool='attn'``; a softmax over one key is 1, so its value, output projection and MLP remain), ``fc_norm``
        and the head (with its tanh). Class-token and mean pooling are skipped: with ``pool='cls'`` the class
        token's reading at the last layer is the model output.
        """
        x = resid
        if self.ln_final is not None:
            x = self.ln_final(x)
        if self.attn_pool is not None:
            lead = x.shape[:-1]
            x = self.attn_pool(x.reshape(-1, 1, x.shape[-1]))  # [N, d_pool]
            x = x.reshape(*lead, x.shape[-1])
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        if self.head is None:
            return x
        x = self.head(x)
        return torch.tanh(x) if self.cfg.head_act == "tanh" else x

    def forward(
        self,
        images: torch.Tensor,
        stop_at_layer: int | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> torch.Tensor:
        if stop_at_layer is not None and not -self.cfg.n_layers <= stop_at_layer <= self.cfg.n_layers:
            raise ValueError(
                f"stop_at_layer must be in [-{self.cfg.n_layers}, {self.cfg.n_layers}], got {stop_at_layer}."
            )
        x = self.embed(images, interpolate_pos_encoding)
        for block in self.blocks[:stop_at_layer]:
            x = block(x)
        if stop_at_layer is not None:
            return x
        return self.forward_head(x)

    # ------------------------------------------------------------------ hook helpers
    def stop_layer_for(self, hook_name: str) -> int | None:
        """The smallest ``stop_at_layer`` that still runs ``hook_name`` (None: it comes after the blocks)."""
        hook_name = self.canonical_hook_name(hook_name)
        parts = hook_name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
        if hook_name in ("hook_embed", "hook_pos_embed", "hook_full_embed") or hook_name.startswith("ln_pre."):
            return 0
        return None

    def stop_layer_for_all(self, hook_names: list[str]) -> int | None:
        """``stop_at_layer`` that runs every hook in ``hook_names``."""
        stops = [self.stop_layer_for(h) for h in hook_names]
        return None if any(s is None for s in stops) else max(stops)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros of the input shape (``[B, C, H, W]``, or ``[B, T, C, H, W]`` for video)."""
        cfg = self.cfg
        shape = (
            (cfg.num_frames, cfg.in_channels, *cfg.image_size) if cfg.is_video else (cfg.in_channels, *cfg.image_size)
        )
        return torch.zeros(batch, *shape, device=self.patch_embed.weight.device, dtype=self.patch_embed.weight.dtype)

    @torch.no_grad()
    def hook_width(self, hook_name: str) -> int:
        """Last-dimension width of a hook's activation (one tiny forward pass, stopped as early as possible)."""
        self.resolve_hooks(hook_name)
        _, cache = self.run_with_cache(
            self.example_input(), names_filter=hook_name, stop_at_layer=self.stop_layer_for(hook_name)
        )
        return int(cache[hook_name].shape[-1])

    # ------------------------------------------------------------------ residual stream (ResidualStreamModel)
    def _check_layer(self, layer: int, mlp_input: bool) -> None:
        n = self.cfg.n_layers
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in [0, {n}] (n_layers={n}), got {layer}.")
        if mlp_input and layer == n:
            raise ValueError(f"There is no MLP input after the last block (layer={n}); pass a block index below {n}.")
        if mlp_input and self.cfg.attn_only:
            raise ValueError("This model is attention-only (cfg.attn_only=True): its blocks have no MLP input.")

    def resid_hook_name(self, layer: int, mlp_input: bool = False) -> str:
        """Hook holding the residual stream entering block ``layer`` (``n_layers``: after the last block), or
        entering its MLP (``hook_resid_mid``) with ``mlp_input``."""
        self._check_layer(layer, mlp_input)
        if mlp_input:
            return f"blocks.{layer}.hook_resid_mid"
        if layer == self.cfg.n_layers:
            return f"blocks.{layer - 1}.hook_resid_post"
        return f"blocks.{layer}.hook_resid_pre"

    def resid_components(self, layer: int, mlp_input: bool = False) -> list[ResidComponent]:
        """``embed`` (the residual entering block 0, after ``ln_pre`` where there is one), then ``{i}_attn_out`` and
        ``{i}_mlp_out`` of every block before ``layer`` (plus block ``layer``'s attention with ``mlp_input``)."""
        self._check_layer(layer, mlp_input)
        parts = [ResidComponent("embed", "blocks.0.hook_resid_pre", "embed")]
        for i in range(layer + (1 if mlp_input else 0)):
            parts.append(ResidComponent(f"{i}_attn_out", f"blocks.{i}.hook_attn_out", "attn"))
            if not self.cfg.attn_only and i < layer:
                parts.append(ResidComponent(f"{i}_mlp_out", f"blocks.{i}.hook_mlp_out", "mlp"))
        return parts

    def resid_norm(self, layer: int, mlp_input: bool = False) -> ResidNorm | None:
        """``ln_final`` at ``n_layers`` (None without one, e.g. ``fc_norm`` after pooling), else the block's ``ln1``
        (``ln2`` with ``mlp_input``)."""
        self._check_layer(layer, mlp_input)
        if layer == self.cfg.n_layers:
            ln, name = self.ln_final, "ln_final"
            if ln is None:
                return None
        else:
            sub = "ln2" if mlp_input else "ln1"
            ln, name = getattr(self.blocks[layer], sub), f"blocks.{layer}.{sub}"
        return ResidNorm(ln.weight, ln.bias, ln.eps, f"{name}.hook_scale")

    def head_results(self, layer: int, cache: Any) -> torch.Tensor:
        """Per-head writes ``[(B,) T, h, d]`` of block ``layer``: ``attn.hook_result`` when cached, else ``attn.hook_z``
        times the head's ``W_O`` (layer scale included, so with ``b_O`` they sum to ``hook_attn_out``)."""
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer must be a block index in [0, {self.cfg.n_layers}), got {layer}.")
        name = f"blocks.{layer}.attn.hook_result"
        if name in cache:
            return cache[name]
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [(B,) T, h, dh]
        w_o = self._w_o(self.blocks[layer]).to(z.device, z.dtype)  # [h, dh, d]
        return torch.einsum("...thd,hdm->...thm", z, w_o)

    # ------------------------------------------------------------------ weight views (circuit analysis)
    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(block) for block in self.blocks])

    def _split_qkv(self, block: Block, which: int) -> torch.Tensor:
        h, dh = self.cfg.n_heads, self.cfg.d_head
        w = block.attn.qkv.weight.view(3, h, dh, -1)[which]  # [h, dh, d]
        return w.transpose(1, 2)  # [h, d, dh]

    def _qkv_bias(self, block: Block, which: int) -> torch.Tensor:
        h, dh = self.cfg.n_heads, self.cfg.d_head
        bias = block.attn.qkv_bias()
        if bias is None:
            return block.attn.qkv.weight.new_zeros(h, dh)
        return bias.view(3, h, dh)[which]

    @staticmethod
    def _gamma(ls: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
        return ls.gamma if ls is not None else like.new_ones(like.shape[-1])

    @property
    def W_Q(self) -> torch.Tensor:
        """``[n_layers, h, d_model, d_head]``"""
        return self._stack(lambda b: self._split_qkv(b, 0))

    @property
    def W_K(self) -> torch.Tensor:
        """``[n_layers, h, d_model, d_head]``"""
        return self._stack(lambda b: self._split_qkv(b, 1))

    @property
    def W_V(self) -> torch.Tensor:
        """``[n_layers, h, d_model, d_head]``"""
        return self._stack(lambda b: self._split_qkv(b, 2))

    @property
    def b_Q(self) -> torch.Tensor:
        """``[n_layers, h, d_head]``"""
        return self._stack(lambda b: self._qkv_bias(b, 0))

    @property
    def b_K(self) -> torch.Tensor:
        return self._stack(lambda b: self._qkv_bias(b, 1))

    @property
    def b_V(self) -> torch.Tensor:
        return self._stack(lambda b: self._qkv_bias(b, 2))

    @property
    def W_O(self) -> torch.Tensor:
        """``[n_layers, h, d_head, d_model]``, layer scale included (so results sum to ``hook_attn_out``)."""
        return self._stack(self._w_o)

    def _w_o(self, block: Block) -> torch.Tensor:
        """One block's ``W_O [h, d_head, d_model]`` with its layer scale."""
        w = block.attn.out.weight.T * self._gamma(block.ls1, block.attn.out.weight.T)
        return w.reshape(self.cfg.n_heads, self.cfg.d_head, -1)

    @property
    def b_O(self) -> torch.Tensor:
        """``[n_layers, d_model]``, layer scale included."""

        def b_o(b: Block) -> torch.Tensor:
            bias = b.attn.out.bias if b.attn.out.bias is not None else b.attn.out.weight.new_zeros(self.cfg.d_model)
            return bias * self._gamma(b.ls1, bias)

        return self._stack(b_o)

    def _require_mlp(self) -> None:
        if self.cfg.attn_only:
            raise ValueError("This model is attention-only (cfg.attn_only=True); it has no MLP weights.")

    @property
    def W_in(self) -> torch.Tensor:
        """``[n_layers, d_model, d_mlp]`` (``2*d_mlp`` for SwiGLU: gate, then value)."""
        self._require_mlp()
        return self._stack(lambda b: b.mlp.fc1.weight.T)

    @property
    def b_in(self) -> torch.Tensor:
        self._require_mlp()
        return self._stack(
            lambda b: (
                b.mlp.fc1.bias if b.mlp.fc1.bias is not None else b.mlp.fc1.weight.new_zeros(b.mlp.fc1.out_features)
            )
        )

    @property
    def W_out(self) -> torch.Tensor:
        """``[n_layers, d_mlp, d_model]``, layer scale included."""
        self._require_mlp()
        return self._stack(lambda b: b.mlp.fc2.weight.T * self._gamma(b.ls2, b.mlp.fc2.weight.T))

    @property
    def b_out(self) -> torch.Tensor:
        self._require_mlp()

        def b_out(b: Block) -> torch.Tensor:
            bias = b.mlp.fc2.bias if b.mlp.fc2.bias is not None else b.mlp.fc2.weight.new_zeros(self.cfg.d_model)
            return bias * self._gamma(b.ls2, bias)

        return self._stack(b_out)

    @property
    def W_E(self) -> torch.Tensor:
        """Patch embedding as a matrix ``[C*(t)*ph*pw, d_model]`` (flattened patch pixels -> residual)."""
        return self.patch_embed.weight.flatten(1).T

    @property
    def W_pos(self) -> torch.Tensor | None:
        """Position embeddings ``[T_pos, d_model]`` (learned or fixed)."""
        table = self.pos_embed if self.pos_embed is not None else self.pos_embed_fixed
        return None if table is None else table[0]

    @property
    def W_U(self) -> torch.Tensor:
        """Head ``[d_model, d_out]`` (the unembedding of the logit lens)."""
        if self.head is None:
            raise ValueError("This model has no head (cfg.head='none'), so it has no W_U.")
        return self.head.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        if self.head is None:
            raise ValueError("This model has no head (cfg.head='none'), so it has no b_U.")
        return self.head.bias if self.head.bias is not None else self.head.weight.new_zeros(self.cfg.d_out)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head, ``[n_layers, h, d_model, d_model]``."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, ``[n_layers, h, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ weight processing
    def fold_layer_norm(self) -> HookedViT:
        """Fold LayerNorm weights and biases into the layers that read them; see ``weight_processing``."""
        from prisma_lightning.backbones.weight_processing import fold_layer_norm

        fold_layer_norm(self)
        return self

    def center_writing_weights(self) -> HookedViT:
        """Make every write to the residual stream mean-zero (outputs unchanged; LayerNorms centre anyway)."""
        from prisma_lightning.backbones.weight_processing import center_writing_weights

        center_writing_weights(self)
        return self

    # ------------------------------------------------------------------ preprocessing
    def preprocess_config(self) -> PreprocessConfig:
        """The source checkpoint's preprocessing (or a plain resize to ``image_size`` if none is recorded)."""
        if self.cfg.preprocess is not None:
            return PreprocessConfig.from_dict(self.cfg.preprocess)
        size = self.cfg.image_size
        return PreprocessConfig(resize=size, crop_size=size)

    def preprocess(self, train: bool = False) -> Any:
        """torchvision transform matching the source library's preprocessing for this checkpoint.

        Images: PIL or ``[C, H, W]`` -> ``[C, H, W]`` float. Video models: a clip ``[T, C, H, W]`` uint8 tensor
        -> ``[T, C, H, W]`` float (stack clips to ``[B, T, C, H, W]``).
        """
        return build_transform(self.preprocess_config(), train=train)

    # ------------------------------------------------------------------ construction from weights
    @classmethod
    def from_state_dict(cls, cfg: HookedViTConfig, state_dict: dict[str, torch.Tensor], source: str = "") -> HookedViT:
        """Build a model straight from weights, skipping random init (built on ``meta``, then filled in).

        Raises ``ValueError`` naming missing / unexpected keys and shape mismatches (``source`` names the file).
        """
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        model.reset_fixed_buffers()
        where = f" in {source}" if source else ""
        try:
            missing, unexpected = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"Weights{where} do not match the config: {err}") from err
        if missing or unexpected:
            raise ValueError(
                f"Weights{where} do not match the config: missing keys {missing[:5]}, unexpected {unexpected[:5]}."
            )
        return model

    def reset_fixed_buffers(self) -> None:
        """Recompute buffers that are not saved (the fixed sin-cos table)."""
        if self.pos_embed_fixed is not None:
            self.pos_embed_fixed = sincos_table(self.pos_embed_fixed.shape[1], self.cfg.d_model).to(
                self.patch_embed.weight.device
            )

    # ------------------------------------------------------------------ conversion aliases
    @classmethod
    def from_timm(cls, model: Any) -> HookedViT:
        """Alias of :func:`~prisma_lightning.backbones.convert_model` for a timm ``VisionTransformer``."""
        from prisma_lightning.backbones.convert import convert_model

        return convert_model(model)

    @classmethod
    def from_open_clip(cls, model: Any) -> HookedViT:
        """Alias of :func:`~prisma_lightning.backbones.convert_model` for an open_clip model or its ``visual``."""
        from prisma_lightning.backbones.convert import convert_model

        return convert_model(model)

    @classmethod
    def from_transformers(cls, model: Any) -> HookedViT:
        """Alias of :func:`~prisma_lightning.backbones.convert_model` for a Hugging Face model object."""
        from prisma_lightning.backbones.convert import convert_model

        return convert_model(model)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        from prisma_lightning.utils import atomic_path

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "library": "prisma_lightning"})
        with atomic_path(out / CONFIG_NAME) as tmp:
            tmp.write_text(self.cfg.to_json())
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
    ) -> HookedViT:
        """Load a folder written by :meth:`save_pretrained`, or the same two files from a Hugging Face repo.

        ``subfolder`` selects a folder inside the local folder or the repo (e.g. ``checkpoints/step_00001000`` of an
        upload by ``HubUploader``).
        """
        from safetensors.torch import load_file

        path = Path(name_or_path)
        if subfolder and path.is_dir():
            path = path / subfolder
        if path.is_dir():
            config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
            for file in (config_file, weights_file):
                if not file.is_file():
                    raise FileNotFoundError(
                        f"{file} is missing; a HookedViT folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                        "(written by HookedViT.save_pretrained)."
                    )
        else:
            from prisma_lightning.utils import hub_download

            config_file = hub_download(str(name_or_path), CONFIG_NAME, revision=revision, subfolder=subfolder)
            weights_file = hub_download(str(name_or_path), WEIGHTS_NAME, revision=revision, subfolder=subfolder)
        try:
            cfg = HookedViTConfig.from_dict(json.loads(Path(config_file).read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{config_file} is not a valid HookedViT config: {err}") from err
        try:
            state = load_file(str(weights_file))
        except Exception as err:  # safetensors raises its own error type for truncated / corrupt files
            raise ValueError(
                f"{weights_file} is truncated or not a safetensors file ({err}); re-download or re-save the model."
            ) from err
        model = cls.from_state_dict(cfg, state, source=str(weights_file))
        return model.to(device=device, dtype=dtype).eval()
