"""ImageNet folders (real JPEG / PNG files) and video clips (real MP4 files written with PyAV), with bad files."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prisma_lightning.datamodules import (
    ImageNetDataModule,
    MovingSpritesDataModule,
    UnreadableFileError,
    VideoClipDataModule,
    write_moving_sprites,
    write_video,
)
from prisma_lightning.datamodules.imagenet import ImageFileDataset, load_rgb
from prisma_lightning.datamodules.video import (
    DIRECTIONS,
    VideoClipDataset,
    clip_indices,
    clip_starts,
    count_frames,
    read_frames,
)

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"n01440764": (220, 30, 30), "n01443537": (30, 220, 30), "n01484850": (30, 30, 220)}


def _plain() -> object:
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    for split, n in (("train", 4), ("val", 2)):
        for synset, colour in COLOURS.items():
            for i in range(n):
                _jpeg(root / split / synset / f"{synset}_{i}.JPEG", colour)
    return root


def _channel_of(x: torch.Tensor) -> int:
    return int(x.mean(dim=(-2, -1)).argmax())


# ---------------------------------------------------------------------------------------------- ImageNet
def test_imagefolder_layout_labels_and_default_transform(imagefolder) -> None:
    dm = ImageNetDataModule(str(imagefolder), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == sorted(COLOURS) and dm.num_classes == 3
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6 and dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert [_channel_of(img) for img in x] == y.tolist()  # class k is the image with colour channel k
    # ImageNet normalisation: a 220 red channel becomes (220/255 - 0.485) / 0.229
    x, y = dm.val_set[0]
    assert y == 0 and abs(float(x[0].mean()) - (220 / 255 - 0.485) / 0.229) < 0.05

    limited = ImageNetDataModule(str(imagefolder), limit_train=5, limit_val=2, num_workers=0, seed=1)
    limited.setup("fit")
    again = ImageNetDataModule(str(imagefolder), limit_train=5, limit_val=2, num_workers=0, seed=1)
    again.setup("fit")
    assert len(limited.train_set) == 5 and len(limited.val_set) == 2
    assert limited.train_set.files == again.train_set.files


def test_flat_kaggle_validation_layout(tmp_path) -> None:
    kaggle = tmp_path / "kaggle"
    root = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    synsets = ["n01484850", "n01440764", "n01443537", "n01491361"]  # deliberately unsorted in the mapping file
    names = ["great white shark, white shark", "tench, Tinca tinca", "goldfish, Carassius auratus", "tiger shark"]
    (kaggle / "LOC_synset_mapping.txt").parent.mkdir(parents=True)
    (kaggle / "LOC_synset_mapping.txt").write_text("".join(f"{s} {n}\n" for s, n in zip(synsets, names, strict=True)))
    rows = ["ImageId,PredictionString"]
    for i, synset in enumerate(["n01443537", "n01484850", "n01440764", "n01443537", "n01491361"]):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        _jpeg(root / "val" / f"{image_id}.JPEG", COLOURS.get(synset, (128, 128, 128)))
        rows.append(f"{image_id},{synset} 10 20 30 40 {synset} 1 2 3 4")
    _jpeg(root / "val" / "ILSVRC2012_test_00000001.JPEG", (0, 0, 0))  # unlabelled: not used
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")

    dm = ImageNetDataModule(str(root), val_transform=_plain(), num_workers=0, batch_size=8)
    dm.setup("validate")
    assert dm.synsets == sorted(synsets)
    assert dm.class_names == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert [Path(f).stem[-1] for f in dm.val_set.files] == ["1", "2", "3", "4", "5"]
    assert dm.val_set.labels == [1, 2, 0, 1, 3]
    x, y = next(iter(dm.predict_dataloader()))
    assert x.shape == (5, 3, 30, 40) and [_channel_of(img) for img in x[:4]] == [1, 2, 0, 1]

    no_csv = tmp_path / "flat"
    _jpeg(no_csv / "val" / "a.JPEG", (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageNetDataModule(str(no_csv), num_workers=0).setup("validate")


def test_corrupt_images_skipped_with_one_warning(imagefolder) -> None:
    good = (imagefolder / "train" / "n01440764" / "n01440764_0.JPEG").read_bytes()
    (imagefolder / "train" / "n01440764" / "bad.JPEG").write_bytes(b"this is not a jpeg" * 10)
    (imagefolder / "train" / "n01443537" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    dm = ImageNetDataModule(str(imagefolder), train_transform=_plain(), num_workers=0)
    dm.setup("fit")
    ds = dm.train_set
    assert len(ds) == 14
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]  # two epochs
    ours = [w for w in caught if "unreadable image" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert dm.n_bad_images == ds.n_bad == 2
    assert sorted(Path(f).name for f in ds.bad_files) == ["bad.JPEG", "truncated.JPEG"]
    assert all(x.shape == (3, 30, 40) for x, _ in samples)
    # every sample served for a bad file is the next good one, with that image's own label
    assert all(_channel_of(x) == y for x, y in samples)

    clone = pickle.loads(pickle.dumps(ds))  # e.g. a deepcopy of the DataModule: keeps its own copy of the record
    assert clone.n_bad == 2 and clone.bad_files == ds.bad_files

    with pytest.raises(UnreadableFileError, match="bad.JPEG"):
        raising = ImageNetDataModule(str(imagefolder), on_bad_image="raise", num_workers=0)
        raising.setup("fit")
        for i in range(len(raising.train_set)):
            raising.train_set[i]


def test_bad_image_count_is_shared_by_dataloader_workers(imagefolder) -> None:
    for i in range(3):
        (imagefolder / "train" / "n01484850" / f"bad{i}.JPEG").write_bytes(b"\x00" * 100)
    dm = ImageNetDataModule(str(imagefolder), train_transform=_plain(), num_workers=2, batch_size=3)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_samples = sum(len(y) for _, y in dm.train_dataloader())
    assert n_samples == 15 and dm.n_bad_images == 3  # counted in the workers, visible in the main process


def test_image_modes_converted_to_rgb(tmp_path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((4, 4), 77, np.uint8), mode="L").save(gray)
    rgba = tmp_path / "rgba.png"
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (0, 0, 255, 0)  # fully transparent blue -> white background
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(arr, mode="RGBA").save(rgba)
    deep = tmp_path / "deep.png"
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(values).save(deep)
    assert Image.open(deep).mode.startswith("I")  # really a 16-bit file
    palette = tmp_path / "palette.png"
    Image.new("RGB", (2, 2), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)

    np.testing.assert_array_equal(np.asarray(load_rgb(str(gray))), np.full((4, 4, 3), 77))
    got = np.asarray(load_rgb(str(rgba)))
    np.testing.assert_array_equal(got[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(got[0, 1], [255, 255, 255])
    assert np.abs(got[0, 2].astype(int) - 127).max() <= 1
    got = np.asarray(load_rgb(str(deep)))
    assert got.dtype == np.uint8 and got.shape == (1, 5, 3)
    np.testing.assert_array_equal(got[0, :, 0], [0, 1, 4, 128, 255])  # scaled by 255/65535, not clipped
    assert (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(np.asarray(load_rgb(str(palette)))[0, 0], [10, 200, 30])

    ds = ImageFileDataset([str(gray), str(rgba), str(deep)], [0, 1, 2], transform=_plain())
    assert [tuple(ds[i][0].shape[:1]) for i in range(3)] == [(3,)] * 3


def test_missing_root_and_empty_class_folder(tmp_path, imagefolder) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetDataModule(str(missing), num_workers=0).setup("fit")
    (imagefolder / "train" / "n09999999").mkdir()
    (imagefolder / "train" / "n09999999" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"n09999999 contains no images"):
        ImageNetDataModule(str(imagefolder), num_workers=0).setup("fit")
    shutil.rmtree(imagefolder / "train")
    with pytest.raises(FileNotFoundError, match="Training folder .*train does not exist"):
        ImageNetDataModule(str(imagefolder), num_workers=0).setup("fit")
    val_only = ImageNetDataModule(str(imagefolder), num_workers=0)
    val_only.setup("validate")  # validating needs no training folder
    assert len(val_only.val_set) == 6


# ---------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video") / "moving_sprites"
    write_moving_sprites(root, n_per_class=3, frames=12, size=32, seed=0, fps=8)
    return root


def _circular_centroid(clip: torch.Tensor, axis: int) -> torch.Tensor:
    """[T] centroid of the intensity along rows (axis 0) or columns (1) on the wrap-around canvas."""
    weights = clip.sum(dim=2 if axis == 0 else 1)  # [T, n]
    n = weights.shape[1]
    phase = torch.exp(2j * torch.pi * torch.arange(n) / n)
    return torch.angle((weights * phase).sum(1)) * n / (2 * torch.pi)


def _motion(clip: torch.Tensor, axis: int) -> float:
    """Mean per-frame displacement (wrapped) of a [T, C, H, W] clip along an axis."""
    centroid = _circular_centroid(clip.float().mean(1), axis)
    n = clip.shape[-2] if axis == 0 else clip.shape[-1]
    return float((torch.remainder(centroid.diff() + n / 2, n) - n / 2).mean())


def test_moving_sprites_are_real_mp4_files(sprites) -> None:
    import av

    files = sorted(sprites.glob("*/*.mp4"))
    assert [p.parent.name for p in files] == [d for d in DIRECTIONS for _ in range(3)]
    for path in files:
        assert path.read_bytes()[4:8] == b"ftyp"  # an ISO media (MP4) file
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name in ("h264", "mpeg4")
            assert (stream.width, stream.height) == (32, 32)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(frames) == 12 == count_frames(path)
        assert max(f.max() for f in frames) > 150 and min(np.median(f) for f in frames) < 10  # sprite on black
    settings = json.loads((sprites / "moving_sprites.json").read_text())
    assert settings["n_per_class"] == 3 and settings["frames"] == 12
    with pytest.raises(FileExistsError, match="not empty"):
        write_moving_sprites(sprites, n_per_class=1)


def test_moving_sprites_direction_is_recoverable_from_motion_only(sprites) -> None:
    expected = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}
    first_positions = {d: [] for d in DIRECTIONS}
    for path in sorted(sprites.glob("*/*.mp4")):
        clip = read_frames(path, list(range(12)))
        d_row, d_col = _motion(clip, 0), _motion(clip, 1)
        want = expected[path.parent.name]
        assert np.sign(round(d_row, 1)) == want[0] and np.sign(round(d_col, 1)) == want[1], (path, d_row, d_col)
        assert 0.8 < abs(d_row + d_col) < 3.2  # 1-3 px per frame
        first_positions[path.parent.name].append(float(_circular_centroid(clip[:1].float().mean(1), 1)[0]))
    # start positions differ within a class: a single frame does not give the direction away
    assert all(np.ptp(v) > 1 for v in first_positions.values())


def test_video_clip_batches(sprites) -> None:
    dm = VideoClipDataModule(
        str(sprites), frames=4, stride=2, image_size=16, val_fraction=0.34, test_fraction=0.0, batch_size=4
    )
    dm.setup("fit")
    assert dm.class_names == list(DIRECTIONS) and dm.num_classes == 4
    assert len(dm.train_set) == 8 and len(dm.val_set) == 4 and len(dm.test_set) == 0
    assert sorted(dm.val_set.labels) == [0, 1, 2, 3]  # stratified
    assert not set(dm.train_set.files) & set(dm.val_set.files)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 4, 3, 16, 16) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and y.max() < 4
    x, y = next(iter(dm.val_dataloader()))
    for clip, label in zip(x, y, strict=True):  # direction still readable after resizing
        axis = 0 if DIRECTIONS[label] in ("down", "up") else 1
        sign = 1 if DIRECTIONS[label] in ("down", "right") else -1
        assert sign * _motion(clip, axis) > 0.3


def test_clip_frame_indices(tmp_path) -> None:
    path = tmp_path / "ramp" / "ramp.mp4"
    levels = 20 + 10 * np.arange(20)  # frame i has grey level 20 + 10 i
    write_video(path, np.broadcast_to(levels[:, None, None, None], (20, 16, 16, 3)).astype(np.uint8), fps=10)

    def decoded_indices(ds: VideoClipDataset, i: int = 0) -> list[int]:
        clip = ds.decode(i).float().mean(dim=(1, 2, 3))
        return [int(round((v - 20) / 10)) for v in clip.tolist()]

    uniform = VideoClipDataset([str(path)], [0], frames=4, stride=3, sampling="uniform")
    assert uniform.frame_indices(0) == [5, 8, 11, 14] == decoded_indices(uniform)  # centred: span 10 of 20
    multi = VideoClipDataset([str(path)], [0], frames=4, stride=3, sampling="uniform", clips_per_video=3)
    assert len(multi) == 3 and [multi.frame_indices(j)[0] for j in range(3)] == [0, 5, 10]
    assert decoded_indices(multi, 2) == [10, 13, 16, 19]
    random = VideoClipDataset([str(path)], [0], frames=4, stride=3, sampling="random")
    torch.manual_seed(0)
    starts = set()
    for _ in range(30):
        got = decoded_indices(random)
        assert np.diff(got).tolist() == [3, 3, 3] and 0 <= got[0] <= 10
        starts.add(got[0])
    assert len(starts) > 4
    pad = VideoClipDataset([str(path)], [0], frames=8, stride=4, sampling="uniform", short_video="pad")
    assert decoded_indices(pad) == [0, 4, 8, 12, 16, 19, 19, 19]
    loop = VideoClipDataset([str(path)], [0], frames=8, stride=4, sampling="uniform", short_video="loop")
    assert decoded_indices(loop) == [0, 4, 8, 12, 16, 0, 4, 8]
    assert clip_indices(20, 3, 5, 4) == [4, 9, 14] and clip_starts(20, 3, 5, "uniform", 2) == [0, 9]


def test_truncated_video_skipped_or_raises(sprites, tmp_path) -> None:
    root = tmp_path / "videos"
    for label in ("left", "right"):
        (root / label).mkdir(parents=True)
        for src in sorted((sprites / label).glob("*.mp4"))[:2]:
            shutil.copy(src, root / label / src.name)
    data = (root / "right" / "00000.mp4").read_bytes()
    (root / "right" / "00000.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: lost
    import av

    with av.open(str(root / "left" / "00000.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        for i in range(12):
            frame = np.full((32, 32, 3), 10 * i, np.uint8)
            c.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(stream.encode(None))
    data = (root / "left" / "00000.mp4").read_bytes()
    (root / "left" / "00000.mp4").write_bytes(data[: len(data) * 2 // 3])  # opens, but frames are missing
    assert count_frames(root / "left" / "00000.mp4") == 12

    dm = VideoClipDataModule(str(root), frames=12, stride=1, image_size=32, val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert len([w for w in caught if "unreadable video" in str(w.message)]) == 1
    assert dm.n_bad_videos == 2 and all(x.shape == (12, 3, 32, 32) for x, _ in clips)
    assert sorted(Path(p).parent.name for p in dm.train_set.bad_files) == ["left", "right"]

    raising = VideoClipDataModule(str(root), frames=12, image_size=32, val_fraction=0.0, on_bad_video="raise")
    raising.setup("fit")
    with pytest.raises(UnreadableFileError, match=r"00000\.mp4"):
        for i in range(len(raising.train_set)):
            raising.train_set[i]


def test_moving_sprites_datamodule_generates_once(tmp_path) -> None:
    root = tmp_path / "ms"
    dm = MovingSpritesDataModule(str(root), n_per_class=2, video_frames=6, size=16, frames=3, stride=2, batch_size=8)
    dm.prepare_data()
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.mp4")}
    assert len(mtimes) == 8
    dm.setup("fit")  # does not regenerate
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.mp4")} == mtimes
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="generated with"):
        MovingSpritesDataModule(str(root), n_per_class=3, video_frames=6, size=16).prepare_data()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        MovingSpritesDataModule(str(tmp_path / "mine")).prepare_data()


# ---------------------------------------------------------------------------------------------- YAML
def _cli(yaml_name: str, root: Path, tmp_path: Path, monkeypatch, *extra: str):
    from prisma_lightning.cli import PrismaCLI

    monkeypatch.setattr("sys.argv", ["prisma"])  # pytest's own arguments are not the CLI's
    args = ["--data", str(ROOT / "datamodules" / yaml_name), "--data.init_args.root", str(root), *extra]
    args += ["--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--seed_everything", "0"]
    return PrismaCLI(run=False, args=args)


def test_imagenet_yaml(imagefolder, tmp_path, monkeypatch) -> None:
    cli = _cli("imagenet.yaml", imagefolder, tmp_path, monkeypatch, "--data.init_args.num_workers", "0")
    dm = cli.datamodule
    assert isinstance(dm, ImageNetDataModule) and dm.on_bad_image == "skip"
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 1, 1, 2, 2]


def test_video_clips_yaml(sprites, tmp_path, monkeypatch) -> None:
    extra = ("--data.init_args.num_workers", "0", "--data.init_args.frames", "4", "--data.init_args.image_size", "32")
    cli = _cli("video_clips.yaml", sprites, tmp_path, monkeypatch, *extra)
    dm = cli.datamodule
    assert isinstance(dm, VideoClipDataModule) and dm.stride == 2 and dm.clip_sampling == "random"
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 4, 3, 32, 32) and y.max() < 4
