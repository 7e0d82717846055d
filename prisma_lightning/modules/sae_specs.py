"""What SAEs one run trains: a template SAE config expanded over hook patterns, a sweep grid and explicit entries.

``SAEModule`` takes

* ``sae``: one SAE config (the template), or the folder / Hugging Face repo of a trained SAE (a folder holding SAE
  folders loads them all);
* ``hooks``: hook-name patterns, each expanded like a shell brace: ``blocks.{0..11}.hook_resid_post``,
  ``blocks.{3,7}.hook_{resid_post,mlp_out}``; one SAE per hook;
* ``sweep``: ``{field: [values]}``, the grid of every combination; fields are SAE config fields (``k``,
  ``l1_coefficient``, ...) or per-SAE training options (``lr``, ``lr_warmup_steps``, ...);
* ``saes``: explicit entries, each a mapping of fields over the template (plus ``name``, training options, or
  ``path`` of a trained SAE);
* ``hook_overrides``: ``{hook: {field: value}}``, fields set for every SAE on that hook (a different coefficient for
  a few layers of an all-layers run).

The result is a list of :class:`SAESpec`, in order: entries x hooks x sweep. Names are unique, readable and safe
as folder and log names (``blocks_9_hook_resid_post__k64__lr0p0004``); an entry's ``name`` is kept as given.
Every problem is reported with the entry it comes from (``saes[3]``, ``sweep.k``) and what to do.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prisma_lightning.sae import SAEConfig, SparseAutoencoder, TranscoderConfig
from prisma_lightning.sae.registry import closest_names

TRAINING_FIELDS: dict[str, str] = {
    "lr": "peak Adam learning rate",
    "betas": "Adam betas",
    "lr_warmup_steps": "linear learning-rate warm-up steps",
    "lr_decay": "none | cosine | linear",
    "lr_decay_steps": "length of the decay",
    "min_lr_ratio": "final learning rate as a fraction of lr",
    "max_grad_norm": "gradient-norm clipping (per SAE)",
}
"""Per-SAE training options an entry or a sweep may set (the module's arguments of the same names are defaults)."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class SAESpec:
    """One SAE of a run: its name, its config or trained source, and its training options."""

    name: str
    config: SAEConfig | None = None
    """The config of a new SAE (None when ``source`` or ``sae`` is given)."""
    source: str | None = None
    """Folder or Hugging Face repo of a trained SAE (evaluation, fine-tuning); never written to."""
    sae: SparseAutoencoder | None = None
    """An SAE object passed in code."""
    training: dict[str, Any] = field(default_factory=dict)
    """Per-SAE overrides of the module's training options (``lr``, ...)."""
    where: str = "sae"
    """Where in the module's arguments this SAE was defined (for error messages)."""


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a{0..2}b`` -> ``a0b a1b a2b``; ``x{p,q}`` -> ``xp xq``; nested and repeated."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(
                f"Hook pattern {pattern!r} has an unclosed brace; braces must hold a range like {{0..11}} or a list "
                "like {resid_post,mlp_out}."
            )
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"\s*(-?\d+)\.\.(-?\d+)\s*", body)
    if numeric:
        a, b = int(numeric.group(1)), int(numeric.group(2))
        step = 1 if b >= a else -1
        options = [str(i) for i in range(a, b + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(
            f"Hook pattern {pattern!r}: the braces {{{body}}} must hold a range like {{0..11}} or a list like "
            "{resid_post,mlp_out}."
        )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for option in options for out in expand_braces(head + option + tail)]


def safe_name(text: str) -> str:
    """``text`` as a folder / log / module name: letters, digits, ``_`` and ``-`` (dots become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return name or "sae"


def _value_tag(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        text = "-".join(_value_tag(v) for v in value)
    else:
        text = str(value)
    return text.replace(".", "p").replace("+", "")


def _config_dict(sae: Any, where: str) -> dict[str, Any]:
    if isinstance(sae, SAEConfig):
        return sae.to_dict()
    if isinstance(sae, dict):
        return dict(sae)
    raise ValueError(f"{where} must be an SAE config (a mapping of its fields), got {type(sae).__name__}.")


def _split_fields(entry: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(config fields, training options, name) of an entry."""
    config, training, name = {}, {}, None
    for key, value in entry.items():
        if key == "name":
            name = value
        elif key in TRAINING_FIELDS:
            training[key] = value
        else:
            config[key] = value
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
        raise ValueError(
            f"{where}: name={name!r} must be a non-empty string of letters, digits, '_' and '-' (it names the SAE's "
            "folder and its logs)."
        )
    return config, training, name


def _check_training(training: dict[str, Any], where: str) -> None:
    for key, value in training.items():
        if key == "lr":
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
                raise ValueError(f"{where}: lr={value!r} must be a positive finite number, e.g. 4e-4.")
        elif key == "lr_decay" and value not in ("none", "cosine", "linear"):
            raise ValueError(f"{where}: lr_decay={value!r} must be 'none', 'cosine' or 'linear'.")


def load_trained(source: str) -> list[tuple[str, SparseAutoencoder]]:
    """The SAEs in ``source``: one SAE folder (or Hub repo), or a folder whose subfolders are SAE folders."""
    from prisma_lightning.sae.io import CFG_FILE, WEIGHTS_FILE
    from prisma_lightning.utils import looks_local

    path = Path(source)
    if path.is_dir() and not (path / CFG_FILE).is_file() and not list(path.glob("*.pt")):
        children = sorted(p for p in path.iterdir() if (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())
        if children:
            return [(safe_name(p.name), SparseAutoencoder.load(p)) for p in children]
    if path.exists():
        return [("sae", SparseAutoencoder.load(path))]
    if looks_local(source):
        raise FileNotFoundError(
            f"No SAE at {source!r}: the path does not exist (relative paths are relative to the current directory "
            f"{Path.cwd()}). Pass the folder written by training (e.g. runs/quickstart/lightning_logs/version_0/sae)."
        )
    return [("sae", SparseAutoencoder.from_pretrained(source))]


def expand_specs(
    sae: Any = None,
    saes: list[dict[str, Any]] | None = None,
    hooks: str | list[str] | None = None,
    sweep: dict[str, list[Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    transcoder: bool = False,
    hook_overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[SAESpec], bool]:
    """The SAEs of a run, and whether it is the single-SAE case (``sae`` alone: legacy names and folders).

    ``overrides`` are config fields applied to every new SAE (the module's ``hook_name`` / ``tokens`` /
    ``l1_warmup_steps`` arguments).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    hook_overrides = dict(hook_overrides or {})
    for hook, fields in hook_overrides.items():
        if not isinstance(fields, dict):
            raise ValueError(f"hook_overrides[{hook!r}] must be a mapping of fields, e.g. {{l1_coefficient: 5e-5}}.")
    single = not saes and not hooks and not sweep
    if sae is None and not saes:
        raise ValueError(
            "No SAE to train: give `sae` (a config such as {architecture: topk, d_in: 768, k: 32, hook_name: ...}, "
            "or the folder of a trained SAE) and/or `saes` (a list of entries)."
        )
    if isinstance(sae, SparseAutoencoder):
        if not single:
            raise ValueError("An SAE object cannot be combined with `saes`, `hooks` or `sweep`; pass configs instead.")
        _check_overrides_match(sae.cfg, overrides, "sae")
        return [SAESpec(name="sae", sae=sae, where="sae")], True
    if isinstance(sae, str):
        if not single:
            raise ValueError(
                "A trained SAE (`sae` as a path or repo) cannot be combined with `saes`, `hooks` or `sweep`; list "
                "trained SAEs as saes: [{path: ...}, ...] instead."
            )
        loaded = load_trained(sae)
        for _, s in loaded:
            _check_overrides_match(s.cfg, overrides, sae)
        specs = [SAESpec(name=n, sae=s, source=sae if len(loaded) == 1 else str(Path(sae) / n), where="sae")
                 for n, s in loaded]  # fmt: skip
        return specs, len(specs) == 1
    template = _config_dict(sae, "sae") if sae is not None else {}
    entries: list[tuple[str, dict[str, Any]]] = (
        [(f"saes[{i}]", e) for i, e in enumerate(saes)] if saes else [("sae", {})]
    )
    hook_list: list[str | None] = [None]
    if hooks:
        patterns = [hooks] if isinstance(hooks, str) else list(hooks)
        hook_list = [h for p in patterns for h in expand_braces(p)]
        if len(set(hook_list)) != len(hook_list):
            raise ValueError(f"hooks={hooks!r} names a hook twice: {hook_list}.")
    grid = _sweep_grid(sweep)
    specs: list[SAESpec] = []
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping of fields (e.g. {{hook_name: ..., k: 64}}), got {entry!r}.")
        if "path" in entry:
            extra = sorted(set(entry) - {"path", "name", *TRAINING_FIELDS})
            if extra:
                raise ValueError(f"{where}: a trained SAE entry takes path, name and training options, not {extra}.")
            _, training, name = _split_fields({k: v for k, v in entry.items() if k != "path"}, where)
            _check_training(training, where)
            loaded = load_trained(str(entry["path"]))
            if len(loaded) != 1:
                raise ValueError(f"{where}: path {entry['path']!r} must be one SAE folder.")
            specs.append(SAESpec(name=name or safe_name(Path(str(entry["path"])).name), sae=loaded[0][1],
                                 source=str(entry["path"]), training=training, where=where))  # fmt: skip
            continue
        base_config, base_training, base_name = _split_fields(entry, where)
        for hook in hook_list:
            for point in grid:
                config = {**template, **overrides, **base_config}
                training = dict(base_training)
                tags = []
                if hook is not None:
                    if "hook_name" in base_config:
                        raise ValueError(f"{where} sets hook_name and `hooks` expands hooks too; use one of them.")
                    config["hook_name"] = hook
                for key, value in hook_overrides.get(config.get("hook_name", ""), {}).items():
                    (training if key in TRAINING_FIELDS else config)[key] = value
                for key, value in point.items():
                    (training if key in TRAINING_FIELDS else config)[key] = value
                    tags.append(f"{key.removesuffix('_coefficient')}{_value_tag(value)}")
                label = f"{where}" + (f" (hook {hook})" if hook else "") + (f" (sweep {point})" if point else "")
                _check_training(training, label)
                cfg = build_config(config, label, transcoder)
                name = base_name or ("sae" if single else safe_name(cfg.hook_name.replace("hook_", "") or "sae"))
                if tags and not (base_name and not hooks and len(grid) == 1):
                    name = "__".join([name, *tags])
                elif base_name and hook is not None:
                    name = f"{base_name}__{safe_name(hook.replace('hook_', ''))}"
                spec = SAESpec(name=name, config=cfg, training=training, where=label)
                spec.explicit_name = base_name is not None  # type: ignore[attr-defined]
                spec.tags = [  # type: ignore[attr-defined]
                    f"{k.removesuffix('_coefficient')}{_value_tag(v)}"
                    for k, v in {**base_config, **base_training}.items()
                    if k not in ("hook_name", "name")
                ]
                specs.append(spec)
    _disambiguate(specs)
    _check_unique(specs)
    used = {s.config.hook_name for s in specs if s.config is not None}
    unknown = sorted(set(hook_overrides) - used)
    if unknown:
        close = {h: closest_names(h, sorted(used), n=1) for h in unknown}
        hints = ", ".join(f"{h!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for h, c in close.items())
        raise ValueError(
            f"hook_overrides names hooks no SAE of this run reads: {hints}; the run's hooks: {sorted(used)}."
        )
    return specs, single


def _disambiguate(specs: list[SAESpec]) -> None:
    """Automatic names that collide (entries on one hook) get their entry's own fields, then an index."""
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.name] = counts.get(spec.name, 0) + 1
    for spec in specs:
        if counts[spec.name] > 1 and not getattr(spec, "explicit_name", True) and getattr(spec, "tags", None):
            spec.name = "__".join([spec.name, *spec.tags])
    seen: dict[str, int] = {}
    for spec in specs:
        if getattr(spec, "explicit_name", True):
            continue
        if spec.name in seen:
            seen[spec.name] += 1
            spec.name = f"{spec.name}__{seen[spec.name]}"
        else:
            seen[spec.name] = 0


def _sweep_grid(sweep: dict[str, list[Any]] | None) -> list[dict[str, Any]]:
    if not sweep:
        return [{}]
    if not isinstance(sweep, dict):
        raise ValueError(f"sweep must be a mapping field -> list of values, e.g. {{k: [32, 64]}}, got {sweep!r}.")
    keys, values = [], []
    for key, options in sweep.items():
        if key == "name" or key == "path":
            raise ValueError(f"sweep.{key}: names and paths cannot be swept.")
        if not isinstance(options, list | tuple) or not options:
            raise ValueError(f"sweep.{key} must be a non-empty list of values, e.g. [1e-4, 4e-4], got {options!r}.")
        keys.append(key)
        values.append(list(options))
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def build_config(fields: dict[str, Any], where: str, transcoder: bool = False) -> SAEConfig:
    """The config of ``fields`` (strict: unknown fields are errors naming the closest valid ones)."""
    base = TranscoderConfig if transcoder or "d_out" in fields or "skip_connection" in fields else SAEConfig
    try:
        return base.from_dict(fields, strict=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def _check_overrides_match(cfg: SAEConfig, overrides: dict[str, Any], where: str) -> None:
    for key, value in overrides.items():
        if key in {f.name for f in dataclasses.fields(cfg)} and getattr(cfg, key) != value:
            raise ValueError(
                f"The trained SAE {where} has {key}={getattr(cfg, key)!r}, but {key}={value!r} was given; a trained "
                f"SAE is evaluated where it was trained: drop the {key} argument."
            )


def _check_unique(specs: list[SAESpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ValueError(
                f"Two SAEs are named {spec.name!r} ({seen[spec.name]} and {spec.where}); give them distinct `name`s."
            )
        seen[spec.name] = spec.where


def unknown_option_message(key: str, valid: list[str]) -> str:
    close = closest_names(key, valid, n=1)
    return f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
