"""Building blocks of a HookedViT: LayerNorm, patch embedding, attention, MLP and the transformer block.

Weights are stored as in timm (fused ``qkv`` and ``nn.Linear`` layers) so the forward pass runs the same
kernels as the source models; per-head views for circuit analysis are derived on the HookedViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prisma_lightning.backbones.config import HookedViTConfig
from prisma_lightning.hooks import HookPoint


class LayerNorm(nn.Module):
    """LayerNorm with ``hook_scale [..., 1]`` (the divisor) and ``hook_normalized`` (the output, after w and b)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.has_hooks:
            centred = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            out = centred / scale * self.weight + self.bias
        else:
            out = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return self.hook_normalized(out)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``fc1 -> hook_pre -> act -> hook_post -> fc2``; SwiGLU packs gate and value in fc1 (gate first)."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.act_fn = cfg.act_fn
        width = 2 * cfg.d_mlp if cfg.act_fn == "swiglu" else cfg.d_mlp
        self.fc1 = nn.Linear(cfg.d_model, width, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.hook_pre = HookPoint()  # [B, T, d_mlp] (2*d_mlp for swiglu)
        self.hook_post = HookPoint()  # [B, T, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(self.fc1(x))
        if self.act_fn == "swiglu":
            gate, value = pre.chunk(2, dim=-1)
            post = F.silu(gate) * value
        else:
            post = _ACTIVATIONS[self.act_fn](pre)
        return self.fc2(self.hook_post(post))


class Attention(nn.Module):
    """Multi-head self-attention with TransformerLens hook names.

    Runs ``scaled_dot_product_attention`` unless a hook on ``hook_attn_scores``/``hook_pattern`` is attached,
    in which case the scores and pattern are materialised (same result, see tests).
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        inner = cfg.n_heads * cfg.d_head
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.qkv_bias == "qkv")
        if cfg.qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.out = nn.Linear(inner, cfg.d_model, bias=cfg.attn_out_bias)
        self.use_attn_result = cfg.use_attn_result
        self.hook_q = HookPoint()  # [B, T, h, dh]
        self.hook_k = HookPoint()  # [B, T, h, dh]
        self.hook_v = HookPoint()  # [B, T, h, dh]
        self.hook_attn_scores = HookPoint()  # [B, h, T_q, T_k]
        self.hook_pattern = HookPoint()  # [B, h, T_q, T_k]
        self.hook_z = HookPoint()  # [B, T, h, dh]
        self.hook_result = HookPoint()  # [B, T, h, d] (only with use_attn_result)

    def qkv_bias(self) -> torch.Tensor | None:
        """The full ``[3*h*dh]`` bias (zeros for the key when only q and v have one)."""
        if self.q_bias is not None:
            return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.qkv.bias

    @property
    def explicit(self) -> bool:
        """Whether the attention pattern must be materialised (a hook reads or edits it)."""
        return self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks

    def project_qkv(
        self, x: torch.Tensor, per_head: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, T, h, dh]`` of the normalised residual ``x [B, T, d]``.

        ``per_head`` gives each projection its own per-head input ``[B, T, h, d]`` instead (head ``i`` of the
        query reads ``per_head[0][:, :, i]``): the split-input mode of ``use_split_qkv_input`` / ``use_attn_in``.
        """
        B, T, _ = x.shape
        bias = self.qkv_bias()
        if per_head is None:
            qkv = F.linear(x, self.qkv.weight, bias).view(B, T, 3, self.n_heads, self.d_head)
            q, k, v = qkv.unbind(2)
            return q, k, v
        weight = self.qkv.weight.view(3, self.n_heads, self.d_head, -1)  # [3, h, dh, d]
        bias = bias.view(3, self.n_heads, self.d_head) if bias is not None else None
        out = []
        for i, inp in enumerate(per_head):
            y = torch.einsum("bthd,hed->bthe", inp, weight[i])  # [B, T, h, dh]
            out.append(y + bias[i] if bias is not None else y)
        return out[0], out[1], out[2]

    def forward(
        self,
        x: torch.Tensor,
        out_scale: torch.Tensor | None = None,
        per_head: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x [B, T, d]`` -> ``[B, T, d]``. ``out_scale`` is the block's layer scale, applied here so
        ``hook_result`` includes it; ``per_head`` are per-head q/k/v inputs (see :meth:`project_qkv`)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, per_head)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, dh]
        if self.explicit:
            scores = self.hook_attn_scores(torch.matmul(q * self.scale, k.transpose(-2, -1)))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = torch.matmul(pattern, v)
        else:
            z = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        z = self.hook_z(z.transpose(1, 2))  # [B, T, h, dh]
        if self.use_attn_result:
            w_o = self.out.weight.T  # [h*dh, d]
            bias = self.out.bias
            if out_scale is not None:
                w_o = w_o * out_scale
                bias = bias * out_scale if bias is not None else None
            result = self.hook_result(torch.einsum("bthe,hed->bthd", z, w_o.reshape(self.n_heads, self.d_head, -1)))
            out = result.sum(dim=2)
            return out + bias if bias is not None else out
        out = self.out(z.reshape(B, T, -1))
        return out * out_scale if out_scale is not None else out


class LayerScale(nn.Module):
    """Per-channel scale on a block's branch output (``x * gamma``)."""

    def __init__(self, d: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN transformer block: ``resid_mid = resid_pre + attn(ln1)``, ``resid_post = resid_mid + mlp(ln2)``.

    Optional input hooks (TransformerLens / ViT-Prisma names, off by default):

    * ``hook_attn_in [B, T, h, d]`` (``use_attn_in``): one copy of ``hook_resid_pre`` per head, before ``ln1``.
    * ``hook_q_input``, ``hook_k_input``, ``hook_v_input [B, T, h, d]`` (``use_split_qkv_input``): one such copy
      per head for each projection (copies of ``hook_attn_in`` when both are on).
    * ``hook_mlp_in [B, T, d]`` (``use_hook_mlp_in``): a copy of ``hook_resid_mid`` that ``ln2`` reads.

    With per-head copies, head ``i``'s projection reads ``ln1.hook_normalized`` plus the change an edit of its own
    copy makes after ``ln1`` (``ln1(copy_i) - ln1(hook_resid_pre)``, computed with ln1's weights). Unedited, that
    change is zero and the block computes what it computes without the copies; an edit of one head's copy reaches
    only that head (path patching), and an edit of ``ln1.hook_normalized`` still reaches every head.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.attn_only = cfg.attn_only
        self.n_heads = cfg.n_heads
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.d_model, cfg.layer_scale_init) if cfg.layer_scale_init is not None else None
        self.hook_attn_in = HookPoint() if cfg.use_attn_in else None  # [B, T, h, d]
        self.split_qkv_input = cfg.use_split_qkv_input
        if cfg.use_split_qkv_input:
            self.hook_q_input = HookPoint()  # [B, T, h, d]
            self.hook_k_input = HookPoint()  # [B, T, h, d]
            self.hook_v_input = HookPoint()  # [B, T, h, d]
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
            self.mlp = MLP(cfg)
            self.ls2 = LayerScale(cfg.d_model, cfg.layer_scale_init) if cfg.layer_scale_init is not None else None
            self.hook_resid_mid = HookPoint()  # [B, T, d]
            self.hook_mlp_in = HookPoint() if cfg.use_hook_mlp_in else None  # [B, T, d]
            self.hook_mlp_out = HookPoint()  # [B, T, d]
        self.hook_resid_pre = HookPoint()  # [B, T, d]
        self.hook_attn_out = HookPoint()  # [B, T, d]
        self.hook_resid_post = HookPoint()  # [B, T, d]

    def per_head_inputs(
        self, resid_pre: torch.Tensor, normed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Normalised per-head q/k/v inputs ``[B, T, h, d]`` (None without ``use_attn_in`` / ``use_split_qkv_input``).

        ``normed`` is ln1's output ``[B, T, d]``; see the class docstring for how edits of the copies combine.
        """
        if self.hook_attn_in is None and not self.split_qkv_input:
            return None
        B, T, d = resid_pre.shape
        copies = resid_pre.unsqueeze(2).expand(B, T, self.n_heads, d)
        if self.hook_attn_in is not None:
            copies = self.hook_attn_in(copies.clone())
        if self.split_qkv_input:
            inputs = (
                self.hook_q_input(copies.clone()),
                self.hook_k_input(copies.clone()),
                self.hook_v_input(copies.clone()),
            )
        else:
            inputs = (copies, copies, copies)
        ln = self.ln1
        unedited = F.layer_norm(resid_pre, (d,), ln.weight, ln.bias, ln.eps).unsqueeze(2)  # [B, T, 1, d]
        base = normed.unsqueeze(2)
        q, k, v = (base + (F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps) - unedited) for x in inputs)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(x)
        normed = self.ln1(resid_pre)
        per_head = self.per_head_inputs(resid_pre, normed)
        attn_out = self.hook_attn_out(self.attn(normed, None if self.ls1 is None else self.ls1.gamma, per_head))
        if self.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = resid_mid if self.hook_mlp_in is None else self.hook_mlp_in(resid_mid.clone())
        mlp_out = self.mlp(self.ln2(mlp_in))
        if self.ls2 is not None:
            mlp_out = self.ls2(mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)


class AttentionPool(nn.Module):
    """Attention pooling with learned probe queries (SigLIP head, timm ``map``, open_clip attentional pooler).

    Queries attend to the tokens independently, so only the first query (the pooled vector) is computed.
    Projections are stored like ``nn.MultiheadAttention``: ``q`` reads the probe, ``kv`` reads the tokens.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        d, d_pool = cfg.d_model, cfg.attn_pool_dim
        self.n_heads = cfg.attn_pool_heads
        self.d_head = d_pool // self.n_heads
        self.probe = nn.Parameter(torch.zeros(1, cfg.attn_pool_queries, d_pool))
        self.ln_q = LayerNorm(d_pool, cfg.layer_norm_eps) if cfg.attn_pool_norm_q else None
        self.ln_kv = LayerNorm(d, cfg.layer_norm_eps) if cfg.attn_pool_norm_kv else None
        self.q = nn.Linear(d_pool, d_pool)
        self.kv = nn.Linear(d, 2 * d_pool)
        self.out = nn.Linear(d_pool, d_pool)
        if cfg.attn_pool_mlp:
            mlp_cfg = cfg if d_pool == d else HookedViTConfig(**{**cfg.to_dict(), "d_model": d_pool, "d_mlp": None})
            self.ln = LayerNorm(d_pool, cfg.layer_norm_eps)
            self.mlp = MLP(mlp_cfg)
        else:
            self.ln = self.mlp = None
        self.hook_pattern = HookPoint()  # [B, h, 1, T]
        self.hook_out = HookPoint()  # [B, d_pool]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        query = self.probe[:, :1]
        if self.ln_q is not None:
            query = self.ln_q(query)
        if self.ln_kv is not None:
            x = self.ln_kv(x)
        q = self.q(query).view(1, 1, self.n_heads, self.d_head).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = self.kv(x).view(B, T, 2, self.n_heads, self.d_head).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, dh]
        scale = self.d_head**-0.5
        if self.hook_pattern.has_hooks:
            pattern = self.hook_pattern(torch.matmul(q * scale, k.transpose(-2, -1)).softmax(dim=-1))
            z = torch.matmul(pattern, v)
        else:
            z = F.scaled_dot_product_attention(q, k, v, scale=scale)
        pooled = self.out(z.transpose(1, 2).reshape(B, 1, -1))
        if self.mlp is not None:
            pooled = pooled + self.mlp(self.ln(pooled))
        return self.hook_out(pooled[:, 0])
