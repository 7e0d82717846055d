"""dSprites: 737,280 binary 64x64 sprites, rendered procedurally on DeepMind's exact factor grid.

The grid is that of ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``: 1 colour x 3 shapes (square, ellipse,
heart) x 6 scales ``linspace(0.5, 1, 6)`` x 40 orientations ``linspace(0, 2*pi, 40)`` x 32 x 32 positions
``linspace(0, 1, 32)``; image ``i`` has the latent classes ``np.unravel_index(i, (1, 3, 6, 40, 32, 32))`` (C order
over colour, shape, scale, orientation, posX, posY), exactly like the original file, whose ``latents_values`` hold
colour 1, shape 1..3 and the factor values, and ``latents_classes`` the 0-based indices.

Rendering is vectorised numpy: each pixel centre is mapped into the sprite's rotated, scaled frame and tested
against the shape's silhouette (a square of side ``SPRITE_SIZE * scale``, a 2:1 ellipse and a heart of similar
size). posX moves the sprite left to right, posY top to bottom, over pixel centres ``POS_RANGE``, so a sprite at
any position, scale and orientation stays inside the 64x64 canvas. The look follows the original; the pixels
are not those of DeepMind's file (pass ``path`` to use that file instead).

Three ways to get images, none of which holds the 2.9 GB dense array:

* ``cache=True`` (default): the first use renders every image once into a bit-packed ``.npy`` (377 MB,
  ``np.packbits`` of the 4,096 pixels, [N, 512] uint8) written atomically, then memory-maps it.
* ``cache=False``: renders each requested image on the fly (about as fast as unpacking for small batches).
* ``path=...``: reads DeepMind's npz. Its ``imgs`` member is memory-mapped when stored uncompressed; when
  compressed (the published file) it is streamed once into the same bit-packed form (on disk with ``cache=True``,
  in memory otherwise).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from prisma_lightning.datamodules.base import (
    PrismaDataModule,
    check_choice,
    check_fractions,
    check_positive,
    seeded_rngs,
    seeded_split,
    transform_is_random,
)
from prisma_lightning.utils import atomic_path

CANVAS = 64
SHAPES = ("square", "ellipse", "heart")
LATENT_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
Target = Literal["shape", "scale", "orientation", "posX", "posY"]
SPRITE_SIZE = 13.0
"""Side in pixels of the square at scale 1; the ellipse and heart are sized relative to it."""
POS_RANGE = (10.0, 54.0)
"""Pixel coordinates of the sprite centre at position 0 and 1 (pixel ``i`` spans ``[i, i + 1)``)."""
RENDER_VERSION = 1
"""Bumped whenever the renderer's pixels change, so stale caches are not reused."""
_WINDOW = 22  # every sprite fits in a 22x22 window around its centre: only that window is evaluated
_HEART_HALF_WIDTH = 1.139  # extent of the implicit heart (x^2 + y^2 - 1)^3 = x^2 y^3
_HEART_Y_CENTRE = 0.118  # its bounding box spans y in [-1, 1.236]
_HEART_UNIT = 0.405 * SPRITE_SIZE  # pixels per heart unit: area ~ 0.6 of the square's, width ~ 0.92 of it


@dataclass(frozen=True)
class DSpritesGrid:
    """The dSprites factor grid; the default is DeepMind's. Smaller grids make quick tests and experiments."""

    n_scales: int = 6
    """Scales ``linspace(0.5, 1, n_scales)``."""
    n_orientations: int = 40
    """Orientations ``linspace(0, 2 * pi, n_orientations)`` (like the original, 0 and 2*pi both occur)."""
    n_pos: int = 32
    """Positions ``linspace(0, 1, n_pos)`` along x and along y."""

    def __post_init__(self) -> None:
        for name in ("n_scales", "n_orientations", "n_pos"):
            check_positive(f"DSpritesGrid.{name}", getattr(self, name))

    @property
    def sizes(self) -> tuple[int, int, int, int, int, int]:
        """Number of values of each latent, in ``LATENT_NAMES`` order."""
        return (1, len(SHAPES), self.n_scales, self.n_orientations, self.n_pos, self.n_pos)

    def __len__(self) -> int:
        return math.prod(self.sizes)

    @property
    def key(self) -> str:
        """Short name of the grid, used in cache file names."""
        return f"sh3sc{self.n_scales}or{self.n_orientations}x{self.n_pos}y{self.n_pos}"

    def values(self, latent: str) -> np.ndarray:
        """The values the latent takes (shape: 1, 2, 3 as in the original file)."""
        check_choice("latent", latent, LATENT_NAMES)
        return {
            "color": np.ones(1),
            "shape": np.arange(1.0, len(SHAPES) + 1),
            "scale": np.linspace(0.5, 1.0, self.n_scales),
            "orientation": np.linspace(0.0, 2 * np.pi, self.n_orientations),
            "posX": np.linspace(0.0, 1.0, self.n_pos),
            "posY": np.linspace(0.0, 1.0, self.n_pos),
        }[latent]

    def latents_classes(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """[k, 6] int64 latent class indices of image ``indices`` (C order over ``LATENT_NAMES``)."""
        return np.stack(np.unravel_index(np.asarray(indices, dtype=np.int64), self.sizes), axis=1)

    def latents_values(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """[k, 6] float64 latent values of image ``indices``, like the original file's ``latents_values``."""
        classes = self.latents_classes(indices)
        return np.stack([self.values(n)[classes[:, j]] for j, n in enumerate(LATENT_NAMES)], axis=1)

    def index(self, latents_classes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`latents_classes`: the image index of each row of latent classes."""
        classes = np.asarray(latents_classes, dtype=np.int64)
        return np.ravel_multi_index(tuple(classes.T), self.sizes)

    def render(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """[k, 64, 64] bool images of ``indices``."""
        classes = self.latents_classes(indices)
        return render_sprites(
            classes[:, 1],
            self.values("scale")[classes[:, 2]],
            self.values("orientation")[classes[:, 3]],
            self.values("posX")[classes[:, 4]],
            self.values("posY")[classes[:, 5]],
        )


def render_sprites(
    shape: np.ndarray, scale: np.ndarray, orientation: np.ndarray, pos_x: np.ndarray, pos_y: np.ndarray
) -> np.ndarray:
    """Rasterise sprites: [k] shape index (0 square, 1 ellipse, 2 heart), scale, angle (radians, counter-
    clockwise), position in [0, 1] -> [k, 64, 64] bool (pixel on when its centre is inside the silhouette)."""
    shape = np.asarray(shape)
    k = shape.shape[0]
    lo, hi = POS_RANGE
    cx = lo + np.asarray(pos_x, dtype=np.float64) * (hi - lo)  # [k]
    cy = lo + np.asarray(pos_y, dtype=np.float64) * (hi - lo)
    ox = np.clip(np.floor(cx).astype(np.int64) - _WINDOW // 2, 0, CANVAS - _WINDOW)  # window origin [k]
    oy = np.clip(np.floor(cy).astype(np.int64) - _WINDOW // 2, 0, CANVAS - _WINDOW)
    grid = np.arange(_WINDOW) + 0.5
    # Offsets of the window's pixel centres from the sprite centre, in sprite sizes (y pointing up).
    size = np.asarray(scale, dtype=np.float64) * SPRITE_SIZE
    dx = ((ox[:, None] + grid[None, :] - cx[:, None]) / size[:, None]).astype(np.float32)[:, None, :]  # [k,1,W]
    dy = (-(oy[:, None] + grid[None, :] - cy[:, None]) / size[:, None]).astype(np.float32)[:, :, None]  # [k,W,1]
    cos = np.cos(orientation).astype(np.float32)[:, None, None]
    sin = np.sin(orientation).astype(np.float32)[:, None, None]
    window = np.zeros((k, _WINDOW, _WINDOW), dtype=bool)
    for s_idx, inside in enumerate((_in_square, _in_ellipse, _in_heart)):
        sel = np.flatnonzero(shape == s_idx)
        if len(sel):
            u = cos[sel] * dx[sel] + sin[sel] * dy[sel]  # sprite frame: [n, W, W]
            v = cos[sel] * dy[sel] - sin[sel] * dx[sel]
            window[sel] = inside(u, v)
    out = np.zeros((k, CANVAS, CANVAS), dtype=bool)
    rows = oy[:, None, None] + np.arange(_WINDOW)[None, :, None]
    cols = ox[:, None, None] + np.arange(_WINDOW)[None, None, :]
    out[np.arange(k)[:, None, None], rows, cols] = window
    return out


def sprite_images(
    shapes: Sequence[int],
    size: int | Sequence[int] = CANVAS,
    channels: int = 1,
    scale: float = 1.0,
    orientation: float = 0.3,
    pos_x: float = 0.5,
    pos_y: float = 0.5,
) -> torch.Tensor:
    """dSprites images ``[B, channels, H, W]`` in [0, 1] of the given shapes (0 square, 1 ellipse, 2 heart), all at
    the same scale, orientation and position; resized (antialiased) to ``size``, e.g. ``model.cfg.image_size``."""
    n = len(shapes)
    if n == 0 or any(int(s) not in range(len(SHAPES)) for s in shapes):
        raise ValueError(
            f"shapes must be a non-empty list of shape indices 0-{len(SHAPES) - 1} {SHAPES}, got {shapes}."
        )
    full = [np.full(n, value, dtype=np.float64) for value in (scale, orientation, pos_x, pos_y)]
    x = torch.from_numpy(render_sprites(np.asarray(shapes), *full)).float()[:, None]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if hw != (CANVAS, CANVAS):
        x = torch.nn.functional.interpolate(x, size=hw, mode="bilinear", antialias=True)
    return x.expand(-1, channels, -1, -1).contiguous()


def _in_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.5


def _in_ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * (1 / 0.7)) ** 2 + (v * (1 / 0.35)) ** 2 <= 1.0


def _in_heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    hx = u * (SPRITE_SIZE / _HEART_UNIT)
    hy = v * (SPRITE_SIZE / _HEART_UNIT) + _HEART_Y_CENTRE
    r = hx * hx + hy * hy - 1.0
    return r * r * r <= hx * hx * hy * hy * hy


def write_dsprites_cache(path: str | Path, grid: DSpritesGrid | None = None, progress: bool = True) -> Path:
    """Render every image of ``grid`` into a bit-packed ``.npy`` ([N, 512] uint8, ``np.packbits`` of the
    flattened 64x64 image), written atomically chunk by chunk (never holding the dense array)."""
    grid = grid or DSpritesGrid()
    n, chunk = len(grid), 8192
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, CANVAS * CANVAS // 8))
        for start in _progress(range(0, n, chunk), f"Rendering dSprites ({n:,} images) to {path}", progress):
            stop = min(n, start + chunk)
            out[start:stop] = np.packbits(grid.render(np.arange(start, stop)).reshape(stop - start, -1), axis=1)
        out.flush()
        del out
    return Path(path)


def _progress(steps: range, description: str, enabled: bool) -> Any:
    if not enabled:
        yield from steps
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task(description, total=len(steps))
        for step in steps:
            yield step
            bar.advance(task)


# ---------------------------------------------------------------------------------------------- image sources
class _RenderedImages:
    """Images rendered on request."""

    def __init__(self, grid: DSpritesGrid) -> None:
        self.grid = grid

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self.grid.render(indices)


class _PackedImages:
    """Images from a bit-packed [N, 512] array: a ``.npy`` file (memory-mapped lazily, so worker processes
    reopen it instead of receiving a copy) or an in-memory array."""

    def __init__(self, path: Path | None = None, array: np.ndarray | None = None) -> None:
        self.path, self._array = path, array

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_array": None if self.path is not None else self._array}

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        rows = self._array[np.asarray(indices)]
        return np.unpackbits(rows, axis=1, count=CANVAS * CANVAS).reshape(-1, CANVAS, CANVAS).astype(bool)


class _StoredNpzImages:
    """The ``imgs`` member of an uncompressed npz, memory-mapped in place."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, mode="r", dtype=self.dtype, shape=self.shape, offset=self.offset)
        return self._array[np.asarray(indices)] > 0


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def open_dsprites_npz(path: str | Path, cache_file: Path | None, progress: bool = True) -> tuple[Any, np.ndarray]:
    """Open DeepMind's npz (or one written in its format): returns (image source, latents_classes [N, 6]).

    Only the arrays ``imgs`` and ``latents_classes`` are read, never the pickled ``metadata``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"dSprites file {path} does not exist. Download dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz from "
            "https://github.com/google-deepmind/dsprites-dataset or leave `path` unset to render dSprites."
        )
    with np.load(path, allow_pickle=False) as npz:
        missing = {"imgs", "latents_classes"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks the arrays {sorted(missing)}; expected DeepMind's dSprites npz format.")
        classes = np.asarray(npz["latents_classes"], dtype=np.int64)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("imgs.npy")
        with zf.open(info) as f:
            shape, fortran, dtype = _npy_header(f)
            if fortran or len(shape) != 3 or shape[1:] != (CANVAS, CANVAS) or shape[0] != len(classes):
                raise ValueError(
                    f"{path}: imgs has shape {shape} (fortran order: {fortran}); expected [N, 64, 64] in C order "
                    f"with N = {len(classes)} rows of latents_classes."
                )
            if info.compress_type == zipfile.ZIP_STORED:
                header_len = f.tell()
                with open(path, "rb") as raw:  # data offset = local file header + npy header
                    raw.seek(info.header_offset + 26)
                    name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
                offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
                return _StoredNpzImages(path, offset, shape, dtype), classes
            if cache_file is not None and cache_file.is_file():
                return _PackedImages(path=cache_file), classes
            packed = _pack_stream(f, shape[0], dtype, cache_file, progress, f"Unpacking {path.name}")
    return packed, classes


def _pack_stream(
    f: Any, n: int, dtype: np.dtype, cache_file: Path | None, progress: bool, description: str
) -> _PackedImages:
    row_bytes, chunk = CANVAS * CANVAS * dtype.itemsize, 4096

    def fill(out: np.ndarray) -> None:
        for start in _progress(range(0, n, chunk), description, progress):
            stop = min(n, start + chunk)
            rows = np.frombuffer(f.read((stop - start) * row_bytes), dtype=dtype).reshape(stop - start, -1)
            out[start:stop] = np.packbits(rows > 0, axis=1)

    if cache_file is None:
        out = np.empty((n, CANVAS * CANVAS // 8), dtype=np.uint8)
        fill(out)
        return _PackedImages(array=out)
    with atomic_path(cache_file) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, CANVAS * CANVAS // 8))
        fill(out)
        out.flush()
        del out
    return _PackedImages(path=cache_file)


# ---------------------------------------------------------------------------------------------- dataset
class DSpritesDataset(Dataset):
    """(image float [C, H, W] in [0, 1], target class) for the given dSprites image indices; with ``latents``
    (``[len(indices), 6]`` latent classes) and ``factors=True``, ``(image, target, {"factors": [5] int64, "index":
    image index})`` where ``factors`` are the classes of shape, scale, orientation, posX, posY.

    ``__getitems__`` renders / unpacks a whole batch at once (the DataLoader uses it when batching);
    ``getitems_seeded`` does the same for the training loader, running the transform of each sample with every
    RNG seeded by that sample's seed.
    """

    def __init__(
        self,
        images: Callable[[np.ndarray], np.ndarray],
        indices: np.ndarray,
        labels: np.ndarray,
        image_size: int = CANVAS,
        channels: int = 1,
        transform: Callable[[torch.Tensor], Any] | None = None,
        latents: np.ndarray | None = None,
        factors: bool = False,
    ) -> None:
        self.images, self.indices, self.labels = images, np.asarray(indices), np.asarray(labels)
        self.image_size, self.channels, self.transform = image_size, channels, transform
        if factors and latents is None:
            raise ValueError("factors=True needs the latent classes of the images (latents=[n, 6]).")
        if latents is not None and np.shape(latents) != (len(self.indices), len(LATENT_NAMES)):
            raise ValueError(f"latents must have shape [{len(self.indices)}, 6], got {list(np.shape(latents))}.")
        self._latents = None if latents is None else np.asarray(latents, dtype=np.int64)
        self.factors = factors

    def latents(self, items: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[k, 6]`` int64 latent classes (colour, shape, scale, orientation, posX, posY) of samples ``items``."""
        if self._latents is None:
            raise ValueError("This DSpritesDataset was built without latents.")
        return self._latents[np.asarray(items, dtype=np.int64)]

    def _extras(self, items: np.ndarray) -> list[dict[str, Any]] | None:
        if not self.factors:
            return None
        latents = torch.from_numpy(self.latents(items)[:, 1:].copy())
        return [{"factors": f, "index": int(i)} for f, i in zip(latents, self.indices[items], strict=True)]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def is_random(self) -> bool:
        """Whether reading a sample draws random numbers (only a random transform does)."""
        return transform_is_random(self.transform)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[Any, int]]:
        return self.getitems_seeded(items, None)

    def getitems_seeded(self, items: Sequence[int], seeds: Sequence[int] | None) -> list[tuple[Any, int]]:
        """The samples ``items``; with ``seeds``, each transform runs under ``seeded_rngs`` of its sample's seed."""
        items = np.asarray(items, dtype=np.int64)
        x = torch.from_numpy(self.images(self.indices[items])).float().unsqueeze(1)  # [k, 1, 64, 64]
        if self.image_size != CANVAS:
            from torchvision.transforms.v2 import functional as TF

            x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        labels = [int(label) for label in self.labels[items]]
        if self.transform is None:
            images = [img.contiguous() for img in x]
        elif seeds is None or not self.is_random:
            images = [self.transform(img) for img in x]
        else:
            restore = get_worker_info() is None
            images = []
            for img, seed in zip(x, seeds, strict=True):
                with seeded_rngs(seed, restore=restore):
                    images.append(self.transform(img))
        extras = self._extras(items)
        if extras is None:
            return list(zip(images, labels, strict=True))
        return list(zip(images, labels, extras, strict=True))


class DSpritesDataModule(PrismaDataModule):
    """dSprites (procedurally rendered, or DeepMind's npz) for classifying one latent factor.

    Splits are a seeded random permutation of the (optionally subsampled) images: train, then val, then test.

    Args:
        target: Latent to predict as a class index: ``shape`` (3 classes: square, ellipse, heart), ``scale``
            (6), ``orientation`` (40), ``posX`` or ``posY`` (32 each).
        path: DeepMind's ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (or a file in its format); None
            renders the images instead.
        cache: Keep images in a bit-packed ``.npy`` in ``cache_dir`` (377 MB for the full grid, written once with
            a progress bar); False renders each image on request (and unpacks a compressed ``path`` in memory).
        cache_dir: Folder of the cache file.
        grid: Factor grid to render; None is DeepMind's full grid (ignored with ``path``: the file's grid is used).
        subset_size: Use a seeded random subset of this many images (None: all 737,280).
        val_fraction: Fraction of the images in the validation split.
        test_fraction: Fraction of the images in the test split.
        image_size: Side of the returned images (64 is native; others are resized with antialiasing).
        channels: 1 (grayscale) or 3 (the channel repeated, for RGB backbones).
        transform: Callable applied to each image (float [C, H, W] in [0, 1]), e.g. a backbone's
            ``preprocess()``; None returns the image as is.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the subset, the splits and the shuffle order.
        factors: Add the generative factors to every sample: batches are ``[images, labels, {"factors": [B, 5],
            "index": [B]}]`` (classes of shape, scale, orientation, posX, posY, and the image's index in the grid).
            ``SAEEvaluator`` then adds its ground-truth columns.
    """

    def __init__(
        self,
        target: Target = "shape",
        path: str | None = None,
        cache: bool = True,
        cache_dir: str = "~/.cache/prisma_lightning/dsprites",
        grid: DSpritesGrid | dict[str, int] | None = None,
        subset_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        image_size: int = 64,
        channels: Literal[1, 3] = 1,
        transform: Callable[[torch.Tensor], Any] | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
        factors: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.factors = bool(factors)
        check_choice("target", target, LATENT_NAMES[1:])
        check_choice("channels", channels, (1, 3))
        check_fractions(val_fraction, test_fraction)
        check_positive("image_size", image_size)
        if subset_size is not None:
            check_positive("subset_size", subset_size)
        if isinstance(grid, dict):
            grid = DSpritesGrid(**grid)
        self.save_hyperparameters(ignore=["transform", "grid"])
        # Plain values only, so checkpoints stay loadable with weights_only=True.
        self.hparams["grid"] = asdict(grid) if grid is not None else None
        self.target, self.path, self.cache, self.cache_dir = target, path, cache, Path(cache_dir).expanduser()
        self.grid = grid or DSpritesGrid()
        self.subset_size, self.val_fraction, self.test_fraction = subset_size, val_fraction, test_fraction
        self.image_size, self.channels, self.transform = image_size, channels, transform
        self._latent_classes: np.ndarray | None = None

    @property
    def cache_file(self) -> Path:
        """The bit-packed cache of the images (of the rendered grid, or of the npz at ``path``)."""
        if self.path is not None:
            src = Path(self.path).expanduser()
            size = src.stat().st_size if src.is_file() else 0
            return self.cache_dir / f"{src.stem}_{size}_packed.npy"
        return self.cache_dir / f"dsprites_{self.grid.key}_r{RENDER_VERSION}_packed.npy"

    @property
    def num_classes(self) -> int:
        return self.grid.sizes[LATENT_NAMES.index(self.target)]

    @property
    def class_names(self) -> list[str]:
        """Shape names, or the factor value of each class (e.g. ``'0.500'`` for scale 0)."""
        if self.target == "shape":
            return list(SHAPES)
        return [f"{v:.3f}" for v in self.grid.values(self.target)]

    def prepare_data(self) -> None:
        """Write the cache (rank 0 only, once); a no-op when ``cache`` is False or the file exists."""
        if self.cache and not self.cache_file.is_file():
            if self.path is None:
                write_dsprites_cache(self.cache_file, self.grid)
            else:
                open_dsprites_npz(self.path, self.cache_file)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.path is not None:
            images, classes = open_dsprites_npz(self.path, self.cache_file if self.cache else None)
            sizes = classes.max(axis=0) + 1
            if sizes[0] != 1 or sizes[1] != len(SHAPES) or sizes[4] != sizes[5] or len(classes) != np.prod(sizes):
                raise ValueError(f"{self.path}: latents_classes do not form a dSprites grid (sizes {sizes.tolist()}).")
            self.grid = DSpritesGrid(int(sizes[2]), int(sizes[3]), int(sizes[4]))
        else:
            if self.cache:
                self.prepare_data()  # no-op when prepare_data already ran (single process without a Trainer)
                images = _PackedImages(path=self.cache_file)
            else:
                images = _RenderedImages(self.grid)
        n = len(self.grid)
        splits = seeded_split(n, self.val_fraction, self.test_fraction, self.seed, self.subset_size)
        datasets = []
        column = LATENT_NAMES.index(self.target)
        for idx in splits:
            latents = classes[idx] if self.path is not None else self.grid.latents_classes(idx)
            datasets.append(DSpritesDataset(images, idx, latents[:, column], self.image_size, self.channels,
                                            self.transform, latents=latents, factors=self.factors))  # fmt: skip
        self.train_set, self.val_set, self.test_set = datasets
