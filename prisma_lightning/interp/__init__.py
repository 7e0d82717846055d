"""Interpretability tools for HookedViT: logit lens, direct logit attribution, activation patching, attention
visualisation and SAE analysis (splicing, steering, max-activating images).

Plots are matplotlib ``Figure`` objects built without pyplot (save them atomically with :func:`save_figure`); the
attention viewer and the emoji lens also write standalone HTML (:func:`save_attention_html`,
:func:`save_emoji_logit_lens_html`). Every file is written atomically. matplotlib is imported only when a plot is
made.
"""

from __future__ import annotations

from prisma_lightning.interp._common import TokenLayout, imagenet_emoji, save_figure, token_layout
from prisma_lightning.interp.attention_viz import (
    attention_html,
    attention_patterns,
    plot_attention_heads,
    save_attention_html,
)
from prisma_lightning.interp.attribution import DirectLogitAttribution, direct_logit_attribution, plot_dla
from prisma_lightning.interp.logit_lens import (
    LogitLens,
    emoji_logit_lens_html,
    logit_lens,
    plot_emoji_logit_lens,
    plot_logit_lens_grid,
    plot_logit_lens_heatmap,
    save_emoji_logit_lens_html,
    unembed_pooled,
    unembed_tokens,
)
from prisma_lightning.interp.patching import LogitDiff, PatchingResult, activation_patching, plot_patching
from prisma_lightning.interp.sae_tools import (
    TopActivating,
    feature_steering,
    plot_top_activating,
    save_top_activating,
    splice_hooks,
    splice_saes,
    top_activating,
)

__all__ = [
    "DirectLogitAttribution",
    "LogitDiff",
    "LogitLens",
    "PatchingResult",
    "TokenLayout",
    "TopActivating",
    "activation_patching",
    "attention_html",
    "attention_patterns",
    "direct_logit_attribution",
    "emoji_logit_lens_html",
    "feature_steering",
    "imagenet_emoji",
    "logit_lens",
    "plot_attention_heads",
    "plot_dla",
    "plot_emoji_logit_lens",
    "plot_logit_lens_grid",
    "plot_logit_lens_heatmap",
    "plot_patching",
    "plot_top_activating",
    "save_attention_html",
    "save_emoji_logit_lens_html",
    "save_figure",
    "save_top_activating",
    "splice_hooks",
    "splice_saes",
    "token_layout",
    "top_activating",
    "unembed_pooled",
    "unembed_tokens",
]
