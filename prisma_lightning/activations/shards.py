"""Activation shards on disk: a writer (atomic per shard, resumable) and a memory-mapped reader.

Layout of one hook's folder (``<root>/<hook_name>/``)::

    index.json          format, dtype, d, tokens, tokens_per_image, model, hook, shards [{file, rows, images}],
                        n_images, n_rows, complete
    shard_00000.npy     [rows, d] (or .safetensors with one tensor "activations")

Every shard is written to a temporary file and renamed; ``index.json`` is rewritten (atomically) after each
shard, so a crash leaves only complete shards listed and a restart continues after the last one. Rows within
a shard are shuffled across its images (seeded) so contiguous reads are already well mixed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prisma_lightning.utils import atomic_path

INDEX = "index.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hook_folder(root: str | Path, hook_name: str) -> Path:
    """``<root>/<hook_name>`` (hook names are safe folder names: dots and letters)."""
    return Path(root) / hook_name


class ShardWriter:
    """Accumulates ``[rows, d]`` activations image by image and writes shards of ``images_per_shard`` images."""

    def __init__(
        self,
        folder: str | Path,
        d: int,
        tokens_per_image: int,
        meta: dict[str, Any] | None = None,
        dtype: str = "float32",
        images_per_shard: int = 1024,
        file_format: str = "npy",
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if file_format not in ("npy", "safetensors"):
            raise ValueError(f"file_format must be 'npy' or 'safetensors', got {file_format!r}.")
        if file_format == "npy" and dtype == "bfloat16":
            raise ValueError("numpy has no bfloat16: use file_format='safetensors' or dtype='float16'.")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.d, self.tokens_per_image = int(d), int(tokens_per_image)
        self.dtype, self.file_format = dtype, file_format
        self.images_per_shard, self.shuffle, self.seed = int(images_per_shard), shuffle, seed
        self.meta = dict(meta or {})
        self._pending: list[torch.Tensor] = []
        self._pending_images = 0
        self.index = self._open_index()

    # ------------------------------------------------------------------ index
    def _open_index(self) -> dict[str, Any]:
        path = self.folder / INDEX
        fresh = {
            "format_version": FORMAT_VERSION,
            "file_format": self.file_format,
            "dtype": self.dtype,
            "d": self.d,
            "tokens_per_image": self.tokens_per_image,
            "shuffle": self.shuffle,
            "shuffle_seed": self.seed if self.shuffle else None,
            **self.meta,
            "shards": [],
            "n_images": 0,
            "n_rows": 0,
            "complete": False,
        }
        if not path.is_file():
            return fresh
        index = read_index(self.folder)
        for key in ("d", "tokens_per_image", "dtype", "file_format", *self.meta):
            if key in fresh and index.get(key) != fresh[key]:
                raise ValueError(
                    f"{path} was written with {key}={index.get(key)!r}, but this run uses {fresh[key]!r}; "
                    "write to another folder or delete the old shards."
                )
        # Shard files beyond the index come from a crash mid-write: they are unlisted and will be overwritten.
        return index

    @property
    def images_done(self) -> int:
        """Images already written to complete shards (a resumed run skips them)."""
        return int(self.index["n_images"])

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    # ------------------------------------------------------------------ writing
    def add(self, rows: torch.Tensor, n_images: int) -> None:
        """Queue the rows of ``n_images`` whole images; full shards are written as they fill."""
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"Shard rows must be [N, {self.d}], got {tuple(rows.shape)}.")
        if rows.shape[0] != n_images * self.tokens_per_image:
            raise ValueError(
                f"{rows.shape[0]} rows for {n_images} images, expected {self.tokens_per_image} rows per image."
            )
        if not torch.isfinite(rows).all():
            raise ValueError(f"Non-finite activations (NaN/inf) while writing shards to {self.folder}.")
        self._pending.append(rows.detach().to("cpu", _DTYPES[self.dtype]))
        self._pending_images += n_images
        while self._pending_images >= self.images_per_shard:
            self._flush(self.images_per_shard)

    def _flush(self, n_images: int) -> None:
        rows_needed = n_images * self.tokens_per_image
        data = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = data[:rows_needed], data[rows_needed:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_images -= n_images
        number = len(self.index["shards"])
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
            shard = shard[torch.randperm(shard.shape[0], generator=gen)]
        name = f"shard_{number:05d}.{self.file_format}"
        with atomic_path(self.folder / name) as tmp:
            if self.file_format == "npy":
                with open(tmp, "wb") as f:
                    np.save(f, shard.numpy())
            else:
                from safetensors.torch import save_file

                save_file({"activations": shard.contiguous()}, str(tmp))
        self.index["shards"].append({"file": name, "rows": int(shard.shape[0]), "images": n_images})
        self.index["n_images"] += n_images
        self.index["n_rows"] += int(shard.shape[0])
        self._write_index()

    def _write_index(self) -> None:
        with atomic_path(self.folder / INDEX) as tmp:
            tmp.write_text(json.dumps(self.index, indent=2))

    def close(self) -> None:
        """Write the last (partial) shard and mark the set complete."""
        if self._pending_images:
            self._flush(self._pending_images)
        self.index["complete"] = True
        self._write_index()


def read_index(folder: str | Path) -> dict[str, Any]:
    """Parse and check ``index.json`` of a shard folder."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"No {INDEX} in {folder}: expected an activation folder written by `prisma predict` with "
            "ActivationCacheModule + ActivationWriter (or ShardWriter)."
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    for key in ("d", "dtype", "shards", "file_format"):
        if key not in index:
            raise ValueError(f"{path} has no {key!r} field; it is not an activation index.")
    return index


class ActivationShards:
    """Read-only view of a shard folder; shards are memory-mapped on first use, never loaded whole."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.d = int(self.index["d"])
        self.shards: list[dict[str, Any]] = list(self.index["shards"])
        if not self.shards:
            raise ValueError(f"{self.folder} lists no shards yet; run the caching job first.")
        self._open: dict[int, Any] = {}

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in each worker process
        return state

    def _array(self, i: int) -> Any:
        if i not in self._open:
            info = self.shards[i]
            path = self.folder / info["file"]
            if not path.is_file():
                raise FileNotFoundError(f"Shard {path} listed in {INDEX} is missing.")
            try:
                if self.index["file_format"] == "npy":
                    array = np.load(path, mmap_mode="r")
                else:
                    from safetensors import safe_open

                    array = safe_open(str(path), framework="pt").get_slice("activations")
            except (ValueError, OSError, Exception) as err:  # truncated or corrupt file
                raise ValueError(
                    f"Shard {path} is truncated or corrupt ({err}); delete it and re-run caching."
                ) from err
            shape = tuple(array.shape) if hasattr(array, "shape") else tuple(array.get_shape())
            if shape != (info["rows"], self.d):
                raise ValueError(f"Shard {path} has shape {shape}, but {INDEX} says ({info['rows']}, {self.d}).")
            self._open[i] = array
        return self._open[i]

    def read(self, shard: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of one shard as a float tensor (a contiguous, sequential read)."""
        array = self._array(shard)
        block = array[start:stop]
        if isinstance(block, np.ndarray):
            return torch.from_numpy(np.array(block))  # one copy out of the memory map
        return block

    def blocks(self, rows: int, drop_last: bool = True) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` blocks of ``rows`` rows that never span two shards."""
        out = []
        for i, info in enumerate(self.shards):
            for start in range(0, info["rows"], rows):
                stop = min(start + rows, info["rows"])
                if stop - start == rows or not drop_last:
                    out.append((i, start, stop))
        return out

    def iter_rows(self, chunk: int = 65536) -> Iterator[torch.Tensor]:
        """All rows in order, chunk by chunk (for statistics such as a geometric-median sample)."""
        for i, info in enumerate(self.shards):
            for start in range(0, info["rows"], chunk):
                yield self.read(i, start, min(start + chunk, info["rows"]))
