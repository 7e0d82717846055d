"""Logit lens: read class logits off the residual stream after every block, for every token.

The residual stream entering each block (and the final one) is sent through the model's own output path (the
backbone's ``forward_head`` / ``forward_head_tokens``; for a HookedViT: ``ln_final`` with weight and bias, pooling,
``fc_norm``, the head ``W_U``, ``b_U``) and, for CLIP-style models, a
:class:`~prisma_lightning.backbones.ZeroShotClassifier` on the projected embedding. Two readings per layer:

* **per token** (``logits [L, B, T, C]``): every token is read as if it were the pooled vector. With class-token
  or mean pooling the pool is skipped; with attention pooling the pool is applied with all its attention on that
  one token (its value, output projection and MLP). The class token's reading at the last layer is the model's
  output (``pool='cls'``); with mean pooling and ``ln_final`` the patches' mean reading is.
* **pooled** (``pooled_logits [L, B, C]``): the whole residual stream through ``forward_head``; at the last layer
  this *is* the model's output, for every pooling.

Video models read the same way; tokens are time-major tubelets (see :class:`~prisma_lightning.interp.TokenLayout`).
Plots: :func:`plot_logit_lens_heatmap` (layer x token), :func:`plot_logit_lens_grid` (top label per patch over the
image) and the emoji lens (:func:`plot_emoji_logit_lens`, :func:`emoji_logit_lens_html`,
:func:`save_emoji_logit_lens_html`; ViT-Prisma's emoji table).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from prisma_lightning.interp._common import (
    TokenLayout,
    as_batch,
    display_image,
    draw_patch_grid,
    drawable_emoji,
    emoji_font,
    imagenet_emoji,
    layout_for_tokens,
    new_figure,
    short_label,
    warn_no_emoji_font,
)
from prisma_lightning.utils import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from prisma_lightning.backbones.protocol import HookedBackbone

Classifier = Callable[[Tensor], Tensor]
"""Maps the model's output ``[..., d_out]`` to class logits (a ZeroShotClassifier, a linear probe, ...)."""


@dataclass(frozen=True)
class LogitLens:
    """What :func:`logit_lens` returns."""

    logits: Tensor
    """Per-token lens ``[n_layers + 1, B, T, n_classes]`` (``2 n_layers + 1`` entries with ``incl_mid``)."""
    pooled_logits: Tensor
    """Lens on the pooled output ``[n_layers + 1, B, n_classes]``; the last entry is the model's output."""
    layer_labels: list[str]
    """Name of each entry: ``0_pre`` (embeddings), ``1_pre``, ..., ``final_post``."""
    class_names: list[str]
    """Name of each class."""
    layout: TokenLayout
    """Where the patches sit among the T tokens."""

    @property
    def patch_logits(self) -> Tensor:
        """Per-patch lens ``[L, B, n_patches, n_classes]`` (prefix tokens dropped)."""
        return self.logits[:, :, self.layout.n_prefix :]

    def topk(self, k: int = 5) -> tuple[Tensor, Tensor]:
        """Top-``k`` logits and class indices per layer and token, each ``[L, B, T, k]``."""
        k = min(k, self.logits.shape[-1])
        return self.logits.topk(k, dim=-1)

    def top_labels(self, layer: int = -1, image: int = 0, k: int = 1, patches_only: bool = True) -> list[list[str]]:
        """Names of the top-``k`` classes of each token (patches only by default) at ``layer``, for one image."""
        logits = self.patch_logits if patches_only else self.logits
        idx = logits[layer, image].topk(min(k, logits.shape[-1]), dim=-1).indices
        return [[self.class_names[i] for i in row] for row in idx.tolist()]

    def predicted_class(self, image: int = 0) -> int:
        """The model's predicted class for ``image`` (argmax of the final pooled logits)."""
        return int(self.pooled_logits[-1, image].argmax())


# ---------------------------------------------------------------------------------------------- unembedding
def _require_read_out(model: HookedBackbone, classifier: Classifier | None) -> None:
    if classifier is None and model.cfg.head == "none":
        raise ValueError(
            "This model has no head (cfg.head='none'), so its residual stream has no class logits; pass a "
            "classifier (e.g. a linear probe nn.Linear(d_model, n_classes)) to read logits through."
        )


def unembed_tokens(model: HookedBackbone, resid: Tensor, classifier: Classifier | None = None) -> Tensor:
    """Logits ``[..., n_classes]`` of residual-stream vectors ``[..., d_model]``, each read as the pooled vector.

    Uses the backbone's ``forward_head_tokens`` (for a HookedViT: ``ln_final`` with weight and bias, the attention
    pool on the single token with ``pool='attn'``, ``fc_norm``, the head and its tanh), then ``classifier`` if given.
    """
    _require_read_out(model, classifier)
    out = model.forward_head_tokens(resid)
    return classifier(out) if classifier is not None else out


def unembed_pooled(model: HookedBackbone, resid: Tensor, classifier: Classifier | None = None) -> Tensor:
    """Logits ``[B, n_classes]`` of a whole residual stream ``[B, T, d]`` through the model's own head path
    (the backbone's ``forward_head``), then ``classifier`` if given."""
    _require_read_out(model, classifier)
    out = model.forward_head(resid)
    return classifier(out) if classifier is not None else out


def default_class_names(n_classes: int, classifier: Any = None) -> list[str]:
    """The classifier's names, ImageNet's for 1000 classes, else ``"0"``, ``"1"``, ...

    A classifier built without names (a ZeroShotClassifier names its classes ``"0"``, ``"1"``, ...) counts as
    unnamed.
    """
    names = getattr(classifier, "class_names", None)
    indices = [str(i) for i in range(n_classes)]
    if names is not None and len(names) == n_classes and list(names) != indices:
        return list(names)
    if n_classes == 1000:
        from prisma_lightning.backbones.zero_shot import imagenet_class_names

        return imagenet_class_names()
    return indices


@torch.no_grad()
def logit_lens(
    model: HookedBackbone,
    images: Tensor,
    classifier: Classifier | None = None,
    class_names: Sequence[str] | None = None,
    incl_mid: bool = False,
) -> LogitLens:
    """Run the logit lens on ``images [B, C, H, W]`` (video ``[B, T, C, H, W]``; a single image is batched).

    Args:
        model: any HookedBackbone with a head, or with ``classifier`` reading its output.
        images: model inputs.
        classifier: maps the head output to class logits, e.g. a ZeroShotClassifier for CLIP models (whose head
            is the projection) or a linear probe for headless models.
        class_names: one per class; default: the classifier's, ImageNet's for 1000 classes, else the indices.
        incl_mid: also read the residual between attention and MLP of every block.
    """
    images = as_batch(model, images)
    n_layers = model.cfg.n_layers
    incl_mid = incl_mid and not model.cfg.attn_only
    names = [model.resid_hook_name(i) for i in range(n_layers + 1)]
    if incl_mid:
        names += [model.resid_hook_name(i, mlp_input=True) for i in range(n_layers)]
    _, cache = model.run_with_cache(images, names_filter=names)
    stack, labels = cache.accumulated_resid(incl_mid=incl_mid, return_labels=True)
    logits = unembed_tokens(model, stack, classifier).float()  # [L, B, T, C]
    pooled = torch.stack([unembed_pooled(model, resid, classifier) for resid in stack]).float()  # [L, B, C]
    n_classes = logits.shape[-1]
    if class_names is None:
        class_names = default_class_names(n_classes, classifier)
    elif len(class_names) != n_classes:
        raise ValueError(f"Got {len(class_names)} class names for {n_classes} classes; pass one name per class.")
    layout = layout_for_tokens(model, stack.shape[-2])
    return LogitLens(logits.cpu(), pooled.cpu(), labels, list(class_names), layout)


# ---------------------------------------------------------------------------------------------- plots
def _token_values(
    lens: LogitLens, image: int, target: int | None, value: Literal["prob", "logit", "rank"]
) -> tuple[Tensor, int]:
    target = lens.predicted_class(image) if target is None else int(target)
    logits = lens.logits[:, image]  # [L, T, C]
    if value == "prob":
        values = logits.softmax(-1)[..., target]
    elif value == "logit":
        values = logits[..., target]
    elif value == "rank":
        values = (logits > logits[..., target : target + 1]).sum(-1).float()
    else:
        raise ValueError(f"value must be 'prob', 'logit' or 'rank', got {value!r}.")
    return values, target


def plot_logit_lens_heatmap(
    lens: LogitLens,
    image: int = 0,
    target: int | None = None,
    value: Literal["prob", "logit", "rank"] = "prob",
    patches_only: bool = False,
) -> Figure:
    """Layer x token heatmap of the ``target`` class (default: the model's prediction) for one image.

    ``value``: its softmax probability, its logit, or its rank among the classes (0 = top).
    """
    values, target = _token_values(lens, image, target, value)
    layout = lens.layout
    if patches_only:
        values = values[:, layout.n_prefix :]
        positions = layout.patch_positions()
    else:
        positions = list(range(values.shape[1]))
    n_layers, n_tokens = values.shape
    fig = new_figure(min(18.0, 2.5 + 0.12 * n_tokens), 1.2 + 0.35 * n_layers)
    ax = fig.add_subplot()
    cmap = "viridis_r" if value == "rank" else "viridis"
    im = ax.imshow(values.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(n_layers), lens.layer_labels)
    step = max(1, n_tokens // 24)
    ax.set_xticks(range(0, n_tokens, step), [layout.token_label(p) for p in positions[::step]], rotation=90, fontsize=7)
    ax.set_xlabel("token")
    ax.set_ylabel("residual stream")
    ax.set_title(f"Logit lens: {value} of '{lens.class_names[target]}' (class {target}), image {image}")
    fig.colorbar(im, ax=ax, label=value)
    return fig


def _layer_indices(lens: LogitLens, layers: int | Sequence[int] | None) -> list[int]:
    n = len(lens.layer_labels)
    if layers is None:
        return list(range(n))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in chosen:
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is out of range for {n} lens entries ({lens.layer_labels}).")
        out.append(layer % n)
    return out


def _cell_texts(
    lens: LogitLens, image: int, layer: int, time: int, emoji: Sequence[str] | None, font_needed: bool
) -> tuple[list[str], Tensor]:
    """Top-1 label (or emoji) and its probability for each patch of one time step."""
    layout = lens.layout
    gh, gw = layout.grid
    if not 0 <= time < layout.n_time:
        raise ValueError(f"time must be in [0, {layout.n_time}), got {time}.")
    per_time = gh * gw
    logits = lens.patch_logits[layer, image, time * per_time : (time + 1) * per_time]  # [gh*gw, C]
    probs = logits.softmax(-1)
    top_p, top_i = probs.max(-1)
    font = emoji_font() if (emoji is not None and font_needed) else None
    texts = []
    for i in top_i.tolist():
        if emoji is not None:
            glyph = drawable_emoji(emoji[i], font) if font_needed else emoji[i]
            texts.append(glyph if glyph is not None else short_label(lens.class_names[i], 8))
        else:
            texts.append(short_label(lens.class_names[i], 8))
    return texts, top_p


def plot_logit_lens_grid(
    lens: LogitLens,
    images: Tensor,
    layers: int | Sequence[int] | None = -1,
    image: int = 0,
    time: int = 0,
    emoji: Sequence[str] | Mapping[int, str] | None = None,
    fontsize: float | None = None,
) -> Figure:
    """The top class of every patch written over the image, one panel per lens entry in ``layers``.

    Cell colour is the top class's probability. ``emoji`` maps class indices to emoji (see
    :func:`plot_emoji_logit_lens`); ``time`` picks the time step of a video model.
    """
    from matplotlib import colormaps

    layout = lens.layout
    batch = layout.batched(images)
    picture = display_image(batch[image], time, layout.tubelet_size)
    chosen = _layer_indices(lens, layers)
    emoji_list = _emoji_list(emoji, len(lens.class_names)) if emoji is not None else None
    font = emoji_font() if emoji_list is not None else None
    if emoji_list is not None and font is None:
        warn_no_emoji_font()
    cols = min(len(chosen), 4)
    rows = -(-len(chosen) // cols)
    fig = new_figure(3.6 * cols, 3.8 * rows)
    h, w = picture.shape[:2]
    gh, gw = layout.grid
    size = fontsize or max(4.0, min(11.0, 60.0 / max(gh, gw)))
    cmap = colormaps["magma"]
    for n, layer in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(picture, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        texts, probs = _cell_texts(lens, image, layer, time, emoji_list, font_needed=True)
        for idx, (text, p) in enumerate(zip(texts, probs.tolist(), strict=True)):
            r, c = divmod(idx, gw)
            x0, y0 = c * w / gw - 0.5, r * h / gh - 0.5
            ax.add_patch(_rect(x0, y0, w / gw, h / gh, cmap(p), alpha=0.35))
            family = [font.family, "DejaVu Sans"] if (font is not None and emoji_list is not None) else None
            ax.text(x0 + w / gw / 2, y0 + h / gh / 2, text, ha="center", va="center", fontsize=size,
                    color="white", fontfamily=family, clip_on=True)  # fmt: skip
        draw_patch_grid(ax, (h, w), layout.grid)
        ax.set_xticks([])
        ax.set_yticks([])
        suffix = f", t={time}" if layout.n_time > 1 else ""
        ax.set_title(f"{lens.layer_labels[layer]}{suffix}", fontsize=9)
    fig.suptitle("Logit lens: top class per patch (cell colour = its probability)", fontsize=10)
    return fig


def _rect(x: float, y: float, w: float, h: float, color: Any, alpha: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=color, alpha=alpha, edgecolor="none")


def _emoji_list(emoji: Sequence[str] | Mapping[int, str] | None, n_classes: int) -> list[str]:
    if emoji is None:
        if n_classes != 1000:
            raise ValueError(
                f"The built-in emoji table covers the 1000 ImageNet classes; this lens has {n_classes} classes. "
                "Pass emoji= a list (one emoji per class) or a dict {class_index: emoji}."
            )
        return imagenet_emoji()
    if isinstance(emoji, Mapping):
        return [emoji.get(i, "❓") for i in range(n_classes)]
    emoji = list(emoji)
    if len(emoji) != n_classes:
        raise ValueError(f"Got {len(emoji)} emoji for {n_classes} classes; pass one per class (or a dict).")
    return emoji


def plot_emoji_logit_lens(
    lens: LogitLens,
    images: Tensor,
    layers: int | Sequence[int] | None = None,
    image: int = 0,
    time: int = 0,
    emoji: Sequence[str] | Mapping[int, str] | None = None,
) -> Figure:
    """ViT-Prisma's emoji logit lens: each patch's top class drawn as an emoji, one panel per layer.

    ``emoji`` defaults to the ImageNet table (:func:`~prisma_lightning.interp.imagenet_emoji`). matplotlib needs a
    monochrome emoji font (e.g. Debian's ``fonts-symbola``); without one, names are drawn and a warning says so.
    :func:`emoji_logit_lens_html` renders with the browser's colour emoji instead.
    """
    return plot_logit_lens_grid(
        lens, images, layers=layers, image=image, time=time, emoji=_emoji_list(emoji, len(lens.class_names))
    )


def emoji_logit_lens_html(
    lens: LogitLens,
    images: Tensor,
    layers: int | Sequence[int] | None = None,
    image: int = 0,
    time: int = 0,
    emoji: Sequence[str] | Mapping[int, str] | None = None,
    cell_px: int = 28,
) -> str:
    """A standalone HTML page (no external resources) with the emoji logit lens of one image, one panel per layer.

    Hovering a cell shows the class name and probability (the ``title`` tooltip). Class names, emoji and layer
    labels are HTML-escaped, so any text shows literally.
    """
    layout = lens.layout
    emoji_list = _emoji_list(emoji, len(lens.class_names))
    batch = layout.batched(images)
    picture = display_image(batch[image], time, layout.tubelet_size)
    uri = _png_data_uri(picture)
    gh, gw = layout.grid
    panels = []
    for layer in _layer_indices(lens, layers):
        texts, probs = _cell_texts(lens, image, layer, time, emoji_list, font_needed=False)
        per_time = gh * gw
        top = lens.patch_logits[layer, image, time * per_time : (time + 1) * per_time].argmax(-1).tolist()
        cells = "".join(
            f'<div class="cell" style="background:rgba(0,0,0,{0.55 * (1 - p):.2f})" '
            f'title="{html.escape(lens.class_names[c])} ({p:.2f})">{html.escape(t)}</div>'
            for t, p, c in zip(texts, probs.tolist(), top, strict=True)
        )
        panels.append(
            f'<figure><div class="lens" style="width:{gw * cell_px}px;height:{gh * cell_px}px;'
            f'grid-template-columns:repeat({gw},1fr);background-image:url({uri})">{cells}</div>'
            f"<figcaption>{html.escape(lens.layer_labels[layer])}</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;background:#111;color:#eee}"
        ".lens{display:grid;background-size:100% 100%;image-rendering:pixelated}"
        f".cell{{display:flex;align-items:center;justify-content:center;font-size:{int(cell_px * 0.7)}px;"
        "outline:1px solid rgba(255,255,255,.15)}figure{display:inline-block;margin:6px}"
    )
    title = "Emoji logit lens"
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>'
        f"<body><h3>{title}: top class per patch</h3>{''.join(panels)}</body></html>"
    )


def save_emoji_logit_lens_html(path: str | Path, lens: LogitLens, images: Tensor, **kwargs: Any) -> Path:
    """Write :func:`emoji_logit_lens_html` to ``path`` (UTF-8, atomically: the old file stays until the new one is
    complete); ``kwargs`` go to :func:`emoji_logit_lens_html`. Returns the path."""
    return atomic_write_text(path, emoji_logit_lens_html(lens, images, **kwargs))


def _png_data_uri(picture: Any) -> str:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, picture, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
