"""Read tensors out of a PyTorch pickle (``torch.save``) without running any code from the file.

ViT-Prisma's SAE trainer saves ``n_images_<N>.pt`` as ``torch.save({"state_dict": ..., "cfg": runner_config})``:
the runner config is a pickled object of ViT-Prisma's own class, so ``torch.load(weights_only=True)`` refuses the
file, and ``weights_only=False`` would import ViT-Prisma and run whatever the pickle names. This reader is the third
way: a restricted unpickler that

* rebuilds tensors and the plain containers ``torch.save`` uses (a short list of torch's tensor-rebuild functions,
  storages, dtypes, ``OrderedDict``, ``set``...), and
* turns every other global the pickle names (classes, functions -- ``os.system`` included) into an :class:`Inert`
  placeholder: "calling" it or building it only records the arguments and state as plain data. Nothing from the
  file is imported or executed.

So the state dict is recovered exactly, and the runner config comes back as inert data (its fields readable through
:meth:`Inert.fields`).
"""

from __future__ import annotations

import importlib
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_ALLOWED_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch.serialization", "_get_layout"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("builtins", "slice"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.nn.parameter", "Parameter"),
    ("torch.storage", "TypedStorage"),
    ("torch.storage", "UntypedStorage"),
}


class Inert:
    """Placeholder for an object of a class (or a call of a function) named in a pickle; holds plain data only.

    ``qualname`` is the ``module.name`` the file referred to; ``args`` / ``kwargs`` what it would have been called
    with, ``state`` what would have been set on it.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a placeholder dict subclass
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def append(self, value: Any) -> None:  # APPENDS on a placeholder list subclass
        self.args = (*self.args, value)

    def extend(self, values: Any) -> None:
        self.args = (*self.args, *values)

    def fields(self) -> dict[str, Any]:
        """The recorded attributes: the pickled ``__dict__`` state (dataclasses, plain objects) and keyword args."""
        data: dict[str, Any] = {}
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            data.update(state)
        data.update(self.kwargs)
        return data

    def __repr__(self) -> str:
        return f"Inert({self.qualname})"


_PLACEHOLDERS: dict[str, type[Inert]] = {}


def _placeholder(module: str, name: str) -> type[Inert]:
    key = f"{module}.{name}"
    cls = _PLACEHOLDERS.get(key)
    if cls is None:
        cls = type(f"Inert_{name}", (Inert,), {"qualname": key, "__module__": __name__})
        _PLACEHOLDERS[key] = cls
    return cls


def _allowed(module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_FUNCTIONS:
        return getattr(importlib.import_module(module), name)  # torch / standard-library modules only
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
        if name.endswith("Storage") and isinstance(value, type):  # legacy typed storages (torch.FloatStorage, ...)
            return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the tensor-rebuilding globals; everything else is :class:`Inert`."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed(module, name)
        return allowed if allowed is not None else _placeholder(module, name)


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=RestrictedUnpickler, load=_load, __name__="prisma_lightning_restricted_pickle"
)


def read_pickle(path: str | Path) -> Any:
    """The object ``torch.save`` wrote to ``path``, with tensors rebuilt and every other class or function inert."""
    path = Path(path)
    try:
        # Safe: the restricted unpickler resolves no global beyond tensor rebuilding (see the module docstring).
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}).") from err


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a ``torch.save`` checkpoint: under ``state_dict`` / ``model_state_dict`` or top level."""
    data = read_pickle(path)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if isinstance(data, Inert):
        data = data.fields()
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a dict of tensors (optionally under 'state_dict'), got {type(data).__name__}."
        )
    tensors = {str(k): v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (found keys {sorted(map(str, data))}).")
    return tensors


def read_config(path: str | Path) -> dict[str, Any] | None:
    """The fields of a pickled config object stored beside the tensors (``cfg`` / ``config``), if any."""
    data = read_pickle(path)
    if not isinstance(data, dict):
        return None
    for key in ("cfg", "config"):
        value = data.get(key)
        if isinstance(value, Inert):
            return value.fields()
        if isinstance(value, dict):
            return dict(value)
    return None
