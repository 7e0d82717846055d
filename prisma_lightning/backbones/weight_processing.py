"""Weight rewrites that leave a HookedViT's outputs unchanged but make its weights easier to read.

- ``fold_layer_norm``: every LayerNorm's weight and bias moves into the linear layer that reads it, so the
  LayerNorm only centres and scales (TransformerLens's ``fold_ln``).
- ``fold_layer_scale``: layer-scale gammas move into the attention output and MLP output weights.
- ``center_writing_weights``: everything that writes to the residual stream becomes mean-zero over
  ``d_model``; valid because every reader of the residual stream is a LayerNorm, which centres anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from prisma_lightning.backbones.components import LayerNorm
    from prisma_lightning.backbones.hooked_vit import HookedViT


def _with_bias(linear: nn.Linear) -> nn.Linear:
    """Give a bias-free linear layer a zero bias parameter (folding an LN bias needs somewhere to go)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(linear.weight.new_zeros(linear.out_features))
    return linear


@torch.no_grad()
def _fold_into(ln: LayerNorm, linear: nn.Linear) -> None:
    """``linear(ln(x)) == linear'(normalise(x))`` with ``W' = W * w_ln`` and ``b' = b + W @ b_ln``."""
    _with_bias(linear)
    linear.bias.add_(linear.weight @ ln.bias)
    linear.weight.mul_(ln.weight[None, :])
    ln.weight.fill_(1.0)
    ln.bias.zero_()


@torch.no_grad()
def fold_layer_norm(model: HookedViT) -> None:
    """Fold ln1 into qkv, ln2 into the MLP's first layer, and the final norm into the head where it has one.

    ``ln_pre`` (which writes the residual stream), and ``ln_final`` when ``fc_norm`` or attention pooling
    follows it, cannot be folded and are left as they are. The config is updated for biases the folding had to create.
    """
    cfg = model.cfg
    for block in model.blocks:
        attn = block.attn
        if attn.q_bias is not None:
            # Merge VideoMAE-style q/v biases into one full qkv bias before folding.
            attn.qkv.bias = nn.Parameter(attn.qkv_bias().detach().clone())
            attn.q_bias = attn.v_bias = None
        _fold_into(block.ln1, attn.qkv)
        cfg.qkv_bias = "qkv"
        if not cfg.attn_only:
            _fold_into(block.ln2, block.mlp.fc1)
            _with_bias(block.mlp.fc2)
            cfg.mlp_bias = True
    if model.head is not None:
        if model.fc_norm is not None:
            _fold_into(model.fc_norm, model.head)
            cfg.head_bias = True
        elif model.ln_final is not None and model.attn_pool is None:  # pooling must be linear to commute
            _fold_into(model.ln_final, model.head)
            cfg.head_bias = True


@torch.no_grad()
def fold_layer_scale(model: HookedViT) -> None:
    """Multiply layer-scale gammas into the output weights and biases, then set the gammas to one."""
    for block in model.blocks:
        pairs = [(block.ls1, block.attn.out)]
        if not model.cfg.attn_only:
            pairs.append((block.ls2, block.mlp.fc2))
        for ls, linear in pairs:
            if ls is None:
                continue
            linear.weight.mul_(ls.gamma[:, None])
            if linear.bias is not None:
                linear.bias.mul_(ls.gamma)
            ls.gamma.fill_(1.0)


def _center(t: torch.Tensor, dim: int) -> None:
    t.sub_(t.mean(dim=dim, keepdim=True))


@torch.no_grad()
def center_writing_weights(model: HookedViT) -> None:
    """Make attention and MLP outputs (and the embeddings) mean-zero over ``d_model``.

    Raises ``ValueError`` for a model that reads the residual stream without a LayerNorm (no ``ln_final``
    and no ``fc_norm``), where centring would change the output.
    """
    cfg = model.cfg
    if model.ln_final is None and model.fc_norm is None:
        raise ValueError(
            "center_writing_weights needs a LayerNorm between the residual stream and the output "
            "(cfg.final_norm or cfg.fc_norm); this model has neither, so centring would change its outputs."
        )
    fold_layer_scale(model)
    for block in model.blocks:
        writers = [block.attn.out] + ([] if cfg.attn_only else [block.mlp.fc2])
        for linear in writers:
            _center(linear.weight, dim=0)  # weight [d_model, d_in]: centre each column over d_model
            if linear.bias is not None:
                _center(linear.bias, dim=0)
    # The embeddings are read by ln_pre or ln1, which both centre.
    _center(model.patch_embed.weight, dim=0)
    if model.patch_embed.bias is not None:
        _center(model.patch_embed.bias, dim=0)
    for param in (model.cls_token, model.register_tokens, model.pos_embed):
        if param is not None:
            _center(param, dim=-1)
