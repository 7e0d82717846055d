"""Video clips from class folders (decoded with PyAV), and the MovingSprites synthetic video dataset.

``VideoClipDataModule`` reads ``root/<class>/<video>`` (mp4, webm, avi, mkv, mov, m4v) and serves clips of
``frames`` frames taken every ``stride`` frames, as ``[T, C, H, W]`` samples (``[B, T, C, H, W]`` batches).

Clip sampling (a clip spans ``(frames - 1) * stride + 1`` frames, starting at frame ``start``):

* ``random`` (training default): ``start`` uniform over every start that keeps the clip inside the video,
  drawn from torch's RNG each time the sample is read. The training loader seeds it per sample from
  (``seed``, epoch, sample index), so an epoch's clips are the same in a resumed run and with any
  ``num_workers``.
* ``uniform`` (evaluation default): deterministic; with ``clips_per_video=1`` the centred clip
  (``start = (n_frames - span) // 2``), with k > 1 clips ``k`` evenly spaced starts from the first to the last
  possible one (each clip is a separate sample of the evaluation splits).

A video shorter than the span starts at frame 0 and, with ``short_video='pad'``, repeats its last frame for the
missing indices (``'loop'`` wraps around to the start instead). Frames are decoded from the start of the file up
to the last frame needed (exact for any container, no timestamp seeking). A video that cannot be opened or
decodes fewer frames than its container declares (truncated) is skipped with one warning, or raises with
``on_bad_video='raise'``.

MovingSprites (``write_moving_sprites`` / ``MovingSpritesDataModule``): real H.264 MP4 files (MPEG-4 Part 2
where this FFmpeg build lacks libx264) of one sprite (square, circle or triangle, random bright colour, on black)
moving at a constant 1-3 px per frame in one of four directions, the label and subfolder name: ``down`` 0,
``left`` 1, ``right`` 2, ``up`` 3. The canvas wraps around (a sprite leaving on one side re-enters on the
other) and the start position is uniform, so the sprite's position in any single frame is uniform whatever the
direction: only motion across frames reveals the label.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from prisma_lightning.datamodules.base import (
    FileDataset,
    OnBad,
    PrismaDataModule,
    check_choice,
    check_fractions,
    check_positive,
    split_counts,
    transform_is_random,
)
from prisma_lightning.utils import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
DIRECTIONS = ("down", "left", "right", "up")
SPRITE_SHAPES = ("square", "circle", "triangle")
ClipSampling = Literal["random", "uniform"]
ShortVideo = Literal["pad", "loop"]
_CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
_MARKER = "moving_sprites.json"
_GENERATOR_VERSION = 1


class TruncatedVideoError(ValueError):
    """A video decoded fewer frames than its container declares."""


# ---------------------------------------------------------------------------------------------- clip indices
def clip_span(frames: int, stride: int) -> int:
    """Number of consecutive video frames a clip covers."""
    return (frames - 1) * stride + 1


def clip_starts(
    n_frames: int, frames: int, stride: int, sampling: ClipSampling, clips: int = 1, generator: Any = None
) -> list[int]:
    """Start frame of each of ``clips`` clips of a video of ``n_frames`` frames (see the module docstring)."""
    last = max(0, n_frames - clip_span(frames, stride))
    if sampling == "random":
        return [int(torch.randint(0, last + 1, (1,), generator=generator)) for _ in range(clips)]
    if clips == 1:
        return [last // 2]
    return [int(round(j * last / (clips - 1))) for j in range(clips)]


def clip_indices(n_frames: int, frames: int, stride: int, start: int, short_video: ShortVideo = "pad") -> list[int]:
    """Frame indices of the clip starting at ``start``; indices past the end are padded or looped."""
    idx = [start + k * stride for k in range(frames)]
    if short_video == "loop":
        return [i % n_frames for i in idx]
    return [min(i, n_frames - 1) for i in idx]


# ---------------------------------------------------------------------------------------------- decoding
def count_frames(path: str | os.PathLike) -> int:
    """Frames of the first video stream: the container's count, or the number of packets when it has none."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream.")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Decode the frames ``indices`` (any order, repeats allowed) as uint8 ``[T, 3, H, W]`` RGB.

    Raises :class:`TruncatedVideoError` when the video ends before the largest index.
    """
    import av

    wanted, last = set(indices), max(indices)
    got: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if decoded <= last:
        raise TruncatedVideoError(f"the video ends after {decoded} decodable frames, frame {last} is needed")
    return torch.from_numpy(np.stack([got[i] for i in indices])).permute(0, 3, 1, 2).contiguous()


def best_video_codec() -> str:
    """``libx264`` (H.264) if this PyAV/FFmpeg build can encode it, else ``mpeg4``."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # PyAV versions raise different errors for a missing encoder
        return "mpeg4"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str | None = None) -> Path:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (even H and W) to ``path`` atomically; returns the path."""
    import av

    path = Path(path)
    fmt = _CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"Cannot tell the container of {path}; use one of {sorted(_CONTAINER_FORMATS)}.")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}.")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"Frame height and width must be even for yuv420p, got {frames.shape[1:3]}.")
    codec = codec or best_video_codec()
    options = {"crf": "12"} if codec == "libx264" else {"qscale": "2"} if codec == "mpeg4" else {}
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format=fmt) as container:
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for arr in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
            container.mux(stream.encode(None))  # flush delayed (B-)frames
    return path


# ---------------------------------------------------------------------------------------------- dataset
class ClipToFloat:
    """Default clip transform: uint8 ``[T, C, H, W]`` -> float in [0, 1], shorter side resized to ``size`` and
    centre-cropped to ``size x size`` (no resizing when ``size`` is None)."""

    is_random = False
    """Deterministic: the training loader need not seed it."""

    def __init__(self, size: int | None = 224) -> None:
        self.size = size

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        x = clip.float() / 255.0
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            from torchvision.transforms.v2 import functional as TF

            x = TF.center_crop(TF.resize(x, self.size, antialias=True), [self.size, self.size]).clamp(0.0, 1.0)
        return x

    def __repr__(self) -> str:
        return f"ClipToFloat(size={self.size})"


class VideoClipDataset(FileDataset):
    """(transform(clip uint8 [T, C, H, W]), label); ``clips_per_video`` samples per video (see the module doc)."""

    def __init__(
        self,
        files: Sequence[str],
        labels: Sequence[int],
        frames: int = 16,
        stride: int = 1,
        sampling: ClipSampling = "uniform",
        clips_per_video: int = 1,
        short_video: ShortVideo = "pad",
        transform: Callable[[torch.Tensor], Any] | None = None,
        on_bad: OnBad = "skip",
    ) -> None:
        super().__init__(files, on_bad, kind="video", option="on_bad_video")
        import av

        self.decode_errors = (*FileDataset.decode_errors, av.FFmpegError)
        self.labels = list(labels)
        self.frames, self.stride, self.sampling = frames, stride, sampling
        self.clips_per_video, self.short_video, self.transform = clips_per_video, short_video, transform
        self._n_frames: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.files) * self.clips_per_video

    def file_index(self, index: int) -> int:
        return index // self.clips_per_video

    @property
    def is_random(self) -> bool:
        """Whether reading a sample draws random numbers (random clip starts, a random transform)."""
        return self.sampling == "random" or transform_is_random(self.transform)

    def n_frames(self, file_index: int) -> int:
        if file_index not in self._n_frames:
            n = count_frames(self.files[file_index])
            if n <= 0:
                raise TruncatedVideoError("the video has no frames")
            self._n_frames[file_index] = n
        return self._n_frames[file_index]

    def frame_indices(self, index: int) -> list[int]:
        """Frame indices of sample ``index`` (random sampling draws a new start on every call)."""
        f = self.file_index(index)
        n = self.n_frames(f)
        if self.sampling == "random":
            start = clip_starts(n, self.frames, self.stride, "random")[0]
        else:
            start = clip_starts(n, self.frames, self.stride, "uniform", self.clips_per_video)[
                index % self.clips_per_video
            ]
        return clip_indices(n, self.frames, self.stride, start, self.short_video)

    def decode(self, index: int) -> torch.Tensor:
        return read_frames(self.files[self.file_index(index)], self.frame_indices(index))

    def finish(self, raw: torch.Tensor, index: int) -> tuple[Any, int]:
        return (self.transform(raw) if self.transform is not None else raw), self.labels[self.file_index(index)]


def scan_video_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of ``root/<class>/<video>``; every class folder must hold a video."""
    if not root.is_dir():
        raise FileNotFoundError(f"Video root {root} does not exist; expected one subfolder of videos per class.")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders; expected <class>/<video> files.")
    files, labels = [], []
    for label, c in enumerate(classes):
        names = sorted(
            e.name
            for e in os.scandir(root / c)
            if e.is_file() and e.name.lower().endswith(VIDEO_EXTENSIONS) and not e.name.startswith(".")
        )
        if not names:
            raise ValueError(
                f"Class folder {root / c} contains no videos ({', '.join(VIDEO_EXTENSIONS)}); add videos or remove it."
            )
        files += [str(root / c / n) for n in names]
        labels += [label] * len(names)
    return files, labels, classes


class VideoClipDataModule(PrismaDataModule):
    """Video classification clips from ``root/<class>/<video>`` (see the module docstring for the sampling).

    The videos of each class are split by a seeded permutation into train / val / test (stratified).

    Args:
        root: Folder with one subfolder of videos per class (folder names, sorted, are the classes).
        frames: Frames per clip (T).
        stride: Take every ``stride``-th frame.
        clip_sampling: Clip choice for training: ``random`` or ``uniform``.
        val_clip_sampling: Clip choice for validation, test and predict.
        clips_per_video: Evaluation clips per video (evenly spaced with ``uniform``), each a separate sample.
        short_video: Videos shorter than a clip: ``pad`` repeats the last frame, ``loop`` wraps to frame 0.
        image_size: Side of the default transform's square output (resize shorter side + centre crop).
        transform: Callable on each clip (uint8 ``[T, C, H, W]``), e.g. a video backbone's ``preprocess()``;
            None: ``ClipToFloat(image_size)`` (float in [0, 1]).
        val_fraction: Fraction of each class's videos for validation.
        test_fraction: Fraction of each class's videos for testing.
        on_bad_video: ``skip`` unreadable / truncated videos (counted in ``n_bad_videos``, one warning) or ``raise``.
        batch_size: Clips per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the split and of the shuffle order.
    """

    accepts_backbone_transforms = True

    def __init__(
        self,
        root: str,
        frames: int = 16,
        stride: int = 2,
        clip_sampling: ClipSampling = "random",
        val_clip_sampling: ClipSampling = "uniform",
        clips_per_video: int = 1,
        short_video: ShortVideo = "pad",
        image_size: int = 224,
        transform: Callable[[torch.Tensor], Any] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        on_bad_video: OnBad = "skip",
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers, seed)
        check_positive("frames", frames)
        check_positive("stride", stride)
        check_positive("clips_per_video", clips_per_video)
        check_positive("image_size", image_size)
        check_choice("clip_sampling", clip_sampling, ("random", "uniform"))
        check_choice("val_clip_sampling", val_clip_sampling, ("random", "uniform"))
        check_choice("short_video", short_video, ("pad", "loop"))
        check_choice("on_bad_video", on_bad_video, ("skip", "raise"))
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters(ignore=["transform"])
        self.root = Path(root).expanduser()
        self.frames, self.stride, self.clips_per_video, self.short_video = frames, stride, clips_per_video, short_video
        self.clip_sampling, self.val_clip_sampling = clip_sampling, val_clip_sampling
        self.transform = transform if transform is not None else ClipToFloat(image_size)
        self.val_fraction, self.test_fraction, self.on_bad_video = val_fraction, test_fraction, on_bad_video
        self.class_names: list[str] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_bad_videos(self) -> int:
        """Unreadable videos skipped so far (all splits)."""
        return sum(d.n_bad for d in (self.train_set, self.val_set, self.test_set) if isinstance(d, FileDataset))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files, labels, self.class_names = scan_video_folder(self.root)
        rng = np.random.default_rng(self.seed)
        parts: list[list[int]] = [[], [], []]
        labels_arr = np.asarray(labels)
        for c in range(len(self.class_names)):
            members = rng.permutation(np.flatnonzero(labels_arr == c))
            n_train, n_val, _ = split_counts(len(members), self.val_fraction, self.test_fraction)
            parts[0] += members[:n_train].tolist()
            parts[1] += members[n_train : n_train + n_val].tolist()
            parts[2] += members[n_train + n_val :].tolist()

        def make(idx: list[int], sampling: ClipSampling, clips: int) -> VideoClipDataset:
            idx = sorted(idx)
            return VideoClipDataset(
                [files[i] for i in idx],
                [labels[i] for i in idx],
                self.frames,
                self.stride,
                sampling,
                clips,
                self.short_video,
                self.transform,
                self.on_bad_video,
            )

        self.train_set = make(parts[0], self.clip_sampling, 1)
        self.val_set = make(parts[1], self.val_clip_sampling, self.clips_per_video)
        self.test_set = make(parts[2], self.val_clip_sampling, self.clips_per_video)


# ---------------------------------------------------------------------------------------------- MovingSprites
def _sprite_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool sprite centred on pixel (size // 2, size // 2)."""
    half = max(2, size // 10)
    r, c = np.mgrid[:size, :size] - size // 2
    if shape == "square":
        return (np.abs(r) <= half) & (np.abs(c) <= half)
    if shape == "circle":
        return r**2 + c**2 <= half**2 + half
    # isosceles triangle pointing up: width grows linearly from the apex (row -half) to the base (row +half)
    return (r >= -half) & (r <= half) & (np.abs(c) <= (r + half) / 2)


def moving_sprite_frames(
    direction: str, shape: str, colour: Sequence[int], speed: int, start: tuple[int, int], frames: int, size: int
) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: the sprite at ``start`` (row, col) moving ``speed`` px per frame in
    ``direction`` on a wrap-around canvas."""
    check_choice("direction", direction, DIRECTIONS)
    check_choice("shape", shape, SPRITE_SHAPES)
    dr, dc = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}[direction]
    base = _sprite_mask(shape, size)
    out = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        shift = (start[0] - size // 2 + dr * speed * t, start[1] - size // 2 + dc * speed * t)
        out[t][np.roll(base, shift, axis=(0, 1))] = colour
    return out


def write_moving_sprites(
    root: str | os.PathLike,
    n_per_class: int = 32,
    frames: int = 16,
    size: int = 64,
    seed: int = 0,
    fps: int = 8,
    codec: str | None = None,
) -> list[Path]:
    """Write MovingSprites videos ``root/<direction>/<i>.mp4`` (see the module docstring); returns the paths.

    The whole folder is written beside ``root`` and renamed into place with a ``moving_sprites.json`` record of
    the settings, so an interrupted run leaves no half-written dataset. ``root`` must be missing or empty.
    """
    check_positive("n_per_class", n_per_class)
    check_positive("frames", frames)
    if size < 8 or size % 2:
        raise ValueError(f"size must be an even number >= 8 (H.264 needs even sides), got {size}.")
    root = Path(root).expanduser()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; MovingSprites is written only into a missing or empty folder.")
    codec = codec or best_video_codec()
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        rel_paths = []
        for direction in DIRECTIONS:
            (tmp / direction).mkdir()
            for i in range(n_per_class):
                hue, sat, val = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)
                colour = [int(round(255 * x)) for x in colorsys.hsv_to_rgb(hue, sat, val)]
                shape = SPRITE_SHAPES[int(rng.integers(len(SPRITE_SHAPES)))]
                speed = int(rng.integers(1, 4))
                start = (int(rng.integers(size)), int(rng.integers(size)))
                video = moving_sprite_frames(direction, shape, colour, speed, start, frames, size)
                rel = Path(direction) / f"{i:05d}.mp4"
                write_video(tmp / rel, video, fps=fps, codec=codec)
                rel_paths.append(rel)
        settings = _moving_sprites_settings(n_per_class, frames, size, seed, fps, codec)
        with atomic_path(tmp / _MARKER) as marker:
            marker.write_text(json.dumps(settings, indent=2))
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [root / rel for rel in rel_paths]


def _moving_sprites_settings(n_per_class: int, frames: int, size: int, seed: int, fps: int, codec: str) -> dict:
    return {
        "n_per_class": n_per_class,
        "frames": frames,
        "size": size,
        "seed": seed,
        "fps": fps,
        "codec": codec,
        "version": _GENERATOR_VERSION,
    }


class MovingSpritesDataModule(VideoClipDataModule):
    """MovingSprites video classification (direction of motion), generated into ``root`` on first use.

    Args:
        root: Dataset folder; written by ``prepare_data`` when missing or empty.
        n_per_class: Videos per direction.
        video_frames: Frames per generated video.
        size: Side of the generated videos in pixels (even).
        fps: Frame rate written into the files.
        generate_seed: Seed of the generated videos (independent of ``seed``, which sets the split).
        frames: Frames per clip (T).
        stride: Take every ``stride``-th frame.
        clip_sampling: Clip choice for training: ``random`` or ``uniform``.
        val_clip_sampling: Clip choice for validation, test and predict.
        clips_per_video: Evaluation clips per video.
        short_video: Videos shorter than a clip: ``pad`` repeats the last frame, ``loop`` wraps to frame 0.
        image_size: Side of the default transform's output; None keeps ``size``.
        transform: Callable on each clip (uint8 ``[T, C, H, W]``); None: ``ClipToFloat(image_size)``.
        val_fraction: Fraction of each class's videos for validation.
        test_fraction: Fraction of each class's videos for testing.
        on_bad_video: ``skip`` or ``raise`` on unreadable videos.
        batch_size: Clips per batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin batches in page-locked memory; None pins when CUDA is available.
        persistent_workers: Keep worker processes alive between epochs.
        seed: Seed of the split and of the shuffle order.
    """

    def __init__(
        self,
        root: str = "data/moving_sprites",
        n_per_class: int = 32,
        video_frames: int = 16,
        size: int = 64,
        fps: int = 8,
        generate_seed: int = 0,
        frames: int = 8,
        stride: int = 2,
        clip_sampling: ClipSampling = "random",
        val_clip_sampling: ClipSampling = "uniform",
        clips_per_video: int = 1,
        short_video: ShortVideo = "pad",
        image_size: int | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        val_fraction: float = 0.125,
        test_fraction: float = 0.125,
        on_bad_video: OnBad = "skip",
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            frames,
            stride,
            clip_sampling,
            val_clip_sampling,
            clips_per_video,
            short_video,
            image_size if image_size is not None else size,
            transform,
            val_fraction,
            test_fraction,
            on_bad_video,
            batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            seed,
        )
        self.save_hyperparameters(ignore=["transform"])
        check_positive("n_per_class", n_per_class)
        check_positive("video_frames", video_frames)
        self.n_per_class, self.video_frames, self.size = n_per_class, video_frames, size
        self.fps, self.generate_seed = fps, generate_seed

    def prepare_data(self) -> None:
        """Generate the videos when ``root`` is missing or empty; check the settings of an existing dataset."""
        marker = self.root / _MARKER
        if marker.is_file():
            found = json.loads(marker.read_text())
            wanted = _moving_sprites_settings(
                self.n_per_class, self.video_frames, self.size, self.generate_seed, self.fps, found.get("codec", "")
            )
            if found != wanted:
                raise ValueError(
                    f"{self.root} holds MovingSprites generated with {found}, not with the requested {wanted}; "
                    "delete the folder to regenerate it or point root elsewhere."
                )
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(
                f"{self.root} is not empty and has no {_MARKER}, so it is not a MovingSprites dataset; point root "
                "to a missing or empty folder (or use VideoClipDataModule for your own videos)."
            )
        write_moving_sprites(self.root, self.n_per_class, self.video_frames, self.size, self.generate_seed, self.fps)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op once the data exists (prepare_data already ran under a Trainer)
        super().setup(stage)
