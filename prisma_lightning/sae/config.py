"""`SAEConfig`: the fields every sparse autoencoder shares, and the dispatch to each architecture's own config.

Each architecture (``prisma_lightning/sae/architectures/<name>.py``) subclasses :class:`SAEConfig` with its own
documented fields (``TopKConfig.k``, ``ReLUConfig.l1_coefficient``, ...). ``SAEConfig(architecture="topk", k=16)``
returns a ``TopKConfig``; :meth:`SAEConfig.from_dict` does the same for stored dicts. Configs hold only strings,
numbers and lists, so they round-trip through JSON and show up field by field in ``prisma fit --help``
(``--model.sae.help TopKConfig``).

:class:`TranscoderConfig` adds ``d_out`` and ``skip_connection`` to any architecture's config:
``TranscoderConfig(architecture="topk", k=16, d_out=768)`` returns a ``TopKTranscoderConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch

from . import registry

Normalization = Literal["none", "expected_norm", "layer_norm", "constant_norm_rescale"]
BDecInit = Literal["zeros", "mean", "geometric_median"]
DecoderNorm = Literal["unit", "free"]
Tokens = Literal["all", "cls", "patches"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

LEGACY_FIELDS = frozenset(
    {
        "k",
        "l1_coefficient",
        "l0_coefficient",
        "jumprelu_bandwidth",
        "jumprelu_init_threshold",
        "jumprelu_sparsity_loss",
        "jumprelu_tanh_scale",
        "jumprelu_pre_act_coefficient",
        "matryoshka_prefixes",
        "aux_k",
        "aux_k_coefficient",
        "ghost_grads",
    }
)
"""Fields of the single flat config of earlier versions (every architecture's options in one class). Stored
configs (``cfg.json``, checkpoints) that carry them for an architecture that does not use them still load: they
had no effect there."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``, ``"torch.float32"`` or a ``torch.dtype`` to the ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[key]


def check_choice(field: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        close = registry.closest_names(str(value), [str(c) for c in choices])
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{field}={value!r} is not valid; choose one of {list(choices)}.{hint}")


def check_int(field: str, value: Any, minimum: int = 1) -> None:
    """``ValueError`` unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}.")


def check_number(field: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    """``ValueError`` unless ``value`` is a finite real number >= ``minimum`` (> when ``strict``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{field} must be a finite number {relation} {minimum}, got {value!r}.")


def check_types(config: Any) -> None:
    """``ValueError`` naming the field when a dataclass field's value does not match its annotation
    (int, float, bool, str, Literal choices, ``X | None``, ``list[int]``); floats must be finite."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints.get(f.name, Any)):
            expected = _describe(hints.get(f.name, Any))
            raise ValueError(f"{f.name} must be {expected}, got {value!r} ({type(value).__name__}).")


def coerce_numbers(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with number-like strings turned into numbers for numeric fields (YAML reads ``1e-5`` as text)."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        hint = hints.get(key)
        if not isinstance(value, str) or hint is None:
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for kind in (int, float):
            if kind in options:
                try:
                    out[key] = kind(value)
                    break
                except ValueError:
                    continue
    return out


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value) if args else True
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if hint is float:
        return "a finite number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return f"a {getattr(hint, '__name__', str(hint))}"


@dataclass
class SAEConfig:
    """A sparse autoencoder: width, architecture, input normalisation and provenance (fields shared by all
    architectures; each architecture's config adds its own, e.g. ``k`` or ``l1_coefficient``)."""

    d_in: int = 768
    """Width of the activations the SAE reads (the hooked model's ``d_model`` for residual hooks)."""
    d_sae: int | None = None
    """Number of dictionary features; defaults to ``d_in * expansion_factor`` (``16 * d_in`` if both are unset).
    Setting ``d_sae`` on a config that has an ``expansion_factor`` overrides it."""
    expansion_factor: int | None = None
    """Dictionary size as a multiple of ``d_in``; used when ``d_sae`` is not given."""
    architecture: str = "relu"
    """Registered architecture name (``relu``, ``topk``, ``batchtopk``, ``jumprelu``, ``gated``,
    ``matryoshka_batchtopk``, ``panneal``, ``archetypal``, ``matching_pursuit``); selects the config class."""
    l1_warmup_steps: int = 0
    """Steps over which the sparsity coefficient ramps linearly from 0 to its value; 0: no warm-up."""
    normalize_activations: Normalization = "none"
    """Input normalisation: ``expected_norm`` scales inputs by one constant so that ``E||x|| = sqrt(d_in)`` (fit
    with ``fit_normalization``; folded into the weights when saved); ``layer_norm`` standardises each token and
    un-standardises the reconstruction; ``constant_norm_rescale`` scales each token to norm ``sqrt(d_in)`` and the
    reconstruction back (SAELens / ViT-Prisma)."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the (normalised) input before encoding."""
    b_dec_init: BDecInit = "geometric_median"
    """How ``initialize_b_dec(x_sample)`` sets ``b_dec``: leave zeros, the mean, or the geometric median of the
    normalised sample."""
    decoder_norm: DecoderNorm | None = None
    """``unit`` keeps decoder rows at unit norm (the trainer projects gradients and renormalises each step);
    ``free`` leaves them free (L1-type penalties are weighted by row norms). Default: the architecture's."""
    decoder_init_norm: float | None = None
    """Norm of the decoder rows at initialisation; default 0.1 for a ``free`` decoder and 1 for ``unit``."""
    dead_feature_window: int = 1000
    """Training steps without firing after which a feature counts as dead (AuxK, ghost grads, resampling)."""
    hook_name: str = ""
    """Hook the SAE reads, e.g. ``blocks.9.hook_resid_post``."""
    hook_name_out: str | None = None
    """Hook the output is compared with, if it differs from ``hook_name`` (transcoders)."""
    tokens: Tokens = "all"
    """Which tokens the SAE is trained on: all, the class token only, or the patch tokens only."""
    model_name: str = ""
    """Name of the hooked model (provenance, e.g. ``open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K``)."""
    context_size: int | None = None
    """Tokens per image of the hooked model (SAELens' ``context_size``; provenance only)."""
    dtype: str = "float32"
    """Parameter dtype name (``float32``, ``float64``, ``float16``, ``bfloat16``)."""
    device: str = "cpu"
    """Device the parameters are created on."""
    seed: int = 42
    """Seed of the weight initialisation."""

    default_decoder_norm: ClassVar[str] = "free"
    """The architecture's ``decoder_norm`` when the field is left unset."""
    sparsity_field: ClassVar[str | None] = None
    """Name of the architecture's sparsity-coefficient field (``l1_coefficient``, ``l0_coefficient``, ...)."""
    recommended_coefficient: ClassVar[float | None] = None
    """A good first value of the sparsity coefficient on normalised activations (README table)."""

    # ------------------------------------------------------------------ construction
    def __new__(cls, *args: Any, **kwargs: Any) -> SAEConfig:
        target = cls
        if cls is SAEConfig or cls is TranscoderConfig:
            architecture = args[3] if len(args) > 3 else kwargs.get("architecture", "relu")
            target = registry.config_class(str(architecture))
            if cls is TranscoderConfig:
                target = transcoder_config_class(target)
        _check_fields(target, kwargs)
        return object.__new__(target)

    def __post_init__(self) -> None:
        check_types(self)
        expected = getattr(type(self), "architecture", None)
        if self.architecture != expected:
            raise ValueError(
                f"architecture={self.architecture!r} does not match {type(self).__name__} ({expected!r}); "
                f"use SAEConfig(architecture={self.architecture!r}, ...)."
            )
        check_int("d_in", self.d_in)
        if self.expansion_factor is not None:
            check_int("expansion_factor", self.expansion_factor)
        if self.d_sae is None:
            self.d_sae = self.d_in * (16 if self.expansion_factor is None else self.expansion_factor)
        check_int("d_sae", self.d_sae)
        if self.expansion_factor is not None and self.d_sae != self.d_in * self.expansion_factor:
            self.expansion_factor = None  # d_sae was given explicitly: it wins
        check_choice("normalize_activations", self.normalize_activations, get_args(Normalization))
        check_choice("b_dec_init", self.b_dec_init, get_args(BDecInit))
        check_choice("tokens", self.tokens, get_args(Tokens))
        check_int("l1_warmup_steps", self.l1_warmup_steps, minimum=0)
        check_int("dead_feature_window", self.dead_feature_window)
        check_int("seed", self.seed, minimum=0)
        if self.context_size is not None:
            check_int("context_size", self.context_size)
        if self.decoder_norm is None:
            self.decoder_norm = type(self).default_decoder_norm
        check_choice("decoder_norm", self.decoder_norm, get_args(DecoderNorm))
        if self.decoder_init_norm is None:
            self.decoder_init_norm = 0.1 if self.decoder_norm == "free" else 1.0
        check_number("decoder_init_norm", self.decoder_init_norm, strict=True)
        for name in ("hook_name", "model_name", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}.")
        parse_dtype(self.dtype)
        self.dtype = str(self.dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ views
    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return parse_dtype(self.dtype)

    @property
    def sparsity_coefficient(self) -> float:
        """The value of the architecture's sparsity coefficient (0 for architectures without one)."""
        field = type(self).sparsity_field
        return float(getattr(self, field)) if field else 0.0

    @property
    def hook_layer(self) -> int | None:
        """Block index parsed from ``hook_name`` (``blocks.{i}.…``), or None."""
        parts = self.hook_name.split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    def own_fields(self) -> dict[str, Any]:
        """The architecture's own fields (those the shared base does not have) and their values."""
        shared = {f.name for f in dataclasses.fields(SAEConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in shared}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with ``changes``; a changed ``architecture`` switches the config class (shared fields kept)."""
        data = self.to_dict()
        if "architecture" in changes and changes["architecture"] != self.architecture:
            shared = {f.name for f in dataclasses.fields(SAEConfig)} | transcoder_field_names()
            data = {k: v for k, v in data.items() if k in shared}
            data["decoder_norm"] = data["decoder_init_norm"] = None  # the new architecture's defaults
        data.update(changes)
        base = TranscoderConfig if isinstance(self, TranscoderConfig) else SAEConfig
        return base.from_dict(data, strict=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> SAEConfig:
        """Build a config from ``to_dict`` output (or a stored dict of an earlier version).

        The class comes from ``data["architecture"]``. Unknown keys raise ``ValueError`` listing the valid ones;
        with ``strict=False`` (stored files) keys of the earlier flat config that this architecture does not use
        are dropped (they had no effect).
        """
        if not isinstance(data, dict):
            raise ValueError(f"An SAE config must be a mapping of field -> value, got {type(data).__name__}.")
        data = dict(data)
        architecture = data.get("architecture", "relu")
        target = registry.config_class(str(architecture))
        transcoder = issubclass(cls, TranscoderConfig) or (
            cls is SAEConfig and bool(data.get("d_out")) and "skip_connection" in data
        )
        if transcoder:
            target = transcoder_config_class(target)
        elif "skip_connection" in data or "d_out" in data:
            raise ValueError(
                "This config has transcoder fields (d_out, skip_connection): load it with TranscoderConfig.from_dict."
            )
        known = {f.name for f in dataclasses.fields(target)}
        if not strict:
            data = {k: v for k, v in data.items() if k in known or k not in LEGACY_FIELDS}
        _check_fields(target, data)
        # Configs written by hand (strict) may hold numbers YAML read as text (1e-5); stored files must be exact.
        return target(**(coerce_numbers(target, data) if strict else data))


def _check_fields(target: type[SAEConfig], kwargs: dict[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(target)]
    unknown = sorted(set(kwargs) - set(known))
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = registry.closest_names(name, known, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"Unknown {target.__name__} fields {', '.join(parts)} for architecture {target.architecture!r}; "
        f"its fields: {sorted(known)}."
    )


# ---------------------------------------------------------------------------------------------------- transcoders
class TranscoderConfig(SAEConfig):
    """A transcoder: encodes the activations at ``hook_name`` and reconstructs those at ``hook_name_out``.

    ``TranscoderConfig(architecture=..., ...)`` returns the architecture's config extended with these fields:

    * ``d_out`` (int | None): width of the target activations; defaults to ``d_in``.
    * ``skip_connection`` (bool, False): add a linear skip path ``x_in @ W_skip`` (``W_skip [d_in, d_out]``,
      zero-initialised).
    * ``apply_b_dec_to_input`` (bool, False): subtract a learned input bias ``b_in [d_in]`` before encoding
      (``b_dec`` is the output bias).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out is None:  # type: ignore[has-type]
            self.d_out = self.d_in
        check_int("d_out", self.d_out)


_TRANSCODER_FIELDS: dict[str, tuple[Any, Any]] = {
    "d_out": (int | None, None),
    "skip_connection": (bool, False),
    "apply_b_dec_to_input": (bool, False),
}
_TRANSCODER_CONFIGS: dict[type, type] = {}


def transcoder_field_names() -> set[str]:
    return set(_TRANSCODER_FIELDS)


def transcoder_config_class(arch_config: type[SAEConfig]) -> type[SAEConfig]:
    """``arch_config`` extended with the transcoder fields (one class per architecture, built once)."""
    if issubclass(arch_config, TranscoderConfig):
        return arch_config
    cls = _TRANSCODER_CONFIGS.get(arch_config)
    if cls is None:
        name = arch_config.__name__.removesuffix("Config") + "TranscoderConfig"
        namespace: dict[str, Any] = {
            "__annotations__": {k: t for k, (t, _) in _TRANSCODER_FIELDS.items()},
            **{k: d for k, (_, d) in _TRANSCODER_FIELDS.items()},
            "__doc__": f"{arch_config.__doc__}\n\n{TranscoderConfig.__doc__}",
            "__module__": __name__,
            "__qualname__": name,
        }
        cls = dataclass(type(name, (arch_config, TranscoderConfig), namespace))
        _TRANSCODER_CONFIGS[arch_config] = cls
        globals()[name] = cls  # importable by name (pickling, jsonargparse class paths)
    return cls


def transcoder_config_union() -> Any:
    """``Union[...]`` of every architecture's transcoder config (the type of a transcoder entry in YAML)."""
    from typing import Union

    classes = tuple(transcoder_config_class(c) for c in registry.config_classes())
    return classes[0] if len(classes) == 1 else Union[classes]  # noqa: UP007


def __getattr__(name: str) -> Any:  # e.g. TopKTranscoderConfig, built on first use
    if name.endswith("TranscoderConfig"):
        for config in registry.config_classes():
            if config.__name__.removesuffix("Config") + "TranscoderConfig" == name:
                return transcoder_config_class(config)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
