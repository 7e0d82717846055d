"""Attention visualisation: a static grid of heads (matplotlib) and a standalone interactive HTML page.

:func:`plot_attention_heads` draws, for one query token (the class token, a patch, or the mean over patch queries),
every head's attention over the image, layers as rows and heads as columns. :func:`attention_html` writes a page
with no external resources (inline JS/CSS, the image embedded): hovering a patch shows where that patch attends
for the chosen layer and head, a selector and clickable thumbnails switch heads, prefix tokens (class token,
registers) can be chosen as the query, and video models get a time-step slider.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from prisma_lightning.interp._common import (
    TokenLayout,
    as_batch,
    display_image,
    fill_template,
    layout_for_tokens,
    new_figure,
    read_template,
    script_json,
    upsample_grid,
)
from prisma_lightning.utils import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from prisma_lightning.backbones.protocol import HookedBackbone

Query = int | Literal["cls", "mean"]


def _layers(model: HookedBackbone, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    chosen = list(range(n)) if layers is None else [i % n for i in layers]
    bad = [i for i in (layers or []) if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} are out of range for a model with {n} layers.")
    return chosen


@torch.no_grad()
def attention_patterns(model: HookedBackbone, images: Tensor, layers: Sequence[int] | None = None) -> Tensor:
    """Attention patterns ``[n_layers, B, n_heads, T, T]`` (query, key) of ``images`` for the chosen ``layers``."""
    images = as_batch(model, images)
    chosen = _layers(model, layers)
    names = [f"blocks.{i}.attn.hook_pattern" for i in chosen]
    _, cache = model.run_with_cache(images, names_filter=names, stop_at_layer=max(chosen) + 1)
    return torch.stack([cache[n] for n in names]).float().cpu()


def _query_index(layout: TokenLayout, query: Query) -> int | None:
    """Sequence index of the query token (None = mean over patch queries)."""
    if query == "mean":
        return None
    if query == "cls":
        if not layout.has_cls:
            raise ValueError("This model has no class token; use query='mean' or a token index.")
        return 0
    if not 0 <= int(query) < layout.n_tokens:
        raise ValueError(f"query token {query} is outside [0, {layout.n_tokens}).")
    return int(query)


def plot_attention_heads(
    model: HookedBackbone,
    image: Tensor,
    query: Query | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    time: int = 0,
    alpha: float = 0.65,
) -> Figure:
    """Grid of attention maps (rows: layers, columns: heads) over one image for one query token.

    ``query``: ``"cls"`` (default when the model has a class token), ``"mean"`` (mean over patch queries; the
    default otherwise) or a token index. Each map is that query's attention to the patches of time step ``time``,
    scaled per head to its maximum; the title gives the attention mass on prefix tokens (class token, registers).
    """
    image = as_batch(model, image)[:1]
    chosen = _layers(model, layers)
    pattern = attention_patterns(model, image, chosen)[:, 0]  # [L, h, T, T]
    layout = layout_for_tokens(model, pattern.shape[-1])
    if query is None:
        query = "cls" if layout.has_cls else "mean"
    q = _query_index(layout, query)
    head_list = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    rows = pattern[:, :, layout.n_prefix :].mean(2) if q is None else pattern[:, :, q]  # [L, h, T_k]
    picture = display_image(image[0], time, layout.tubelet_size)
    h_img, w_img = picture.shape[:2]
    fig = new_figure(1.9 * len(head_list) + 0.6, 2.0 * len(chosen) + 0.6)
    axes = np.atleast_2d(fig.subplots(len(chosen), len(head_list), squeeze=False))
    per_time = layout.grid[0] * layout.grid[1]
    for r, layer in enumerate(chosen):
        for c, head in enumerate(head_list):
            ax = axes[r, c]
            keys = rows[r, head, layout.n_prefix + time * per_time : layout.n_prefix + (time + 1) * per_time]
            grid = keys.reshape(layout.grid) / keys.max().clamp_min(1e-12)
            ax.imshow(picture)
            ax.imshow(upsample_grid(grid, (h_img, w_img)), cmap="inferno", alpha=alpha, vmin=0, vmax=1)
            if q is not None and q >= layout.n_prefix and (q - layout.n_prefix) // per_time == time:
                pr, pc = divmod((q - layout.n_prefix) % per_time, layout.grid[1])
                ph, pw = h_img / layout.grid[0], w_img / layout.grid[1]
                ax.add_patch(_box(pc * pw - 0.5, pr * ph - 0.5, pw, ph))
            prefix_mass = float(rows[r, head, : layout.n_prefix].sum())
            title = f"L{layer}H{head}" + (f" prefix {prefix_mass:.2f}" if layout.n_prefix else "")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    name = "mean over patch queries" if q is None else layout.token_label(q)
    fig.suptitle(f"Attention from {name}" + (f", time step {time}" if layout.n_time > 1 else ""), fontsize=10)
    return fig


def _box(x: float, y: float, w: float, h: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, edgecolor="cyan", lw=1.5)


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def attention_html(
    model: HookedBackbone,
    image: Tensor,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    display_size: int = 448,
) -> str:
    """A standalone interactive HTML page of ``image``'s attention (one image, or one clip for video models).

    The page embeds the image and the attention patterns of ``layers`` (default: all), quantised to 8 bits per
    weight relative to each query row's maximum (the row maxima are stored exactly). It loads no external
    resource. ``display_size`` is the image's on-screen size in pixels (rounded to a whole zoom factor).
    """
    image = as_batch(model, image)[:1]
    chosen = _layers(model, layers)
    pattern = attention_patterns(model, image, chosen)[:, 0]  # [L, h, T, T]
    layout = layout_for_tokens(model, pattern.shape[-1])
    rowmax = pattern.amax(-1).clamp_min(1e-12)  # [L, h, T]
    quantised = torch.round(pattern / rowmax[..., None] * 255).clamp(0, 255).to(torch.uint8)
    frames = []
    for t in range(layout.n_time):
        rgb = (display_image(image[0], t, layout.tubelet_size) * 255).round().astype(np.uint8)
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
        frames.append(_b64(rgba))
    height, width = rgb.shape[:2]
    prefix_labels = [layout.token_label(i) for i in range(layout.n_prefix)]
    payload = {
        "title": title or f"Attention of {model.cfg.model_name or type(model).__name__}",
        "layers": chosen,
        "n_heads": int(pattern.shape[1]),
        "n_tokens": int(pattern.shape[-1]),
        "n_prefix": layout.n_prefix,
        "prefix_labels": prefix_labels,
        "grid": list(layout.grid),
        "n_time": layout.n_time,
        "default_query": layout.n_prefix + (layout.grid[0] // 2) * layout.grid[1] + layout.grid[1] // 2,
        "display": int(display_size),
        "image": {"width": int(width), "height": int(height), "frames": frames},
        "attn": _b64(quantised.numpy()),
        "rowmax": _b64(rowmax.numpy().astype("<f4")),
    }
    # The title goes into <title> as escaped text and into the JSON of the payload <script> element, escaped so
    # that no text ("</script>", "<!--<script>") can end or re-open it; one pass fills both placeholders, so a
    # title containing "__DATA__" is not substituted again.
    values = {"__TITLE__": html.escape(payload["title"]), "__DATA__": script_json(payload)}
    return fill_template(read_template("attention.html"), values)


def save_attention_html(path: str | Path, model: HookedBackbone, image: Tensor, **kwargs) -> Path:
    """Write :func:`attention_html` to ``path`` (UTF-8, atomically: the old file stays until the new one is
    complete); ``kwargs`` go to :func:`attention_html`. Returns the path."""
    return atomic_write_text(path, attention_html(model, image, **kwargs))
