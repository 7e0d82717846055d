"""Direct logit attribution (DLA): how much each component's write to the residual stream adds to a class logit.

The final residual stream is an exact sum of components: the token and position embeddings (through ``ln_pre``
when the model has one, with its bias as a component of its own), every attention head (``hook_z @ W_O``, layer
scale included), each block's attention output bias ``b_O`` and every MLP. Everything after the residual stream
is linear once the normalisation scales are frozen at their cached values (``ln_final.hook_scale``,
``fc_norm.hook_scale``, the attention pool's pattern and ``ln_kv`` scale, a ZeroShotClassifier's embedding norm):
the logit is then ``sum_t residual_t . direction_t + constant``. Each component's attribution is its dot product
with that per-token direction, and the attributions plus the constant (every bias after the residual stream,
and the attention pool's MLP, which is not linear) sum to the model's actual logit.

A logit difference (``baseline=``) is attributed the same way with the difference of the two class directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prisma_lightning.interp._common import as_batch, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from prisma_lightning.backbones.hooked_vit import HookedViT

ClassIndex = int | Sequence[int] | Tensor


@dataclass(frozen=True)
class DirectLogitAttribution:
    """What :func:`direct_logit_attribution` returns. ``contributions.sum(0) == logit`` (up to float rounding)."""

    contributions: Tensor
    """``[n_components, B]``: each component's share of the logit (difference)."""
    labels: list[str]
    """Component names: ``embed``, ``pos_embed``, ``ln_pre.b``, ``L{i}H{h}``, ``L{i}.b_O``, ``L{i}.mlp``, then the
    non-residual terms ``attn_pool.mlp`` (attention pool with an MLP) and ``bias`` (every bias after the stream)."""
    per_token: Tensor
    """``[n_resid, B, T]``: the residual-stream components (the first ``n_resid`` labels) split by token position;
    summing over tokens gives their ``contributions``."""
    n_resid: int
    """How many leading components are residual-stream writes (and have a per-token split)."""
    logit: Tensor
    """``[B]``: the model's actual logit of the target (minus the baseline's)."""
    residual_direction: Tensor
    """``[B, T, d_model]``: gradient of the logit (difference) with respect to the final residual stream, with the
    normalisation scales frozen; ``contribution = component . direction`` summed over tokens."""
    n_layers: int
    n_heads: int

    @property
    def total(self) -> Tensor:
        """``[B]``: the sum of all contributions (equals :attr:`logit`)."""
        return self.contributions.sum(0)

    def get(self, label: str) -> Tensor:
        """``[B]``: the contribution of one component by name."""
        try:
            return self.contributions[self.labels.index(label)]
        except ValueError:
            shown = ", ".join(self.labels[:8])
            raise KeyError(f"No component {label!r}; components are {shown}, ... ({len(self.labels)}).") from None

    def heads(self) -> Tensor:
        """``[n_layers, n_heads, B]``: per-head contributions."""
        idx = [self.labels.index(f"L{i}H{h}") for i in range(self.n_layers) for h in range(self.n_heads)]
        return self.contributions[idx].reshape(self.n_layers, self.n_heads, -1)

    def mlps(self) -> Tensor:
        """``[n_layers, B]``: per-MLP contributions (zeros for attention-only models)."""
        rows = [self.get(f"L{i}.mlp") if f"L{i}.mlp" in self.labels else None for i in range(self.n_layers)]
        zero = torch.zeros_like(self.contributions[0])
        return torch.stack([zero if r is None else r for r in rows])


# ---------------------------------------------------------------------------------------------- helpers
def _class_tensor(value: ClassIndex, batch: int, name: str, n_classes: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} must be one class index or one per image ({batch}), got {t.numel()} values.")
    if (t < 0).any() or (t >= n_classes).any():
        raise ValueError(f"{name} has a class index outside [0, {n_classes}): {t.tolist()}.")
    return t.clone()


def _frozen_ln_pullback(direction: Tensor, ln: nn.Module, scale: Tensor) -> tuple[Tensor, Tensor]:
    """For ``y = (x - mean x) / scale * w + b`` and ``f = y . direction``: the direction on ``x``, ``b . direction``."""
    a = direction * ln.weight / scale
    return a - a.mean(-1, keepdim=True), (direction * ln.bias).sum(-1)


def _readout(
    model: HookedViT, out: Tensor, target: Tensor, baseline: Tensor | None, classifier: nn.Module | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The logit (difference) as ``out . u + c`` on the model's output ``out [B, d_out]``: returns (u, c, logit)."""
    B = out.shape[0]
    rows = torch.arange(B, device=out.device)
    if classifier is None:
        logits = out
        u = F.one_hot(target, out.shape[-1]).to(out.dtype)
        if baseline is not None:
            u = u - F.one_hot(baseline, out.shape[-1]).to(out.dtype)
        c = out.new_zeros(B)
    elif hasattr(classifier, "logit_scale") and hasattr(classifier, "weights"):  # ZeroShotClassifier
        w = classifier.weights.to(out.dtype)  # [d_embed, C]
        norm = out.norm(dim=-1, keepdim=True)
        logits = classifier(out).to(out.dtype)
        col = w[:, target] if baseline is None else w[:, target] - w[:, baseline]
        u = classifier.logit_scale.to(out.dtype) * col.T / norm
        bias = classifier.logit_bias
        c = out.new_full((B,), float(bias)) if (bias is not None and baseline is None) else out.new_zeros(B)
    elif isinstance(classifier, nn.Linear):
        logits = classifier(out)
        u = classifier.weight[target] if baseline is None else classifier.weight[target] - classifier.weight[baseline]
        b = classifier.bias if classifier.bias is not None else out.new_zeros(classifier.out_features)
        c = b[target] if baseline is None else b[target] - b[baseline]
    else:
        raise TypeError(
            f"direct_logit_attribution needs a linear read-out: a ZeroShotClassifier or an nn.Linear probe, got "
            f"{type(classifier).__name__}. Wrap other heads so their logits are linear in the model output."
        )
    if target.max() >= logits.shape[-1] or (baseline is not None and baseline.max() >= logits.shape[-1]):
        raise ValueError(f"Class index out of range for {logits.shape[-1]} classes.")
    logit = logits[rows, target] - (logits[rows, baseline] if baseline is not None else 0)
    return u, c, logit


def _cache_names(model: HookedViT) -> list[str]:
    cfg = model.cfg
    names = ["hook_full_embed", "hook_pos_embed", f"blocks.{cfg.n_layers - 1}.hook_resid_post", "hook_pooled"]
    names += [f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)]
    if not cfg.attn_only:
        names += [f"blocks.{i}.hook_mlp_out" for i in range(cfg.n_layers)]
    if model.head is not None:
        names.append("hook_head_out")
    for ln in ("ln_pre", "ln_final", "fc_norm"):
        if getattr(model, ln) is not None:
            names.append(f"{ln}.hook_scale")
    if model.attn_pool is not None:
        names += ["attn_pool.hook_pattern", "attn_pool.hook_out"]
        if model.attn_pool.ln_kv is not None:
            names.append("attn_pool.ln_kv.hook_scale")
    return names


def _residual_components(model: HookedViT, cache: Any) -> tuple[Tensor, list[str]]:
    """``[n, B, T, d]`` components that sum to the final residual stream, and their names."""
    full = cache["hook_full_embed"]
    pos = cache["hook_pos_embed"] if "hook_pos_embed" in cache else None
    parts, labels = ([full - pos, pos], ["embed", "pos_embed"]) if pos is not None else ([full], ["embed"])
    if model.ln_pre is not None:
        scale, ln = cache["ln_pre.hook_scale"], model.ln_pre
        parts = [(p - p.mean(-1, keepdim=True)) / scale * ln.weight for p in parts]
        parts.append(ln.bias.expand_as(full))
        labels.append("ln_pre.b")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = cache.stack_head_results(layer=n_layers)  # [L*h, B, T, d]
    b_o = model.b_O  # [L, d]
    for i, block in enumerate(model.blocks):
        parts += list(heads[i * n_heads : (i + 1) * n_heads].unbind(0))
        labels += [f"L{i}H{h}" for h in range(n_heads)]
        if block.attn.out.bias is not None:
            parts.append(b_o[i].expand_as(full))
            labels.append(f"L{i}.b_O")
        if not model.cfg.attn_only:
            parts.append(cache[f"blocks.{i}.hook_mlp_out"])
            labels.append(f"L{i}.mlp")
    return torch.stack(parts), labels


def _attn_pool_pullback(model: HookedViT, cache: Any, u: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pull a pooled-space direction ``u [B, d_pool]`` back through the attention pool (pattern frozen).

    ``x [B, T, d]`` is the pool's input. Returns the per-token direction on ``x`` ``[B, T, d]``, the constant
    ``[B]`` from the pool's biases and the MLP's contribution ``[B]`` (0 without an MLP).
    """
    pool = model.attn_pool
    B, T, d = x.shape
    h, dh = pool.n_heads, pool.d_head
    pattern = cache["attn_pool.hook_pattern"][:, :, 0]  # [B, h, T]
    g = (u @ pool.out.weight).view(B, h, dh)  # direction on the concatenated head outputs
    w_v = pool.kv.weight[h * dh :].view(h, dh, d)  # value half of the kv projection
    b_v = pool.kv.bias[h * dh :].view(h, dh)
    per_head = torch.einsum("bhe,hed->bhd", g, w_v)  # [B, h, d]
    direction = torch.einsum("bht,bhd->btd", pattern, per_head)  # [B, T, d] on the (normalised) tokens
    const = (u * pool.out.bias).sum(-1) + (g * b_v).sum((-2, -1))  # the pattern sums to 1 over tokens
    if pool.ln_kv is not None:
        direction, ln_const = _frozen_ln_pullback(direction, pool.ln_kv, cache["attn_pool.ln_kv.hook_scale"])
        const = const + ln_const.sum(-1)
    mlp = torch.zeros_like(const)
    if pool.mlp is not None:
        # The MLP is not linear: its output (hook_out minus the attention part) is one component of its own.
        xn = pool.ln_kv(x) if pool.ln_kv is not None else x
        v = pool.kv(xn).view(B, T, 2, h, dh)[:, :, 1].transpose(1, 2)  # [B, h, T, dh]
        attn_part = pool.out(torch.matmul(pattern[:, :, None], v).transpose(1, 2).reshape(B, -1))
        mlp = ((cache["attn_pool.hook_out"] - attn_part) * u).sum(-1)
    return direction, const, mlp


# ---------------------------------------------------------------------------------------------- public API
@torch.no_grad()
def direct_logit_attribution(
    model: HookedViT,
    images: Tensor,
    target: ClassIndex | None = None,
    baseline: ClassIndex | None = None,
    classifier: nn.Module | None = None,
) -> DirectLogitAttribution:
    """Attribute the ``target`` logit (minus the ``baseline`` logit) of every image to the model's components.

    Args:
        model: a HookedViT (any pooling, image or video). A ``tanh`` head is not linear and is refused.
        images: inputs ``[B, C, H, W]`` (video ``[B, T, C, H, W]``; a single image is batched).
        target: class index (one, or one per image); default: the model's prediction per image.
        baseline: optional class index for a logit difference ``target - baseline``.
        classifier: a ZeroShotClassifier (CLIP: the projection head's output is classified) or an ``nn.Linear``
            probe reading the model's output (for headless models).
    """
    if model.cfg.head_act != "none":
        raise ValueError(f"head_act={model.cfg.head_act!r} is not linear, so the logit has no exact attribution.")
    images = as_batch(model, images)
    out, cache = model.run_with_cache(images, names_filter=[n for n in _cache_names(model) if n in model.hook_dict])
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    n_classes = (classifier(out) if classifier is not None else out).shape[-1]
    B = out.shape[0]
    if target is None:
        target = (classifier(out) if classifier is not None else out).argmax(-1)
    target_t = _class_tensor(target, B, "target", n_classes).to(out.device)
    baseline_t = None if baseline is None else _class_tensor(baseline, B, "baseline", n_classes).to(out.device)
    u, const, logit = _readout(model, out, target_t, baseline_t, classifier)

    # Back through the head, fc_norm, the pool and ln_final to a direction on the final residual stream.
    if model.head is not None:
        const = const + ((model.head.bias * u).sum(-1) if model.head.bias is not None else 0)
        u = u @ model.head.weight  # [B, d_pool]
    if model.fc_norm is not None:
        u, c = _frozen_ln_pullback(u, model.fc_norm, cache["fc_norm.hook_scale"])
        const = const + c
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    T = resid.shape[1]
    pool_mlp = None
    if model.cfg.pool == "cls":
        direction = torch.zeros_like(resid)
        direction[:, 0] = u
    elif model.cfg.pool == "mean":
        n_prefix = model.cfg.n_prefix_tokens
        direction = torch.zeros_like(resid)
        direction[:, n_prefix:] = u[:, None] / (T - n_prefix)
    elif model.cfg.pool == "attn":
        x = model.ln_final(resid) if model.ln_final is not None else resid
        direction, c, pool_mlp = _attn_pool_pullback(model, cache, u, x)
        const = const + c
    else:
        raise ValueError("pool='none' has no single output per image to attribute; use a pooled model.")
    if model.ln_final is not None:
        direction, c = _frozen_ln_pullback(direction, model.ln_final, cache["ln_final.hook_scale"])
        const = const + c.sum(-1)

    components, labels = _residual_components(model, cache)
    per_token = torch.einsum("nbtd,btd->nbt", components, direction)
    contributions = [per_token.sum(-1)]
    n_resid = len(labels)
    if pool_mlp is not None and model.attn_pool.mlp is not None:
        contributions.append(pool_mlp[None])
        labels.append("attn_pool.mlp")
    contributions.append(const[None])
    labels.append("bias")
    return DirectLogitAttribution(
        contributions=torch.cat(contributions).cpu(),
        labels=labels,
        per_token=per_token.cpu(),
        n_resid=n_resid,
        logit=logit.cpu(),
        residual_direction=direction.cpu(),
        n_layers=model.cfg.n_layers,
        n_heads=model.cfg.n_heads,
    )


def plot_dla(result: DirectLogitAttribution, image: int | None = None, top: int = 16) -> Figure:
    """Layer x head heatmap (plus each layer's MLP) and a bar chart of the largest contributions.

    ``image=None`` averages over the batch.
    """

    def pick(t: Tensor) -> Tensor:
        return t.mean(-1) if image is None else t[..., image]

    heads = pick(result.heads())  # [L, h]
    grid = torch.cat([heads, pick(result.mlps())[:, None]], dim=1)
    values = pick(result.contributions)
    fig = new_figure(11.0, 1.6 + 0.45 * max(result.n_layers, 6))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    lim = float(grid.abs().max()) or 1.0
    im = ax1.imshow(grid.numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax1.set_xticks(range(result.n_heads + 1), [f"H{h}" for h in range(result.n_heads)] + ["MLP"])
    ax1.set_yticks(range(result.n_layers), [f"L{i}" for i in range(result.n_layers)])
    ax1.set_title("Direct logit attribution per head / MLP", fontsize=10)
    fig.colorbar(im, ax=ax1)
    order = values.abs().argsort(descending=True)[:top].flip(0)
    colors = ["tab:red" if values[i] < 0 else "tab:blue" for i in order]
    ax2.barh(range(len(order)), values[order].numpy(), color=colors)
    ax2.set_yticks(range(len(order)), [result.labels[i] for i in order], fontsize=8)
    ax2.axvline(0, color="black", lw=0.5)
    which = "mean over images" if image is None else f"image {image}"
    ax2.set_title(f"Largest contributions ({which}); sum = {float(pick(result.logit)):.3f}", fontsize=10)
    return fig
