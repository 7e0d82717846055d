"""`HookedBackbone`: the written interface between a hooked vision model and everything that consumes it.

SAE training (``SAEModule``), evaluation (``SAEEvaluator``), the density logger, the activation writer and the
interpretability tools (``prisma_lightning.interp``) use a backbone only through the members below, so any model
that provides them -- a HookedViT, or a model of another family -- plugs into all of them. ``HookedViT`` satisfies
the Protocol; ``isinstance(model, HookedBackbone)`` checks that every member is present.

What a backbone must provide
----------------------------

1. **Hooks** (:class:`~prisma_lightning.hooks.protocol.HookedModel`; subclassing
   :class:`~prisma_lightning.hooks.HookedModule` gives all of it): ``hook_dict``, ``hook_aliases``,
   ``canonical_hook_name``, ``resolve_hooks``, ``hooks()``, ``run_with_hooks``, ``run_with_cache``. A hook name
   (or an alias) is accepted wherever a name is; unknown names raise ``KeyError`` listing the closest valid ones.
2. **Forward**: ``model(inputs, stop_at_layer=None)`` on ``[B, C, H, W]`` images (``[B, T, C, H, W]`` clips for
   video) returns the model output ``[B, d_out]``; ``stop_at_layer=L`` runs only the first ``L`` blocks and returns
   the residual stream ``[B, T, d_model]``. ``forward_head`` maps the final residual stream to the output;
   ``forward_head_tokens`` reads every residual vector as if it were the pooled one (the logit lens).
3. **Hook helpers**: ``stop_layer_for(name)`` / ``stop_layer_for_all(names)`` (the smallest ``stop_at_layer``
   that still runs those hooks; None when one comes after the blocks), ``hook_width(name)`` (last dimension of
   the activation), ``example_input(batch)`` (zeros of the input shape, on the model's device and dtype),
   ``preprocess(train)`` (the transform turning a PIL image or ``[C, H, W]`` tensor into a model input).
4. **Residual stream** (:class:`~prisma_lightning.hooks.protocol.ResidualStreamModel`): ``resid_hook_name``,
   ``resid_components``, ``resid_norm``, ``head_results``. ``ActivationCache`` decomposes the residual stream
   (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``apply_ln_to_stack``) with these alone.
5. **Configuration** ``cfg`` (:class:`BackboneConfig`): sizes, token layout and head kind.
6. **torch.nn.Module basics**: ``parameters()``, ``to()``, ``eval()``, ``requires_grad_()``.

Conventions every backbone keeps
--------------------------------

* **Token order** in ``T``: the class token (if ``cfg.class_token``), other prefix tokens (registers), then the
  patches -- row-major, time-major for video tubelets. ``cfg.n_prefix_tokens`` counts the tokens before the
  patches; token-selecting code (``tokens='cls' | 'patches'``) relies on it.
* **Hook names** follow TransformerLens: ``blocks.{i}.hook_resid_pre`` / ``hook_resid_post`` ``[B, T, d_model]``
  for each block ``i``, so ``stop_layer_for`` can parse the block index, and the attention tools read
  ``blocks.{i}.attn.hook_pattern [B, h, T, T]`` on models that have attention. Any other hook a model offers is
  usable by name (SAE configs name their hook).
* **Frozen use**: consumers call ``eval().requires_grad_(False)`` and run under ``torch.no_grad()``; a backbone
  must not keep state between forward passes.

Tools that need more than this Protocol say so and take a :class:`~prisma_lightning.backbones.HookedViT`: direct
logit attribution (``interp.attribution``, which pulls the logit back through the weights of every head, norm and
pool) and the weight views (``W_Q``, ``W_O``, ``OV``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prisma_lightning.hooks.protocol import HookedModel, ResidualStreamModel


@runtime_checkable
class BackboneConfig(Protocol):
    """What consumers read off ``backbone.cfg`` (``HookedViTConfig`` satisfies it)."""

    model_name: str
    """Name of the source checkpoint (provenance: SAE files and shard indexes record it)."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of blocks."""
    n_heads: int
    """Attention heads per block (attention tools only)."""
    image_size: tuple[int, int]
    """Native input size ``(H, W)``."""
    patch_size: tuple[int, int]
    """Patch size ``(ph, pw)``: pixels of the input behind one patch token."""
    in_channels: int
    """Input channels."""
    num_frames: int
    """Frames per clip (1 for image models)."""
    tubelet_size: int
    """Frames per patch token (1 for image models)."""
    class_token: bool
    """Whether token 0 is a class token (``tokens='cls'`` needs it)."""
    attn_only: bool
    """Whether blocks lack an MLP (then there is no ``hook_resid_mid`` to read)."""
    head: str
    """Output head: ``classifier`` (class logits), ``projection`` (an embedding, e.g. CLIP) or ``none``."""
    head_act: str
    """Activation after the head: ``none`` (a linear read-out) or ``tanh``."""

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patches (class token plus registers)."""
        ...

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per side ``(gh, gw)`` at ``image_size``."""
        ...

    @property
    def n_patches(self) -> int:
        """Patch tokens at ``image_size`` (``n_time * gh * gw``)."""
        ...

    @property
    def n_tokens(self) -> int:
        """Sequence length ``T = n_prefix_tokens + n_patches`` at ``image_size``."""
        ...

    @property
    def is_video(self) -> bool:
        """Whether inputs are clips ``[B, T, C, H, W]``."""
        ...

    @property
    def d_out(self) -> int:
        """Width of the model's output ``[B, d_out]``."""
        ...


@runtime_checkable
class HookedBackbone(HookedModel, ResidualStreamModel, Protocol):
    """A hooked vision model as its consumers see it; see the module docstring for the contract."""

    @property
    def cfg(self) -> BackboneConfig:
        """Sizes, token layout and head kind."""
        ...

    def __call__(self, inputs: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
        """``[B, C, H, W]`` (``[B, T, C, H, W]``) -> output ``[B, d_out]``; with ``stop_at_layer=L`` the residual
        stream ``[B, T, d_model]`` after the first ``L`` blocks."""
        ...

    def forward_head(self, resid: torch.Tensor) -> torch.Tensor:
        """The final residual stream ``[B, T, d_model]`` -> the model output ``[B, d_out]`` (what ``__call__`` does
        after the last block)."""
        ...

    def forward_head_tokens(self, resid: torch.Tensor) -> torch.Tensor:
        """Residual vectors ``[..., d_model]`` -> ``[..., d_out]``, each read as if it were the pooled token (the
        per-token logit lens; at the last layer the class token's reading is the output of a class-token model)."""
        ...

    def stop_layer_for(self, hook_name: str) -> int | None:
        """The smallest ``stop_at_layer`` that still runs ``hook_name`` (None: it runs after the blocks)."""
        ...

    def stop_layer_for_all(self, hook_names: Sequence[str]) -> int | None:
        """``stop_at_layer`` that runs every hook in ``hook_names`` (None if one runs after the blocks)."""
        ...

    def hook_width(self, hook_name: str) -> int:
        """Last-dimension width of ``hook_name``'s activation (``KeyError`` for an unknown name)."""
        ...

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros ``[batch, C, H, W]`` (``[batch, T, C, H, W]``) on the model's device and dtype."""
        ...

    def preprocess(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        """Transform: a PIL image or ``[C, H, W]`` tensor (a ``[T, C, H, W]`` clip) -> one model input."""
        ...

    # torch.nn.Module members the consumers use
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def requires_grad_(self, requires_grad: bool = True) -> Any: ...


__all__ = ["BackboneConfig", "HookedBackbone"]
