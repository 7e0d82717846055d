"""The architecture registry: one name -> one :class:`SparseAutoencoder` subclass with its own config dataclass.

An architecture is one file under ``prisma_lightning/sae/architectures/``: a config dataclass (a subclass of
:class:`~prisma_lightning.sae.config.SAEConfig` whose ``architecture`` field is ``Literal["<name>"]``) and a module
class (a subclass of :class:`~prisma_lightning.sae.SparseAutoencoder` with ``config_class`` set to it), registered
with the :func:`register_architecture` decorator -- as SAELens registers SAE classes and timm registers models.
Nothing outside an architecture's own file tests its name: everything else asks the registry or the class.

A user's own architecture registers the same way (import its module before building or loading it)::

    @register_architecture
    class MySAE(SparseAutoencoder):
        config_class = MyConfig
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .config import SAEConfig
    from .sparse_autoencoder import SparseAutoencoder

_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}


def register_architecture(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Class decorator: register ``cls`` under the name its config class declares (``architecture`` default)."""
    config_class = getattr(cls, "config_class", None)
    name = getattr(config_class, "architecture", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{cls.__name__}.config_class must be an SAEConfig subclass whose `architecture` field has a default "
            "(its registered name), e.g. `architecture: Literal['mine'] = 'mine'`."
        )
    existing = _ARCHITECTURES.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"Architecture {name!r} is already registered by {existing.__module__}.{existing.__name__}.")
    cls.architecture = name
    _ARCHITECTURES[name] = cls
    return cls


def architecture_names() -> tuple[str, ...]:
    """Registered architecture names, in registration order."""
    return tuple(_ARCHITECTURES)


def closest_names(name: str, choices: list[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """The valid names closest to a mistyped ``name`` (for "did you mean" messages)."""
    return difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)


def unknown_architecture_message(name: Any) -> str:
    names = architecture_names()
    close = closest_names(str(name), names)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"architecture={name!r} is not valid; choose one of {list(names)}.{hint}"


def architecture_class(name: str) -> type[SparseAutoencoder]:
    """The module class registered as ``name``; ``ValueError`` listing the valid names (and the closest) if none."""
    _ensure_builtins()
    cls = _ARCHITECTURES.get(name)
    if cls is None:
        raise ValueError(unknown_architecture_message(name))
    return cls


def config_class(name: str) -> type[SAEConfig]:
    """The config dataclass of architecture ``name``."""
    return architecture_class(name).config_class


def config_classes() -> tuple[type[SAEConfig], ...]:
    """Every registered architecture's config dataclass, in registration order."""
    _ensure_builtins()
    return tuple(cls.config_class for cls in _ARCHITECTURES.values())


def config_union() -> Any:
    """``Union[...]`` of every registered config dataclass: the type of an ``sae:`` entry in YAML / on the CLI.

    jsonargparse picks the member whose ``architecture`` literal matches, so ``{architecture: topk, k: 16}`` becomes
    a ``TopKConfig`` and ``--model.sae.help TopKConfig`` shows its documented fields.
    """
    classes = config_classes()
    return classes[0] if len(classes) == 1 else Union[classes]  # noqa: UP007 (a runtime-built union)


def saelens_class(saelens_name: str) -> type[SparseAutoencoder] | None:
    """The architecture that reads SAELens's architecture name ``saelens_name`` (``standard``, ``topk``, ...)."""
    _ensure_builtins()
    for cls in _ARCHITECTURES.values():
        if saelens_name in cls.saelens_names:
            return cls
    return None


def saelens_names() -> list[str]:
    """Every SAELens architecture name some registered architecture reads."""
    _ensure_builtins()
    return sorted({n for cls in _ARCHITECTURES.values() for n in cls.saelens_names})


def _ensure_builtins() -> None:
    if not _ARCHITECTURES or "relu" not in _ARCHITECTURES:
        from . import architectures  # noqa: F401  (registers the built-in architectures)
