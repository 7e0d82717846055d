"""`prisma` console script: LightningCLI for every prisma-lightning experiment.

``prisma fit|validate|test|predict --config configs/<experiment>.yaml``. Any LightningModule and
LightningDataModule can be named by ``class_path`` (subclass mode), so user subclasses work too; the project's own
modules, data modules and callbacks also go by their short names (``--model SAEModule``,
``--model.help SAEModule``, ``--data DSpritesDataModule``).

What ``prisma`` adds to LightningCLI:

* **One folder per run.** Every output of every subcommand lands under the run's folder (``<default_root_dir>/
  <logger name>/<version>``, also with a WandbLogger or no logger), ``default_root_dir`` defaulting to ``runs``;
  ``validate`` / ``test`` / ``predict`` runs get their own ``<default_root_dir>/<subcommand>/version_N``.
* **Resuming.** ``--ckpt_path last`` resumes the newest ``last.ckpt`` under ``default_root_dir`` and continues
  that run's folder (logs, checkpoints, exports); without one it stops and says so. With an explicit checkpoint
  file, the values the checkpoint imposes over the config are printed.
* **Errors in a few lines.** Configuration mistakes print what was wrong, the closest valid names and what to do;
  ``--debug`` (or ``PRISMA_DEBUG=1``) shows the full traceback.
* **Crash-safe checkpoints** (:class:`~prisma_lightning.checkpoint_io.AtomicCheckpointIO`), a progress bar that
  counts optimizer steps (with tokens/s for SAE runs, and periodic lines when the output is not a terminal), and
  Lightning's tips and irrelevant warnings silenced.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from prisma_lightning.checkpoint_io import AtomicCheckpointIO
from prisma_lightning.utils import run_dir

DEFAULT_ROOT = "runs"
DEBUG_ENV = "PRISMA_DEBUG"


class CLIError(ValueError):
    """A mistake in how ``prisma`` was called, reported in a few lines (full traceback with ``--debug``)."""


# ---------------------------------------------------------------------------------------------------- quiet
class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence what does not apply to prisma-lightning runs: Lightning's product tips, the manual-optimisation
    checkpoint note (SAE modules checkpoint after their optimizer step on purpose), and a torch pytree
    deprecation raised inside Lightning."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    # ActivationBlocks splits its blocks between DataLoader workers itself, so its __len__ holds with workers too
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within.*")
    # a resumed run continues in its own checkpoint folder, which is not empty by design
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty.*")


# ---------------------------------------------------------------------------------------------------- config saving
class PrismaSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's folder (never into the current directory), overwriting."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        folder = trainer.strategy.broadcast(str(run_dir(trainer)))
        if trainer.is_global_zero:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(Path(folder) / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)  # fmt: skip
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


# ---------------------------------------------------------------------------------------------------- SAE fields
_SAE_FIELD_ARG = re.compile(r"--model\.(?:init_args\.)?sae\.(?!help$|init_args\b|class_path\b)(\w+)(?:=(.*))?", re.S)


def _yaml_value(text: str) -> Any:
    """A command-line value as jsonargparse reads it (YAML, with ``1e-3`` a number as in YAML 1.2)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split_sae_field_args(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``args`` without its ``--model.sae.<field> <value>`` pairs, and those fields with their values."""
    rest: list[str] = []
    fields: dict[str, Any] = {}
    i = 0
    while i < len(args):
        match = _SAE_FIELD_ARG.fullmatch(args[i])
        if match is None:
            rest.append(args[i])
            i += 1
            continue
        field, value = match.group(1), match.group(2)
        if value is None:
            if i + 1 >= len(args):
                raise SystemExit(f"error: {args[i]} needs a value, e.g. {args[i]} 8")
            value, i = args[i + 1], i + 1
        fields[field] = _yaml_value(value)
        i += 1
    return rest, fields


def _flow_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()


def merge_sae_field_args(args: list[str]) -> list[str]:
    """Rewrite ``--model.sae.<field> <value>`` (or ``--model.init_args.sae.<field>=<value>``) into
    ``--model.init_args.sae '{"<field>": <value>}'``, which jsonargparse merges into the configured SAE config.

    The SAE config is a union of one dataclass per architecture; jsonargparse resolves a dotted override of such a
    union against its first member, which would silently turn a TopK config into a ReLU one (and drop ``k``). A JSON
    mapping is merged into the config that was selected by its ``architecture``, as a second ``--config`` would be.
    """
    rest, fields = _split_sae_field_args(args)
    return rest + [a for field, value in fields.items() for a in ("--model.init_args.sae", _flow_yaml({field: value}))]


# ---------------------------------------------------------------------------------------------------- the CLI
class PrismaCLI(LightningCLI):
    """LightningCLI with prisma-lightning's defaults (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _import_project_classes()
        quiet_lightning()
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", PrismaSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        trainer_defaults.setdefault("default_root_dir", DEFAULT_ROOT)
        kwargs["trainer_defaults"] = trainer_defaults
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", _DESCRIPTION)
        self._resumed_from: Path | None = None
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as LightningCLI does, with ``--model.sae.<field> <value>`` merged into the configured SAE (see
        :func:`merge_sae_field_args`)."""
        if args is None or isinstance(args, list | tuple):
            args = list(sys.argv[1:] if args is None else args)
            rest, fields = _split_sae_field_args(args)
            if "architecture" in fields:
                args = self._switch_architecture(parser, rest, fields)
            else:
                args = merge_sae_field_args(args)
        super().parse_arguments(parser, args)

    @staticmethod
    def _switch_architecture(parser: Any, rest: list[str], fields: dict[str, Any]) -> list[str]:
        """``--model.sae.architecture <name>``: the configured SAE with the fields the new architecture shares
        (``d_in``, ``hook_name``, normalisation, ...) kept, the old one's own fields (``k``, ...) dropped, and the
        given fields set."""
        from prisma_lightning.sae.registry import config_class

        try:
            new_class = config_class(str(fields["architecture"]))
        except ValueError as err:
            raise SystemExit(f"prisma: --model.sae.architecture: {err}") from None
        quiet = [a for a in rest if not a.startswith("--print_config")]  # parse only: print the final config later
        base = parser.parse_args(quiet, defaults=True)
        sub = base.get("subcommand")
        node = base.get(sub) if sub else base
        current = node.get("model.init_args.sae") if node is not None else None
        known = {f.name for f in dataclasses.fields(new_class)}
        merged = {k: v for k, v in vars(current).items() if k in known} if current is not None else {}
        merged.update(fields)
        return [*rest, "--model.init_args.sae", "null", "--model.init_args.sae", _flow_yaml(merged)]

    # ------------------------------------------------------------------ checkpoint paths
    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest run's ``last.ckpt``; report what a checkpoint imposes."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if ckpt_path == "last":
            root = Path(section.get("trainer", {}).get("default_root_dir") or DEFAULT_ROOT)
            found = newest_last_checkpoint(root)
            if found is None:
                raise CLIError(
                    f"--ckpt_path last: there is no last.ckpt under {root} to resume from (no earlier run of this "
                    "config saved one). Drop --ckpt_path to start a new run."
                )
            section["ckpt_path"] = str(found)
            self._resumed_from = found
            print(f"Resuming from {found} (the newest last.ckpt under {root}).", file=sys.stderr)
            ckpt_path = str(found)
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"Checkpoint {ckpt_path} does not exist; pass an existing file or --ckpt_path last."
            )
        before = _resolved_sae(_plain(section.get("model")))
        super()._parse_ckpt_path()
        after = _resolved_sae(_plain(self.config[subcommand].get("model")))
        changed = _differences(before, after)
        if changed:
            lines = "\n".join(f"  model.{k}: {_short(a)} -> {_short(b)}" for k, a, b in changed)
            print(f"From the checkpoint's hyperparameters (they override the config):\n{lines}", file=sys.stderr)

    # ------------------------------------------------------------------ trainer
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())  # crash-safe checkpoints by default
        config["plugins"] = plugins
        config["logger"] = self._logger(config)
        callbacks = list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not _has_progress_bar(config.get("callbacks")):
            from prisma_lightning.progress import StepProgressBar

            callbacks.append(StepProgressBar())
        return super()._instantiate_trainer(config, callbacks)

    def _logger(self, config: dict[str, Any]) -> Any:
        """The run's logger: validate / test / predict get their own folder; a resumed fit continues its run's
        folder; a WandbLogger writes under ``default_root_dir``."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        logger = config.get("logger", True)
        root = str(config.get("default_root_dir") or DEFAULT_ROOT)
        subcommand = self.subcommand or "fit"
        if logger is True or logger is None:
            name, version = ("lightning_logs" if subcommand == "fit" else subcommand), None
            if subcommand == "fit" and self._resumed_from is not None:
                parts = self._resumed_from.parts
                if len(parts) >= 4 and parts[-2] == "checkpoints" and parts[-3].startswith("version_"):
                    name, version = parts[-4], parts[-3]
                    root = str(Path(*parts[:-4])) if len(parts) > 4 else "."
            return TensorBoardLogger(save_dir=root, name=name, version=version, default_hp_metric=False)
        for one in logger if isinstance(logger, list | tuple) else [logger]:
            if isinstance(one, WandbLogger) and getattr(one, "_save_dir", None) in (None, "", "."):
                one._save_dir = root
                one._wandb_init["dir"] = root
                Path(root).mkdir(parents=True, exist_ok=True)
        return logger

    def before_fit(self) -> None:
        check_checkpoint(self._ckpt_path("fit"), self.trainer)

    def before_validate(self) -> None:
        check_checkpoint(self._ckpt_path("validate"), self.trainer)

    def _ckpt_path(self, subcommand: str) -> str | None:
        config = self.config.get(subcommand, {}) if self.subcommand else self.config
        return config.get("ckpt_path") if hasattr(config, "get") else None


_DESCRIPTION = (
    "prisma-lightning: interpretability of vision transformers. Modules: SAEModule, TranscoderModule, "
    "ViTClassifierModule, ActivationCacheModule, AtlasModule (prisma fit --model.help SAEModule). Data: "
    "DSpritesDataModule, ImageNetDataModule, ActivationDataModule, VideoClipDataModule, MovingSpritesDataModule, "
    "InductionDataModule, TorchvisionDataModule (--data.help NAME). Resume with --ckpt_path last; --debug shows "
    "full tracebacks."
)


def _import_project_classes() -> None:
    """Import the project's modules, data modules and callbacks so their short names resolve on the command line."""
    import prisma_lightning.callbacks  # noqa: F401
    import prisma_lightning.datamodules as datamodules
    import prisma_lightning.modules  # noqa: F401

    for name in getattr(datamodules, "__all__", []):
        getattr(datamodules, name)  # the data-module package imports lazily


def _has_progress_bar(callbacks: Any) -> bool:
    from lightning.pytorch.callbacks import ProgressBar

    items = callbacks if isinstance(callbacks, list | tuple) else [callbacks] if callbacks else []
    return any(isinstance(c, ProgressBar) for c in items)


def newest_last_checkpoint(root: Path) -> Path | None:
    """The most recently written ``last*.ckpt`` anywhere under ``root`` (None if there is none)."""
    if not root.is_dir():
        return None
    candidates = [p for p in root.rglob("last*.ckpt") if p.is_file() and not p.name.startswith(".")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def check_checkpoint(ckpt_path: str | None, trainer: Any) -> None:
    """Fail with a clear message when the checkpoint to resume from is missing, truncated or corrupt."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry", "last"):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; pass an existing file or --ckpt_path last.")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"Checkpoint {path} is truncated or corrupt ({err}); delete it and resume from an earlier checkpoint."
        ) from err
    if bad is not None:
        raise ValueError(f"Checkpoint {path} is corrupt (member {bad!r} fails its CRC check); delete it.")


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _resolved_sae(model: Any) -> Any:
    """``model`` with its SAE config's derived fields filled in (``d_sae`` from ``expansion_factor``, ``aux_k``, ...),
    so that a checkpoint storing the resolved values is not reported as overriding them."""
    init = model.get("init_args") if isinstance(model, dict) else None
    sae = init.get("sae") if isinstance(init, dict) else None
    if not isinstance(sae, dict) or "architecture" not in sae:
        return model
    from prisma_lightning.sae import SAEConfig

    try:
        resolved = SAEConfig.from_dict(sae).to_dict()
    except Exception:  # noqa: BLE001 (an invalid config is reported by the parser, not here)
        return model
    return {**model, "init_args": {**init, "sae": {k: resolved.get(k, v) for k, v in sae.items()}}}


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}." if prefix or key else "")
        return out
    if a != b:
        return [(prefix.rstrip(".").removeprefix("init_args."), a, b)]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------- errors
def _known_keys(parser: Any) -> list[str]:
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", "")
        if dest and dest not in ("help", "config", "print_config"):
            keys.append(dest)
    return keys


def short_parse_error(message: str, keys: list[str] | None = None) -> str:
    """A jsonargparse error (usage text, nested union messages) reduced to what was wrong and the fix."""
    lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
    text = " ".join(lines)
    unexpected = re.findall(
        r"(?:Key|Option|Group) '([\w.]+)' (?:is not expected|is not accepted|does not accept)", text
    )
    unexpected += re.findall(r"Option '([\w.]+)' is not accepted", text)
    unrecognized = re.findall(r"[Uu]nrecognized arguments: (\S+)", text)
    out = []
    for key in dict.fromkeys(unexpected + unrecognized):
        leaf = key.lstrip("-").split(".")[-1]
        candidates = [k.split(".")[-1] for k in (keys or [])] + _FIELD_NAMES
        close = difflib.get_close_matches(leaf, sorted(set(candidates)), n=1, cutoff=0.6)
        if not close and len(leaf) <= 4:  # short names ("lrr"): a looser match
            close = difflib.get_close_matches(leaf, sorted(set(candidates)), n=1, cutoff=0.5)
        owners = _architectures_with_field(leaf)
        if owners:
            out.append(
                f"Option {key!r} is not a field of the configured SAE's architecture; it belongs to "
                f"{', '.join(owners)}. Switch with --model.sae.architecture {owners[0]} (fields the architectures "
                "share are kept), or remove it."
            )
            continue
        hint = f" Did you mean {close[0]!r}?" if close else ""
        out.append(f"Unknown option {key!r}.{hint}")
    arch = re.search(
        r"architecture=?['\"]?(\w[\w-]*)['\"]? is not valid|Expected a typing.Literal\[[^]]+\]. Got value: (\S+)", text
    )
    if arch and not out:
        from prisma_lightning.sae.registry import architecture_names, unknown_architecture_message

        value = (arch.group(1) or arch.group(2) or "").strip("'\",")
        if value not in architecture_names():
            out.append(unknown_architecture_message(value))
    for pattern in (r"(\b[a-z_]+ must be [^.;]+)", r"(Unknown \w+Config fields [^;]+)"):
        for match in re.findall(pattern, text):
            if match not in out:
                out.append(match)
    if not out:
        useful = [ln for ln in lines if not ln.startswith(("usage:", "  ", "[")) and "Subtypes" not in ln]
        out = useful[-3:] if useful else lines[-3:]
    return "\n".join(out[:6])


_FIELD_NAMES: list[str] = []


def _architectures_with_field(name: str) -> list[str]:
    """The registered architectures whose config has field ``name`` (empty if all or none have it)."""
    from prisma_lightning.sae.registry import architecture_names, config_class

    names = architecture_names()
    owners = [a for a in names if name in {f.name for f in dataclasses.fields(config_class(a))}]
    return owners if len(owners) < len(names) else []


def _sae_field_names() -> list[str]:
    """Every option name a config may use: SAE config fields and the arguments of the project's modules, data
    modules and callbacks, and of Lightning's Trainer (the candidates for "did you mean")."""
    import dataclasses
    import inspect

    import lightning.pytorch as pl

    import prisma_lightning.callbacks as callbacks
    import prisma_lightning.datamodules as datamodules
    import prisma_lightning.modules as modules
    from prisma_lightning.sae.registry import config_classes

    names = {f.name for cls in config_classes() for f in dataclasses.fields(cls)}
    classes = [pl.Trainer]
    for package in (modules, datamodules, callbacks):
        classes += [
            getattr(package, n) for n in getattr(package, "__all__", []) if isinstance(getattr(package, n), type)
        ]
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names.update(p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs"))
    return sorted(names)


def _debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in args:
        debug = True
        args = [a for a in args if a != "--debug"]
    return debug, args


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``prisma`` script and of ``python -m prisma_lightning``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    debug, argv = _debug_requested(argv)
    if args is None:
        sys.argv = sys.argv[:1] + argv
    if debug:
        logging.getLogger("prisma_lightning").setLevel(logging.DEBUG)
        PrismaCLI(args=argv if args is not None else None)
        return
    _FIELD_NAMES[:] = _sae_field_names()
    import io

    err = io.StringIO()
    stderr, sys.stderr = sys.stderr, _Tee(sys.stderr, err)
    try:
        PrismaCLI(args=argv if args is not None else None)
    except SystemExit as exit_:
        sys.stderr = stderr
        held = err.getvalue()
        if exit_.code not in (0, None) and "error:" in held:
            print(f"prisma: {short_parse_error(held)}\n(--debug for the full message)", file=sys.stderr)
        elif "usage:" in held:
            sys.stderr.write(held[held.index("usage:") :])
        raise SystemExit(exit_.code) from None
    except KeyboardInterrupt:
        sys.stderr = stderr
        print("prisma: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 (reported in a few lines; --debug shows the traceback)
        sys.stderr = stderr
        print(f"prisma: {_describe(error)}\n(--debug for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        sys.stderr = stderr


def _describe(error: BaseException) -> str:
    """``Type: message`` of the error that matters, in a few lines."""
    chain, seen = [error], {id(error)}
    while chain[-1].__cause__ or chain[-1].__context__:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    ours = [e for e in chain if _raised_by_us(e) and "Union subtypes" not in str(e)]
    if ours:
        root = ours[-1]
        return f"{type(root).__name__}: {_first_lines(root)}"
    text = "\n".join(str(e) for e in chain)
    if any(k in text for k in ("Union subtypes", "Validation failed", "Problem with given class_path")):
        return short_parse_error(text)
    root = _root_cause(error)
    return f"{type(root).__name__}: {_first_lines(root)}"


def _raised_by_us(error: BaseException) -> bool:
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return (
        last is not None
        and "prisma_lightning" in last.tb_frame.f_code.co_filename
        and not isinstance(error, SystemExit)
    )


def _root_cause(error: BaseException) -> BaseException:
    """The error our code raised, under the wrappers jsonargparse and Lightning put around it."""
    chain, seen = [error], {id(error)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))
    ours = [e for e in chain if type(e).__module__.split(".")[0] not in ("jsonargparse", "argparse")]
    specific = [e for e in ours if "Union subtypes" not in str(e) and "Problem with given class_path" not in str(e)]
    return (specific or ours or chain)[-1] if len(chain) > 1 else error


def _first_lines(error: BaseException, n: int = 8) -> str:
    text = str(error) if not isinstance(error, KeyError) or not error.args else str(error.args[0])
    if "Union subtypes" in text or "Validation failed" in text or "Problem with given class_path" in text:
        return short_parse_error(text)
    lines = text.strip().splitlines() or [repr(error)]
    return "\n".join(lines[:n])


class _Tee:
    """Writes to a stream and keeps a copy, but holds back jsonargparse's usage text (errors are condensed)."""

    def __init__(self, stream: Any, copy: Any) -> None:
        self.stream, self.copy = stream, copy
        self._holding = False

    def write(self, text: str) -> int:
        self.copy.write(text)
        if text.startswith("usage:") or self._holding:
            self._holding = True  # a parse error follows: printed condensed by main()
            return len(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


if __name__ == "__main__":
    main()

__all__ = ["CLIError", "PrismaCLI", "check_checkpoint", "main", "newest_last_checkpoint", "quiet_lightning"]
