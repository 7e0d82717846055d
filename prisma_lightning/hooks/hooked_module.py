"""`HookedModule`: the base class of every hooked model (hook registry, scoped hooks, caching)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from prisma_lightning.hooks.activation_cache import ActivationCache
from prisma_lightning.hooks.hook_point import HookFn, HookHandle, HookPoint

NamesFilter = None | str | Sequence[str] | Callable[[str], bool]
"""Which hooks to cache: None (all), one name, a list of names, or a predicate on the name."""

HookSpec = tuple[str | Callable[[str], bool], HookFn]


class HookedModule(nn.Module):
    """Base class: subclasses build their HookPoints in ``__init__`` and then call ``setup_hooks()``.

    All temporary hooks go through :meth:`hooks` (a context manager that removes exactly the hooks it added,
    also when the body raises), so nested contexts and permanent hooks never interfere.
    """

    hook_dict: dict[str, HookPoint]
    hook_aliases: dict[str, str]

    def setup_hooks(self, aliases: Mapping[str, str] | None = None) -> None:
        """Name every HookPoint after its dotted module path and index them in ``hook_dict``.

        Args:
            aliases: other names for some hooks, ``{alias: canonical name}`` (e.g. another library's names, so
                its configs work unchanged). An alias is accepted wherever a hook name is, and a cache holding
                the canonical hook answers to the alias too.
        """
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self.hook_aliases = {}
        for alias, target in (aliases or {}).items():
            if alias in self.hook_dict:
                raise ValueError(f"Hook alias {alias!r} is already the name of a hook point; pick another alias.")
            if target not in self.hook_dict:
                raise ValueError(
                    f"Hook alias {alias!r} points to {target!r}, which is not a hook of {type(self).__name__}; "
                    "alias an existing hook point."
                )
            self.hook_aliases[alias] = target
        self._context_level = 0

    def hook_points(self) -> Iterable[HookPoint]:
        return self.hook_dict.values()

    # ------------------------------------------------------------------ name resolution
    def canonical_hook_name(self, name: str) -> str:
        """``name`` with an alias replaced by the hook name it stands for (any other name is returned unchanged)."""
        return getattr(self, "hook_aliases", {}).get(name, name)

    def _unknown_hook(self, name: str) -> KeyError:
        valid = [*self.hook_dict, *getattr(self, "hook_aliases", {})]
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
        hint = f" Closest valid names: {close}." if close else ""
        return KeyError(
            f"Unknown hook name {name!r} on {type(self).__name__} ({len(self.hook_dict)} hooks).{hint} "
            "List them all with `list(model.hook_dict)` (aliases: `model.hook_aliases`)."
        )

    def _point(self, name: str) -> HookPoint:
        point = self.hook_dict.get(self.canonical_hook_name(name))
        if point is None:
            raise self._unknown_hook(name)
        return point

    def resolve_hooks(self, names: NamesFilter) -> list[HookPoint]:
        """HookPoints selected by a name, a list of names, a predicate, or None (all of them).

        Aliases count as names: a predicate selects a point when it accepts its name or any of its aliases.
        Each point is returned once, in the order first selected.
        """
        if names is None:
            return list(self.hook_dict.values())
        if isinstance(names, str):
            return [self._point(names)]
        if callable(names):
            aliases_of: dict[str, list[str]] = {}
            for alias, target in getattr(self, "hook_aliases", {}).items():
                aliases_of.setdefault(target, []).append(alias)
            return [
                hp
                for name, hp in self.hook_dict.items()
                if names(name) or any(names(alias) for alias in aliases_of.get(name, ()))
            ]
        points: dict[str, HookPoint] = {}
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"Hook names must be strings, got {type(name).__name__} ({name!r}).")
            point = self._point(name)
            points.setdefault(point.name, point)
        return list(points.values())

    # ------------------------------------------------------------------ adding and removing hooks
    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: HookFn,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> list[HookHandle]:
        """Attach ``hook`` to one named HookPoint, or to every point whose name satisfies a predicate."""
        return [
            hp.add_hook(hook, dir=dir, is_permanent=is_permanent, prepend=prepend, context_level=None)
            for hp in self.resolve_hooks(name)
        ]

    def add_perma_hook(
        self, name: str | Callable[[str], bool], hook: HookFn, dir: Literal["fwd", "bwd"] = "fwd"
    ) -> list[HookHandle]:
        """A hook that survives :meth:`reset_hooks` and the end of every context (until removed explicitly)."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(
        self,
        including_permanent: bool = False,
        direction: Literal["fwd", "bwd", "both"] = "both",
        clear_contexts: bool = True,
    ) -> None:
        """Remove every temporary hook (and permanent ones when asked) from every HookPoint."""
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent)
            if clear_contexts:
                hp.clear_context()

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        keep_bwd_hooks: bool = False,
        prepend: bool = False,
    ) -> Iterator[HookedModule]:
        """Context manager that adds hooks and removes exactly those hooks on exit, even after an exception.

        ``keep_bwd_hooks=True`` lets backward hooks already attached to this context's forward graphs still
        fire on a ``backward()`` called after the context has closed (they fire once, then are gone).
        """
        handles: list[HookHandle] = []
        try:
            for name, fn in fwd_hooks:
                handles += self.add_hook(name, fn, dir="fwd", prepend=prepend)
            for name, fn in bwd_hooks:
                handles += self.add_hook(name, fn, dir="bwd", prepend=prepend)
            yield self
        finally:
            if reset_hooks_end:
                for handle in handles:
                    handle.remove(keep_pending_grad=keep_bwd_hooks)
            if clear_contexts:
                for hp in self.hook_dict.values():
                    hp.clear_context()

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[HookSpec] = (),
        bwd_hooks: Sequence[HookSpec] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model once with temporary hooks. Backward hooks stay armed for one ``backward()`` call."""
        with self.hooks(
            fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, keep_bwd_hooks=True
        ):
            return self(*model_args, **model_kwargs)

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[HookSpec], list[HookSpec]]:
        """Hooks that write activations (and ``<name>_grad`` gradients) into ``cache``."""
        cache = {} if cache is None else cache
        points = self.resolve_hooks(names_filter)

        def save(tensor: torch.Tensor, hook: HookPoint, suffix: str = "") -> None:
            value = tensor.detach()
            if device is not None:
                value = value.to(device)
            if remove_batch_dim:
                value = value[0]
            cache[hook.name + suffix] = value

        def save_grad(tensor: torch.Tensor, hook: HookPoint) -> None:
            save(tensor, hook, "_grad")

        fwd = [(hp.name, save) for hp in points]
        bwd = [(hp.name, save_grad) for hp in points] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        stop_at_layer: int | None = None,
        device: str | torch.device | None = None,
        incl_bwd: bool = False,
        remove_batch_dim: bool = False,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run the model and return ``(output, ActivationCache)`` of the selected hooks.

        ``stop_at_layer=L`` runs only ``blocks[:L]`` and returns the residual stream there. With ``incl_bwd``
        the cache also collects ``<name>_grad`` entries: immediately when the output is a scalar (its
        ``backward()`` is called here), otherwise when you call ``backward()`` on anything computed from it.
        """
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd=incl_bwd, device=device, remove_batch_dim=remove_batch_dim
        )
        if stop_at_layer is not None:
            self._check_accepts_stop_at_layer()
            model_kwargs["stop_at_layer"] = stop_at_layer
        with self.hooks(fwd, bwd, keep_bwd_hooks=incl_bwd):
            out = self(*model_args, **model_kwargs)
            if incl_bwd and isinstance(out, torch.Tensor) and out.numel() == 1 and out.requires_grad:
                out.backward()
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def _check_accepts_stop_at_layer(self) -> None:
        if "stop_at_layer" not in inspect.signature(self.forward).parameters:
            raise TypeError(f"{type(self).__name__}.forward does not take stop_at_layer, so it cannot stop early.")
