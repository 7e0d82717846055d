"""Token selection: which positions of a ``[B, T, d]`` activation become SAE training rows."""

from __future__ import annotations

from typing import Literal

import torch

Tokens = Literal["all", "cls", "patches"]


def select_tokens(acts: torch.Tensor, tokens: Tokens, n_prefix: int, has_cls: bool = True) -> torch.Tensor:
    """``[B, T, d]`` -> ``[N, d]`` rows, image-major.

    ``cls``: exactly one row per image (the class token). ``patches``: the patch / tubelet tokens, without the
    class token and registers (``n_prefix`` of them). ``all``: every token. A ``[B, d]`` input (a pooled hook)
    is returned as is for ``all``/``cls``.
    """
    if acts.ndim == 2:
        if tokens == "patches":
            raise ValueError("tokens='patches' needs a per-token hook [B, T, d]; this hook is pooled [B, d].")
        return acts
    if acts.ndim != 3:
        raise ValueError(f"Expected activations [B, T, d] or [B, d], got shape {tuple(acts.shape)}.")
    if tokens == "cls":
        if not has_cls:
            raise ValueError("tokens='cls' needs a model with a class token; use 'all' or 'patches'.")
        return acts[:, 0]
    if tokens == "patches":
        return acts[:, n_prefix:].reshape(-1, acts.shape[-1])
    if tokens == "all":
        return acts.reshape(-1, acts.shape[-1])
    raise ValueError(f"tokens must be 'all', 'cls' or 'patches', got {tokens!r}.")


def tokens_per_image(n_tokens: int, tokens: Tokens, n_prefix: int) -> int:
    """Rows one image contributes for a sequence of ``n_tokens``."""
    return {"all": n_tokens, "cls": 1, "patches": n_tokens - n_prefix}[tokens]
