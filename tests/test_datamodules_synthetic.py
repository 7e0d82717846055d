"""dSprites and ViT-Prisma's induction / polygenic / circle datasets: grids, rendering, labels, splits, YAML."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prisma_lightning.datamodules import DSpritesDataModule, DSpritesGrid, InductionDataModule
from prisma_lightning.datamodules.dsprites import LATENT_NAMES, SHAPES
from prisma_lightning.datamodules.induction import PATTERNS, STAMPS, circle_dot_pixels, enumerate_configs

ROOT = Path(__file__).resolve().parents[1]
FULL = DSpritesGrid()
TINY = DSpritesGrid(n_scales=2, n_orientations=4, n_pos=4)


def _index(shape=0, scale=5, orientation=0, pos_x=16, pos_y=16, grid=FULL) -> int:
    return int(grid.index(np.array([[0, shape, scale, orientation, pos_x, pos_y]]))[0])


def _centroid(img: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(img)
    return float(rows.mean()), float(cols.mean())


# ---------------------------------------------------------------------------------------------- dSprites
def test_dsprites_grid_matches_deepmind_file_layout() -> None:
    assert len(FULL) == 737_280 == 3 * 6 * 40 * 32 * 32
    assert FULL.sizes == (1, 3, 6, 40, 32, 32)
    # C order over (color, shape, scale, orientation, posX, posY): posY varies fastest.
    strides = {"posY": 1, "posX": 32, "orientation": 1024, "scale": 40 * 1024, "shape": 6 * 40 * 1024}
    for name, stride in strides.items():
        expected = np.zeros(6, dtype=np.int64)
        expected[LATENT_NAMES.index(name)] = 1
        np.testing.assert_array_equal(FULL.latents_classes([stride])[0], expected)
    np.testing.assert_array_equal(FULL.latents_classes([737_279])[0], [0, 2, 5, 39, 31, 31])
    values = FULL.latents_values([0, 737_279])
    np.testing.assert_allclose(values[0], [1, 1, 0.5, 0, 0, 0])
    np.testing.assert_allclose(values[1], [1, 3, 1.0, 2 * math.pi, 1, 1])
    np.testing.assert_allclose(FULL.values("scale"), np.linspace(0.5, 1, 6))
    np.testing.assert_allclose(FULL.values("orientation")[1], 2 * math.pi / 39)
    idx = np.random.default_rng(0).choice(len(FULL), 1000, replace=False)
    np.testing.assert_array_equal(FULL.index(FULL.latents_classes(idx)), idx)


def test_dsprites_rendering_is_deterministic_and_binary() -> None:
    idx = np.random.default_rng(1).choice(len(FULL), 256, replace=False)
    a, b = FULL.render(idx), FULL.render(idx[::-1])[::-1]
    assert a.dtype == bool and a.shape == (256, 64, 64)
    np.testing.assert_array_equal(a, b)  # independent of the batch it is rendered in
    assert a.reshape(256, -1).sum(1).min() > 20  # every sprite is visible, even the smallest at the border


def test_dsprites_shapes_are_distinguishable_and_rotation_keeps_area() -> None:
    counts = {s: int(FULL.render([_index(shape=i)])[0].sum()) for i, s in enumerate(SHAPES)}
    assert counts["square"] > 1.15 * counts["ellipse"] > 1.15**2 * counts["heart"], counts
    for i in range(3):  # the same holds at every orientation and at the smallest scale
        small = [int(FULL.render([_index(shape=s, scale=0, orientation=i * 7)])[0].sum()) for s in range(3)]
        assert small[0] > small[1] > small[2], small
    square = FULL.render([_index(shape=0, orientation=o) for o in range(40)]).reshape(40, -1).sum(1)
    assert abs(square / square[0] - 1).max() < 0.06, square  # rotating does not change the area
    assert len(set(square.tolist())) > 1  # ... but does change the pixels
    rotated = FULL.render([_index(shape=1, orientation=0), _index(shape=1, orientation=10)])
    assert (rotated[0] != rotated[1]).sum() > 40  # a quarter turn of the ellipse moves many pixels
    scales = [int(FULL.render([_index(shape=0, scale=s)])[0].sum()) for s in range(6)]
    assert scales == sorted(scales) and scales[-1] > 3 * scales[0]


def test_dsprites_heart_is_upright_and_orientation_turns_counter_clockwise() -> None:
    upright, quarter = FULL.render([_index(shape=2, orientation=0), _index(shape=2, orientation=10)])  # 0, ~92 deg
    rows, cols = np.nonzero(upright)
    mid_r = (rows.min() + rows.max()) / 2
    assert (rows < mid_r).sum() > 1.3 * (rows > mid_r).sum()  # lobes on top, tip at the bottom
    rows, cols = np.nonzero(quarter)
    mid_c = (cols.min() + cols.max()) / 2
    assert (cols < mid_c).sum() > 1.3 * (cols > mid_c).sum()  # turned left: the tip now points right


def test_dsprites_positions_move_the_centroid_monotonically() -> None:
    along_x = [_centroid(FULL.render([_index(shape=2, pos_x=p, pos_y=10)])[0]) for p in range(32)]
    along_y = [_centroid(FULL.render([_index(shape=1, pos_x=20, pos_y=p)])[0]) for p in range(32)]
    cols_x = np.array([c for _, c in along_x])
    rows_y = np.array([r for r, _ in along_y])
    assert (np.diff(cols_x) > 0).all() and (np.diff(rows_y) > 0).all()
    assert np.ptp([r for r, _ in along_x]) < 0.6 and np.ptp([c for _, c in along_y]) < 0.6
    assert cols_x[0] < 12 and cols_x[-1] > 52  # the positions span most of the canvas


def test_dsprites_targets_splits_and_options() -> None:
    for target in ("shape", "scale", "orientation", "posX", "posY"):
        dm = DSpritesDataModule(target=target, cache=False, subset_size=600, batch_size=50, seed=3)
        dm.setup()
        col = LATENT_NAMES.index(target)
        for ds in (dm.train_set, dm.val_set, dm.test_set):
            np.testing.assert_array_equal(ds.labels, FULL.latents_classes(ds.indices)[:, col])
        assert dm.num_classes == FULL.sizes[col] == len(dm.class_names)
    sets = [set(d.indices.tolist()) for d in (dm.train_set, dm.val_set, dm.test_set)]
    assert [len(s) for s in sets] == [480, 60, 60]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    again = DSpritesDataModule(target="posY", cache=False, subset_size=600, seed=3)
    again.setup()
    np.testing.assert_array_equal(again.val_set.indices, dm.val_set.indices)
    other = DSpritesDataModule(target="posY", cache=False, subset_size=600, seed=4)
    other.setup()
    assert set(other.val_set.indices.tolist()) != sets[1]

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(x.unique().tolist()) == {0.0, 1.0}
    img, label = dm.train_set[7]
    np.testing.assert_array_equal(img[0].numpy(), FULL.render([dm.train_set.indices[7]])[0])
    assert label == int(FULL.latents_classes([dm.train_set.indices[7]])[0, 5])

    rgb = DSpritesDataModule(cache=False, subset_size=100, channels=3, image_size=32, transform=lambda t: 2 * t)
    rgb.setup()
    img, _ = rgb.val_set[0]
    assert img.shape == (3, 32, 32) and torch.equal(img[0], img[2]) and 1.0 < img.max() <= 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "color"}, "target must be one of"),
        ({"channels": 2}, "channels must be one of"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "so that training data remains"),
        ({"subset_size": 0}, "subset_size must be"),
    ],
)
def test_dsprites_rejects_bad_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DSpritesDataModule(cache=False, **kwargs)


def test_dsprites_cache_equals_lazy_rendering(tmp_path) -> None:
    cached = DSpritesDataModule(cache=True, cache_dir=str(tmp_path), grid=TINY, val_fraction=0.25, seed=1)
    cached.prepare_data()
    files = list(tmp_path.iterdir())
    assert files == [cached.cache_file]  # no temporary files left behind
    packed = np.load(cached.cache_file, mmap_mode="r")
    assert packed.shape == (len(TINY), 512) and packed.dtype == np.uint8
    mtime = cached.cache_file.stat().st_mtime_ns
    cached.setup()
    assert cached.cache_file.stat().st_mtime_ns == mtime  # not rewritten
    lazy = DSpritesDataModule(cache=False, grid=TINY, val_fraction=0.25, seed=1)
    lazy.setup()
    assert len(cached.train_set) + len(cached.val_set) + len(cached.test_set) == len(TINY) == 384
    np.testing.assert_array_equal(cached.val_set.indices, lazy.val_set.indices)
    for a, b in ((cached.train_set, lazy.train_set), (cached.val_set, lazy.val_set)):
        items = list(range(len(b)))
        got, want = a.__getitems__(items), b.__getitems__(items)
        assert all(torch.equal(x[0], z[0]) and x[1] == z[1] for x, z in zip(got, want, strict=True))
    np.testing.assert_array_equal(np.unpackbits(packed[5], count=4096).reshape(64, 64), TINY.render([5])[0])


@pytest.mark.parametrize("compressed", [True, False])
def test_dsprites_reads_npz_in_deepmind_format(tmp_path, compressed) -> None:
    rng = np.random.default_rng(0)
    imgs = (rng.random((len(TINY), 64, 64)) < 0.1).astype(np.uint8)  # not renderings: proves the file is read
    arrays = {
        "imgs": imgs,
        "latents_values": TINY.latents_values(np.arange(len(TINY))),
        "latents_classes": TINY.latents_classes(np.arange(len(TINY))),
        "metadata": np.array({"description": "pickled object, must never be loaded"}, dtype=object),
    }
    path = tmp_path / "dsprites_ndarray_tiny.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    for cache in (False, True):
        dm = DSpritesDataModule(path=str(path), cache=cache, cache_dir=str(tmp_path / "cache"), target="posX")
        dm.prepare_data()
        dm.setup()
        assert dm.grid == TINY and dm.num_classes == 4
        ds = dm.val_set
        for i in range(len(ds)):
            img, label = ds[i]
            np.testing.assert_array_equal(img[0].numpy(), imgs[ds.indices[i]])
            assert label == arrays["latents_classes"][ds.indices[i], 4]
    cache_files = list((tmp_path / "cache").glob("*.npy"))
    assert len(cache_files) == (1 if compressed else 0)  # an uncompressed member is memory-mapped in place


# ---------------------------------------------------------------------------------------------- induction
def _objects(img: np.ndarray) -> tuple[bool, list[tuple[int, int]]]:
    """(vertical, centre of each shape in reading order) recovered from a rendered image."""
    rows, cols = np.nonzero(img)
    vertical = np.ptp(rows) > 4
    along = rows if vertical else cols
    coords = np.unique(along)
    breaks = np.flatnonzero(np.diff(coords) > 1)
    groups = np.split(coords, breaks + 1)
    centres = []
    for g in groups:
        sel = np.isin(along, g)
        centres.append(((rows[sel].min() + rows[sel].max()) // 2, (cols[sel].min() + cols[sel].max()) // 2))
    return vertical, centres


def _crop(img: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    r, c = centre
    return img[r - 2 : r + 3, c - 2 : c + 3]


def test_induction_labels_recomputed_from_images() -> None:
    dm = InductionDataModule(variant="induction", n_train=400, n_val=200, n_test=200)
    dm.setup()
    assert dm.class_names == ["vertical-same", "vertical-different", "horizontal-same", "horizontal-different"]
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            x, label = ds[i]
            assert x.shape == (1, 32, 32)
            img = x[0].numpy() > 0
            vertical, centres = _objects(img)
            assert len(centres) == 2
            (r0, c0), (r1, c1) = centres
            assert (r1 - r0, c1 - c0) == ((7, 0) if vertical else (0, 7))  # 7 px apart in the right direction
            same = np.array_equal(_crop(img, centres[0]), _crop(img, centres[1]))
            assert label == (0 if same else 1) + (0 if vertical else 2)


def test_polygenic_labels_recomputed_from_images() -> None:
    dm = InductionDataModule(variant="polygenic", n_train=240, n_val=120, n_test=12)
    dm.setup()
    assert dm.num_classes == 12 and dm.image_size == 64
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            x, label = ds[i]
            img = x[0].numpy() > 0
            vertical, centres = _objects(img)
            assert len(centres) == 4
            steps = {(b[0] - a[0], b[1] - a[1]) for a, b in zip(centres, centres[1:], strict=False)}
            assert steps == {(7, 0) if vertical else (0, 7)}
            crops = [_crop(img, c) for c in centres]
            first_seen: list[np.ndarray] = []
            pattern = ""
            for crop in crops:
                match = [j for j, seen in enumerate(first_seen) if np.array_equal(seen, crop)]
                if not match:
                    first_seen.append(crop)
                pattern += "AB"[match[0] if match else len(first_seen) - 1]
            assert label == PATTERNS.index(pattern) + (6 if vertical else 0), (pattern, vertical, label)


def test_circle_labels_are_sum_mod_60() -> None:
    dm = InductionDataModule(variant="circle", n_train=600, n_val=300, n_test=300, channels=3)
    dm.setup()
    rows, cols = circle_dot_pixels()
    radius = np.hypot(rows + 0.5 - 16, cols + 0.5 - 16)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 60 and np.abs(radius - 15.5).max() < 1.0
    dot_of = {(r, c): k for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True))}
    for ds in (dm.train_set, dm.test_set):
        for i in range(len(ds)):
            x, label = ds[i]
            assert x.shape == (3, 32, 32) and torch.equal(x[0], x[1])
            img = x[0].numpy()
            grey = [dot_of[(r, c)] for r, c in np.argwhere(np.isclose(img, 128 / 255))]
            assert len(grey) == 2 and (img == 0).sum() == 58 and (img == 1).sum() == 32 * 32 - 60
            assert label == sum(grey) % 60
    angle = np.degrees(np.arctan2(rows + 0.5 - 16, cols + 0.5 - 16)) % 360
    assert np.abs((angle - 6 * np.arange(60) + 180) % 360 - 180).max() < 4  # dot k at 6k degrees


@pytest.mark.parametrize("variant, n_classes", [("induction", 4), ("polygenic", 12), ("circle", 60)])
def test_induction_splits_balanced_disjoint_and_seeded(variant, n_classes) -> None:
    dm = InductionDataModule(variant=variant, seed=5)
    dm.setup()
    configs = enumerate_configs(variant)
    sets = [set(d.indices.tolist()) for d in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        counts = np.bincount(ds.labels, minlength=n_classes)
        assert counts.min() > 0 and counts.max() - counts.min() <= 1
        np.testing.assert_array_equal(ds.labels, configs["label"][ds.indices])
    again = InductionDataModule(variant=variant, seed=5)
    again.setup()
    np.testing.assert_array_equal(again.train_set.indices, dm.train_set.indices)
    other = InductionDataModule(variant=variant, seed=6)
    other.setup()
    assert set(other.val_set.indices.tolist()) != sets[1]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == ((1, 64, 64) if variant == "polygenic" else (1, 32, 32)) and y.max() < n_classes
    with pytest.raises(ValueError, match="distinct"):
        InductionDataModule(variant=variant, n_train=len(configs["label"]) + 1).setup()


def test_induction_matches_vit_prisma_shapes() -> None:
    # ViT-Prisma's draw functions: circle of radius 2 (13 px), 5-px vertical line, X (9 px), 5-px diagonal.
    assert [int(s.sum()) for s in STAMPS] == [13, 5, 9, 5]
    assert STAMPS[1][:, 2].all() and STAMPS[3].diagonal().all()


# ---------------------------------------------------------------------------------------------- YAML
def _cli(yaml_name: str, *extra: str, tmp_path: Path, monkeypatch):
    from prisma_lightning.cli import PrismaCLI

    monkeypatch.setattr("sys.argv", ["prisma"])  # pytest's own arguments are not the CLI's
    args = ["--data", str(ROOT / "datamodules" / yaml_name), *extra]
    args += ["--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--seed_everything", "0"]
    return PrismaCLI(run=False, args=args)


def test_dsprites_yaml(tmp_path, monkeypatch) -> None:
    extra = ("--data.init_args.cache", "false", "--data.init_args.subset_size", "300")
    cli = _cli("dsprites.yaml", *extra, tmp_path=tmp_path, monkeypatch=monkeypatch)
    dm = cli.datamodule
    assert isinstance(dm, DSpritesDataModule) and dm.target == "shape" and not dm.cache
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (30, 1, 64, 64) and y.max() < 3


def test_induction_yaml(tmp_path, monkeypatch) -> None:
    cli = _cli("induction.yaml", "--data.init_args.variant", "circle", tmp_path=tmp_path, monkeypatch=monkeypatch)
    dm = cli.datamodule
    assert isinstance(dm, InductionDataModule) and dm.variant == "circle"
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 32, 32) and y.max() < 60


def test_sprite_images_match_the_documented_geometry() -> None:
    """Facts from the dSprites module's documentation, not from its renderer: a square of side
    ``SPRITE_SIZE * scale``, a 2:1 ellipse, an upright heart, centres spanning ``POS_RANGE``, counter-clockwise
    orientation, nothing clipped at the borders."""
    from prisma_lightning.datamodules import sprite_images
    from prisma_lightning.datamodules.dsprites import CANVAS, POS_RANGE, SPRITE_SIZE

    lo, hi = POS_RANGE

    def render(shape: int, **kw) -> np.ndarray:
        img = sprite_images([shape], **{"orientation": 0.0, **kw})
        assert img.shape == (1, 1, CANVAS, CANVAS) and set(img.unique().tolist()) <= {0.0, 1.0}
        return img[0, 0].numpy().astype(bool)

    def centroid(img: np.ndarray) -> tuple[float, float]:  # (x, y) in pixel coordinates: pixel i spans [i, i+1)
        rows, cols = np.nonzero(img)
        return float(cols.mean() + 0.5), float(rows.mean() + 0.5)

    # A square of odd side n centred on a pixel centre covers exactly n x n pixels.
    on_pixel = (32.5 - lo) / (hi - lo)
    for side in (7, 9, 13):
        square = render(0, scale=side / SPRITE_SIZE, pos_x=on_pixel, pos_y=on_pixel)
        rows, cols = np.nonzero(square)
        assert square.sum() == side * side
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (32 - side // 2, 32 + side // 2) * 2
    assert SPRITE_SIZE == 13.0  # the side at scale 1 (so the 13 x 13 case above is scale 1)

    # Positions 0 and 1 put the centre exactly on POS_RANGE; posX moves along columns, posY along rows.
    assert centroid(render(0, pos_x=0.0, pos_y=1.0)) == (lo, hi)
    assert centroid(render(0, pos_x=1.0, pos_y=0.0)) == (hi, lo)
    assert centroid(render(0, pos_x=0.5, pos_y=0.5)) == ((lo + hi) / 2,) * 2

    # The canvas centre (32, 32) is the sprite centre at position 0.5, so canvas flips and turns act on the sprite.
    square, ellipse, heart = (render(s) for s in range(3))
    for shape, img in enumerate((square, ellipse, heart)):
        quarter = render(shape, orientation=math.pi / 2)
        assert np.array_equal(quarter, np.rot90(img))  # counter-clockwise (rows run downwards)
        assert np.array_equal(img, img[:, ::-1])  # every shape is mirror-symmetric left to right
        # Nothing is clipped near the borders: at positions 0 and 1 the sprite is the centred one shifted by 22 px.
        for pos, shift in ((0.0, -22), (1.0, 22)):
            for turn in (0.0, math.pi / 4, 1.0):
                moved = render(shape, pos_x=pos, pos_y=pos, orientation=turn)
                centred = render(shape, orientation=turn)
                assert np.array_equal(moved, np.roll(centred, (shift, shift), axis=(0, 1))), (shape, pos, turn)
    assert np.array_equal(render(0, orientation=math.pi / 2), square)  # a square is unchanged by a quarter turn
    assert not np.array_equal(render(2, orientation=math.pi / 2), heart)

    # The ellipse is twice as wide as tall (second moments of a filled ellipse are a^2/4 and b^2/4).
    rows, cols = np.nonzero(ellipse)
    assert abs(math.sqrt(cols.var() / rows.var()) - 2.0) < 0.15
    assert abs(ellipse.sum() / (math.pi * 0.7 * 0.35 * SPRITE_SIZE**2) - 1) < 0.05  # semi-axes 0.7 and 0.35 sides

    # The heart is upright: wide lobes at the top, a point at the bottom, so its mass sits above its box's middle.
    rows = np.nonzero(heart.any(1))[0]
    widths = heart.sum(1)[rows]
    top, bottom = rows.min(), rows.max() + 1
    assert centroid(heart)[1] < (top + bottom) / 2 - 0.25  # 0.43 px above; an upside-down heart is 0.43 below
    assert rows[widths.argmax()] < (top + bottom) / 2 and widths[-1] <= widths.max() / 2
    assert not np.array_equal(heart, heart[::-1])
    assert 0.5 < heart.sum() / square.sum() < 0.7 and 0.8 < heart.any(0).sum() / SPRITE_SIZE < 1.0

    # Resizing (antialiased) keeps the ink, values stay in [0, 1], channels are copies.
    small = sprite_images([2], size=(32, 32), channels=3, orientation=0.0)
    assert small.shape == (1, 3, 32, 32) and torch.equal(small[:, 0], small[:, 2])
    assert 0 <= float(small.min()) and float(small.max()) <= 1
    assert abs(float(small.sum()) / 3 * 4 - heart.sum()) < 0.05 * heart.sum()
    with pytest.raises(ValueError, match="shape indices 0-2"):
        sprite_images([3])
