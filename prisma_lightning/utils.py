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

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
            f"(`huggingface-cli download {repo_id}`) and copy the cache, or pass a local folder instead."
        ) from err
    except (RepositoryNotFoundError, EntryNotFoundError) as err:
        raise FileNotFoundError(
            f"{filename!r} was not found in the Hugging Face repo {repo_id!r} ({type(err).__name__}); "
            "check the repo id, the revision and your access token."
        ) from err
