"""What the hook core asks of a model: the hook API, and the residual-stream structure a cache decomposes.

Two ``typing.Protocol`` classes, so code in this package never needs to know how a model is built:

* :class:`HookedModel` -- the hook API (:class:`~prisma_lightning.hooks.HookedModule` implements all of it):
  named hook points, aliases, scoped hooks, ``run_with_hooks`` and ``run_with_cache``.
* :class:`ResidualStreamModel` -- where a transformer's residual stream lives: which hook holds the stream
  entering each block, which hooks hold each component's write into it, the LayerNorm that reads it, and
  each attention head's write. :class:`~prisma_lightning.hooks.ActivationCache` builds ``accumulated_resid``,
  ``decompose_resid``, ``stack_head_results`` and ``apply_ln_to_stack`` from these members alone.

Layer indices follow TransformerLens: ``layer`` in ``[0, n_layers]`` names the residual stream *entering* block
``layer``; ``layer == n_layers`` is the stream after the last block. ``mlp_input=True`` moves to the point
between a block's attention and its MLP (``hook_resid_mid``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from prisma_lightning.hooks.activation_cache import ActivationCache
    from prisma_lightning.hooks.hook_point import HookPoint

ComponentKind = Literal["embed", "attn", "mlp"]


class ResidComponent(NamedTuple):
    """One write into the residual stream (see :meth:`ResidualStreamModel.resid_components`)."""

    label: str
    """Name used in stacks: ``embed``, ``{i}_attn_out``, ``{i}_mlp_out``."""
    hook_name: str
    """Hook whose activation ``[B, T, d_model]`` is exactly what this component added to the stream."""
    kind: ComponentKind
    """``embed`` (what enters block 0), ``attn`` (a token-mixing sublayer) or ``mlp`` (a per-token sublayer)."""


class ResidNorm(NamedTuple):
    """The LayerNorm reading the residual stream at some point: ``(x - mean) / scale * weight + bias``."""

    weight: torch.Tensor | None
    """``[d_model]`` (None: no weight)."""
    bias: torch.Tensor | None
    """``[d_model]`` (None: no bias)."""
    eps: float
    """Added to the variance before the square root."""
    scale_hook: str | None = None
    """Hook caching this norm's divisor ``[B, T, 1]`` (None: the scale is recomputed from the residual)."""


@runtime_checkable
class LayerCount(Protocol):
    """The one configuration value the residual-stream tools need."""

    n_layers: int
    """Number of blocks."""


@runtime_checkable
class HookedModel(Protocol):
    """The hook API: every hooked model offers it (``HookedModule`` implements it for any ``nn.Module``).

    A hook is ``fn(activation, hook=HookPoint) -> Tensor | None``; a returned tensor replaces the activation.
    Wherever a hook name is accepted, an alias (``hook_aliases``) is accepted too.
    """

    hook_dict: dict[str, HookPoint]
    """Canonical hook name -> HookPoint (the dotted module path of the point)."""
    hook_aliases: dict[str, str]
    """Alias -> canonical hook name (e.g. ViT-Prisma's ``hook_ln_final`` -> ``ln_final.hook_normalized``)."""

    def canonical_hook_name(self, name: str) -> str:
        """``name`` with an alias replaced by the canonical name it stands for (other names unchanged)."""
        ...

    def resolve_hooks(self, names: None | str | Sequence[str] | Callable[[str], bool]) -> list[HookPoint]:
        """HookPoints selected by a name, a list of names, a predicate, or None (all); ``KeyError`` naming the
        closest valid names for an unknown one."""
        ...

    def hooks(
        self, fwd_hooks: Sequence[tuple[Any, Callable[..., Any]]] = (), bwd_hooks: Sequence[Any] = (), **kwargs: Any
    ) -> AbstractContextManager[Any]:
        """Context manager adding hooks and removing exactly those on exit (also after an exception)."""
        ...

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Sequence[Any] = (), **kwargs: Any) -> Any:
        """Run the model once with temporary hooks; returns its output."""
        ...

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Run the model and return ``(output, ActivationCache)`` (``names_filter``, ``stop_at_layer``,
        ``device``, ``incl_bwd``, ``remove_batch_dim``)."""
        ...


@runtime_checkable
class ResidualStreamModel(Protocol):
    """Where a transformer's residual stream and its writers live (what ``ActivationCache`` decomposes).

    ``layer`` is in ``[0, cfg.n_layers]`` (already normalised: no negative values reach these methods).
    """

    @property
    def cfg(self) -> LayerCount:
        """Configuration with at least ``n_layers``."""
        ...

    def resid_hook_name(self, layer: int, mlp_input: bool = False) -> str:
        """Hook holding the residual stream ``[B, T, d_model]`` entering block ``layer`` (``n_layers``: after
        the last block); with ``mlp_input`` the stream entering block ``layer``'s MLP. Raises ``ValueError`` for
        a point the model does not have (an MLP input of an attention-only block)."""
        ...

    def resid_components(self, layer: int, mlp_input: bool = False) -> list[ResidComponent]:
        """Every write into the residual stream before that point, in order; their activations sum exactly to
        the residual there (the first is the ``embed`` component: what enters block 0)."""
        ...

    def resid_norm(self, layer: int, mlp_input: bool = False) -> ResidNorm | None:
        """The LayerNorm that reads the residual stream at that point (None: no LayerNorm reads it over all
        tokens, e.g. a model that normalises only after pooling)."""
        ...

    def head_results(self, layer: int, cache: Mapping[str, torch.Tensor] | ActivationCache) -> torch.Tensor:
        """Each attention head's write into the residual stream in block ``layer``, ``[(B,) T, n_heads, d_model]``,
        from the activations in ``cache`` (biases excluded: they belong to no head). Raises ``ValueError`` when the
        model has no heads and ``KeyError`` when the cache lacks what is needed."""
        ...
