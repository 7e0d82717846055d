"""`HookPoint`: an identity module that marks a named activation a user can read or replace.

Forward hooks are ordinary ``nn.Module`` forward hooks; backward hooks are tensor hooks attached to the
activation during the forward pass, so they fire exactly once, when ``backward()`` reaches that activation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

HookFn = Callable[..., Any]
"""A hook is ``fn(tensor, hook=HookPoint) -> tensor | None``; a returned tensor replaces the activation."""


@dataclass(eq=False)
class HookHandle:
    """One hook added to a HookPoint; ``remove()`` takes it off again (idempotent)."""

    hook_point: HookPoint
    fn: HookFn
    direction: Literal["fwd", "bwd"]
    is_permanent: bool = False
    context_level: int | None = None
    active: bool = True
    _torch_handle: Any = field(default=None, repr=False)

    def remove(self, keep_pending_grad: bool = False) -> None:
        """Detach the hook from future forward passes.

        A backward hook already attached to a live graph is disabled too, unless ``keep_pending_grad``: then it
        still fires once when ``backward()`` reaches that activation (how a cache collects gradients after the
        forward pass's context has closed).
        """
        if not (keep_pending_grad and self.direction == "bwd"):
            self.active = False
        if self._torch_handle is not None:
            self._torch_handle.remove()
            self._torch_handle = None
        handles = self.hook_point._handles
        if self in handles:
            handles.remove(self)


class HookPoint(nn.Module):
    """Identity module; the parent `HookedModule` gives it its dotted ``name`` in ``setup_hooks()``.

    ``ctx`` is a scratch dict a hook may use to keep state between calls (cleared by ``clear_context``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.ctx: dict[str, Any] = {}
        self._handles: list[HookHandle] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def has_hooks(self) -> bool:
        """True when any forward or backward hook is attached (models use it to pick slow exact paths)."""
        return bool(self._handles)

    def layer(self) -> int:
        """Block index parsed from the name (``blocks.3.attn.hook_q`` -> 3)."""
        if self.name is None:
            raise ValueError("This HookPoint has no name; call setup_hooks() on the parent HookedModule first.")
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"Hook {self.name!r} is not inside a block, so it has no layer index.")
        return int(parts[1])

    def add_hook(
        self,
        fn: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
        context_level: int | None = None,
    ) -> HookHandle:
        """Attach ``fn(activation, hook=self)``; ``prepend=True`` runs it before the hooks already there."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}.")
        handle = HookHandle(self, fn, dir, is_permanent=is_permanent, context_level=context_level)
        if dir == "fwd":

            def _fwd(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
                return fn(output, hook=self)

            handle._torch_handle = self.register_forward_hook(_fwd, prepend=prepend)
        else:

            def _attach_grad_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                if not output.requires_grad:
                    return None

                def _on_grad(grad: torch.Tensor) -> torch.Tensor | None:
                    # A handle removed after the forward pass must not fire on a later backward().
                    return fn(grad, hook=self) if handle.active else None

                output.register_hook(_on_grad)
                return None

            # Backward hooks go last among forward hooks so they see the activation other hooks produced.
            handle._torch_handle = self.register_forward_hook(_attach_grad_hook, prepend=prepend)
        if prepend:
            self._handles.insert(0, handle)
        else:
            self._handles.append(handle)
        return handle

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False) -> None:
        """Remove this point's hooks in one direction (temporary ones only unless ``including_permanent``)."""
        for handle in list(self._handles):
            if dir != "both" and handle.direction != dir:
                continue
            if handle.is_permanent and not including_permanent:
                continue
            handle.remove()

    def clear_context(self) -> None:
        self.ctx = {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, hooks={len(self._handles)}"
