"""Helpers shared by the interpretability tools: token layout, images for display, package data and fonts.

Token order of every backbone (``HookedBackbone``, DESIGN.md): class token (if any), register tokens (if any), then
patches row-major; video models have time-major tubelets, so patch ``p`` sits at time ``p // (gh * gw)``, row
``(p // gw) % gh``. The helpers read only the backbone's ``cfg`` (token layout) and ``parameters()``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from prisma_lightning.backbones.protocol import HookedBackbone

_PACKAGE = "prisma_lightning.interp"  # its data/ folder is package data (pyproject: "data/*")


class TokenLayout(NamedTuple):
    """Where the patch tokens of a model sit in its sequence and how they tile the input."""

    n_prefix: int
    """Class token plus registers (the tokens before the patches)."""
    n_time: int
    """Time steps of tubelets (1 for image models)."""
    grid: tuple[int, int]
    """Patches per side ``(gh, gw)``."""
    tubelet_size: int
    """Frames per time step (1 for image models)."""
    has_cls: bool = True
    """Whether the first prefix token is a class token (the rest are registers)."""
    is_video: bool = False
    """Whether inputs are clips ``[B, T, C, H, W]``."""

    @property
    def n_patches(self) -> int:
        return self.n_time * self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def patch_positions(self) -> list[int]:
        """Sequence indices of the patch tokens."""
        return list(range(self.n_prefix, self.n_tokens))

    def to_grid(self, per_patch: torch.Tensor) -> torch.Tensor:
        """``[..., n_patches]`` -> ``[..., n_time, gh, gw]``."""
        if per_patch.shape[-1] != self.n_patches:
            raise ValueError(
                f"Expected {self.n_patches} patch values on the last dimension (time {self.n_time} x grid "
                f"{self.grid}), got shape {tuple(per_patch.shape)}."
            )
        return per_patch.reshape(*per_patch.shape[:-1], self.n_time, *self.grid)

    def batched(self, images: torch.Tensor) -> torch.Tensor:
        """Inputs with a batch dimension (a single image ``[C, H, W]`` or clip ``[T, C, H, W]`` gets one)."""
        return images.unsqueeze(0) if images.ndim == (4 if self.is_video else 3) else images

    def token_label(self, position: int) -> str:
        """Readable name of a sequence position: ``cls``, ``reg0``, ``(r, c)`` or ``t1 (r, c)``."""
        if position < self.n_prefix:
            if self.has_cls and position == 0:
                return "cls"
            return f"reg{position - int(self.has_cls)}"
        p = position - self.n_prefix
        gh, gw = self.grid
        t, r, c = p // (gh * gw), (p // gw) % gh, p % gw
        return f"t{t} ({r},{c})" if self.n_time > 1 else f"({r},{c})"


def token_layout(model: HookedBackbone, grid: tuple[int, int] | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of ``model`` at its native image size (or at patch ``grid``)."""
    cfg = model.cfg
    return TokenLayout(
        cfg.n_prefix_tokens,
        cfg.num_frames // cfg.tubelet_size,
        tuple(grid) if grid is not None else cfg.grid_size,
        cfg.tubelet_size,
        cfg.class_token,
        cfg.is_video,
    )


def layout_for_tokens(model: HookedBackbone, n_tokens: int) -> TokenLayout:
    """The layout of a sequence of ``n_tokens`` (square grids at other image sizes are inferred)."""
    layout = token_layout(model)
    if n_tokens == layout.n_tokens:
        return layout
    per_time = (n_tokens - layout.n_prefix) // layout.n_time
    side = int(round(per_time**0.5))
    if side * side * layout.n_time + layout.n_prefix != n_tokens:
        raise ValueError(
            f"Cannot place {n_tokens} tokens on a patch grid of this model ({layout.n_prefix} prefix tokens, "
            f"{layout.n_time} time steps); run the model at its native size {model.cfg.image_size}."
        )
    return layout._replace(grid=(side, side))


# ---------------------------------------------------------------------------------------------- inputs
def as_batch(model: HookedBackbone, images: torch.Tensor) -> torch.Tensor:
    """Add a batch dimension to a single image ``[C, H, W]`` (clip ``[T, C, H, W]``) and move it to the model."""
    param = next(model.parameters())
    single = 4 if model.cfg.is_video else 3
    if images.ndim == single:
        images = images.unsqueeze(0)
    return images.to(device=param.device, dtype=param.dtype)


def display_image(image: torch.Tensor, time: int = 0, tubelet_size: int = 1) -> Any:
    """``[C, H, W]`` (or a clip ``[T, C, H, W]``, frame ``time * tubelet_size``) -> ``[H, W, 3]`` numpy in [0, 1].

    Normalised images are min-max rescaled per image, so any preprocessing displays sensibly.
    """
    x = image.detach().float().cpu()
    if x.ndim == 4:
        x = x[min(time * tubelet_size, x.shape[0] - 1)]
    if x.ndim != 3:
        raise ValueError(f"Expected an image [C, H, W] or a clip [T, C, H, W], got shape {tuple(image.shape)}.")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] > 3:
        x = x[:3]
    lo, hi = x.min(), x.max()
    if hi > lo and (lo < 0 or hi > 1):
        x = (x - lo) / (hi - lo)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def upsample_grid(values: torch.Tensor, size: Sequence[int]) -> Any:
    """``[gh, gw]`` patch values -> ``[H, W]`` numpy (nearest neighbour: each patch stays a crisp square)."""
    v = values.detach().float().cpu()[None, None]
    return torch.nn.functional.interpolate(v, size=tuple(size), mode="nearest")[0, 0].numpy()


# ---------------------------------------------------------------------------------------------- package data
@cache
def _emoji_table() -> tuple[str, ...]:
    text = resources.files(_PACKAGE).joinpath("data").joinpath("imagenet_emoji.json").read_text(encoding="utf-8")
    table = json.loads(text)["emoji"]
    if len(table) != 1000:
        raise ValueError(f"{_PACKAGE}/data/imagenet_emoji.json has {len(table)} entries, expected 1000; reinstall.")
    return tuple(table[str(i)] for i in range(1000))


def imagenet_emoji() -> list[str]:
    """One emoji per ImageNet-1k class, in class-index order (ViT-Prisma's emoji logit lens)."""
    return list(_emoji_table())


def read_template(name: str) -> str:
    """A text file shipped in ``prisma_lightning/interp/data``."""
    return resources.files(_PACKAGE).joinpath("data").joinpath(name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- HTML output
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` element (also ``type="application/json"``).

    Non-ASCII characters, ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\uXXXX`` escapes (they can
    only occur inside JSON strings), so no text such as ``</script>`` or ``<!--<script>`` can end or re-open the
    element, and ``JSON.parse`` of the element's text gives ``value`` back.
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)  # lone surrogates become escapes too
    return _SCRIPT_UNSAFE.sub(lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every placeholder (the keys of ``values``, e.g. ``__TITLE__``) in ``template`` in a single pass.

    Substituted text is never searched again, so a value that contains a placeholder stays as it is. Values are
    inserted verbatim: escape them for their context first (:func:`html.escape`, :func:`script_json`).

    Args:
        template: the page text.
        values: placeholder -> replacement; every placeholder must occur in ``template``.
    """
    missing = [key for key in values if key not in template]
    if missing or not values:
        raise ValueError(
            f"Placeholders {missing or '(none given)'} do not occur in the template; pass the template's "
            "placeholders (or reinstall the package if its data files were changed)."
        )
    pattern = re.compile("|".join(re.escape(key) for key in sorted(values, key=len, reverse=True)))
    return pattern.sub(lambda m: values[m.group(0)], template)


# ---------------------------------------------------------------------------------------------- plotting
def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure not attached to pyplot (no global state, no GUI backend needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Any, path: str | Path, dpi: int = 120, **kwargs: Any) -> Path:
    """Save a figure of these tools atomically (a crash mid-write leaves any previous file as it was).

    Args:
        fig: a matplotlib Figure, e.g. from :func:`~prisma_lightning.interp.plot_dla`.
        path: the target file; the format comes from its suffix (``.png``, ``.pdf``, ``.svg``, ...).
        dpi: resolution of raster formats.
        kwargs: passed to ``Figure.savefig``.
    """
    from prisma_lightning.utils import save_figure_atomic

    return save_figure_atomic(fig, path, dpi=dpi, **kwargs)


_EMOJI_FONT_FILES = (
    "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",  # Debian fonts-symbola
    "/usr/share/fonts/truetype/noto/NotoEmoji-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoEmoji-VariableFont_wght.ttf",
    "C:/Windows/Fonts/seguiemj.ttf",
)
_EMOJI_FAMILIES = ("Noto Emoji", "Symbola", "Segoe UI Emoji", "Twemoji Mozilla", "OpenMoji")


class EmojiFont(NamedTuple):
    family: str
    path: str
    charmap: frozenset[int]


@cache
def emoji_font() -> EmojiFont | None:
    """A scalable font with emoji glyphs that matplotlib can draw (colour bitmap fonts cannot), or None.

    On Debian ``apt-get install fonts-symbola`` provides one.
    """
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    candidates = [f.fname for f in font_manager.fontManager.ttflist if f.name in _EMOJI_FAMILIES]
    candidates += [p for p in _EMOJI_FONT_FILES if Path(p).is_file()]
    for path in candidates:
        try:
            font_manager.fontManager.addfont(path)
            family = font_manager.FontProperties(fname=path).get_name()
            charmap = frozenset(FT2Font(path).get_charmap())
        except (RuntimeError, OSError, ValueError):
            continue
        return EmojiFont(family, path, charmap)
    return None


def drawable_emoji(emoji: str, font: EmojiFont | None) -> str | None:
    """``emoji`` without variation selectors if ``font`` has all its glyphs, else None."""
    if font is None:
        return None
    text = emoji.replace("\ufe0f", "").replace("\u200d", "")
    return text if text and all(ord(ch) in font.charmap for ch in text) else None


def warn_no_emoji_font() -> None:
    warnings.warn(
        "No emoji font that matplotlib can draw was found, so class names are shown instead of emoji. Install "
        "one (Debian: apt-get install fonts-symbola), or use the HTML output, which the browser renders.",
        stacklevel=3,
    )


def short_label(text: str, width: int = 10) -> str:
    """A class name cut to ``width`` characters for a patch cell."""
    return text if len(text) <= width else text[: width - 1] + "…"


def draw_patch_grid(ax: Axes, shape: tuple[int, int], grid: tuple[int, int], color: str = "white") -> None:
    """Thin lines between patches over an image of ``shape`` (H, W) split into ``grid`` (gh, gw)."""
    (h, w), (gh, gw) = shape, grid
    for r in range(1, gh):
        ax.axhline(r * h / gh - 0.5, color=color, lw=0.4, alpha=0.5)
    for c in range(1, gw):
        ax.axvline(c * w / gw - 0.5, color=color, lw=0.4, alpha=0.5)
