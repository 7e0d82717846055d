"""Small shared helpers: atomic file writes and Hugging Face Hub downloads with readable errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target`` in one step.

    A crash mid-write leaves the old file (or none), never a truncated one. The temporary file's name carries the
    writing process's id (``.<name>.<pid>.<random>.tmp``): temporary files of the same target left by a process
    that no longer runs (a crash mid-write) are removed by the next write.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and some writers) create 0600 files; give the result the permissions of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``target`` whose writing process is gone (crashed writes); returns them."""
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{glob_escape(target.name)}.*.tmp"):
        parts = tmp.name[len(target.name) + 2 :].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another running process is writing it
        if pid == os.getpid():
            continue  # this process's own write in progress
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hub_download(repo_id: str, filename: str, revision: str | None = None, subfolder: str | None = None) -> str:
    """Download one file from the Hugging Face Hub (or its local cache), with an error that says what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision, subfolder=subfolder)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"Could not fetch {filename!r} from the Hugging Face repo {repo_id!r}: no network (or HF_HUB_OFFLINE=1) "
            "and the file is not in the local cache. Download it where there is network "
            f"(`hf download {repo_id}`) and copy the cache, or pass a local folder instead."
        ) from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise FileNotFoundError(
            f"{filename!r} was not found in the Hugging Face repo {repo_id!r} ({type(err).__name__}); "
            "check the repo id, the revision and your access token."
        ) from err


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename); returns the path.

    Args:
        path: the target file; its folder is created if needed.
        data: the whole content.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`); returns the path.

    Args:
        path: the target file; its folder is created if needed.
        text: the whole content.
        encoding: text encoding (UTF-8 by default, whatever the platform's locale).
    """
    return atomic_write_bytes(path, text.encode(encoding))


def save_figure_atomic(fig: object, path: str | os.PathLike, **kwargs: object) -> Path:
    """Save a matplotlib figure to ``path`` atomically, in the format of ``path``'s suffix; returns the path.

    matplotlib picks the format from the file name, which would be the temporary file's, so the format is
    passed explicitly (``format=`` in ``kwargs`` overrides the suffix).

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: the target file, e.g. ``plot.png``, ``plot.pdf`` or ``plot.svg``.
        kwargs: passed to ``fig.savefig`` (``dpi``, ``bbox_inches``, ...).
    """
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix[1:].lower()
    if not fmt:
        raise ValueError(f"Cannot tell the image format of {str(path)!r}: give it a suffix such as .png or .pdf.")
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"Format {fmt!r} of {str(path)!r} is not one matplotlib writes; use one of {sorted(supported)}."
        )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    return path


def save_image_atomic(tensor: object, path: str | os.PathLike, **kwargs: object) -> Path:
    """Save an image tensor (or a batch, tiled as a grid) with ``torchvision.utils.save_image``, atomically.

    The format comes from ``path``'s suffix (PIL would otherwise read it off the temporary file's name).

    Args:
        tensor: ``[C, H, W]`` or ``[B, C, H, W]`` in [0, 1].
        path: the target file, e.g. ``grid.png`` or ``grid.jpg``.
        kwargs: passed to ``save_image`` (``nrow``, ``padding``, ``normalize``, ...).
    """
    from PIL import Image
    from torchvision.utils import save_image

    path = Path(path)
    fmt = kwargs.pop("format", None)
    if fmt is None:
        Image.init()
        fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot tell the image format of {str(path)!r} from its suffix {path.suffix!r}; use a suffix PIL "
            "writes (.png, .jpg, .webp, ...) or pass format=."
        )
    with atomic_path(path) as tmp:
        save_image(tensor, tmp, format=fmt, **kwargs)
    return path


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hugging Face repo id (``owner/name``).

    Local: absolute or ``./`` / ``../`` / ``~`` paths, anything with more than one ``/`` or a backslash, and
    ``a/b`` whose first part is an existing local folder. A missing local path must fail at once with a clear
    message instead of being sent to the Hub.
    """
    text = str(name)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/"):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).is_dir()


def run_dir(trainer: object) -> Path:
    """The folder of a Lightning run, whatever the logger: where its checkpoints and every other output go.

    It is the folder ``ModelCheckpoint`` uses for ``checkpoints/``: ``<save_dir>/<name>/<version>`` of the first
    logger (TensorBoard: ``<default_root_dir>/lightning_logs/version_N``), or ``default_root_dir`` without a
    logger. Every rank gets the same answer (the version is resolved collectively by Lightning).
    """
    loggers = getattr(trainer, "loggers", None) or []
    root = Path(getattr(trainer, "default_root_dir", None) or ".")
    if not loggers:
        return root
    logger = loggers[0]
    log_dir = getattr(logger, "log_dir", None)
    if log_dir is not None and type(logger).__name__ in ("TensorBoardLogger", "CSVLogger"):
        return Path(log_dir)
    save_dir = getattr(logger, "save_dir", None) or root
    name, version = getattr(logger, "name", None), getattr(logger, "version", None)
    version = version if isinstance(version, str) else f"version_{version}" if version is not None else None
    parts = [p for p in (name, version) if p]
    return Path(save_dir, *parts)
