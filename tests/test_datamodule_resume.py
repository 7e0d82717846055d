"""Mid-epoch resume of every image / video data module: the batches after a resume equal an uninterrupted run.

Loader level: iterate k batches, take ``state_dict()``, build a fresh data module and loader, ``load_state_dict()``
and compare the following batches (across epoch boundaries, with 0 and 2 workers) bitwise. Trainer level and
through ``prisma fit``: a run stopped (or killed with SIGKILL) and resumed from ``last.ckpt`` ends with the
weights of a straight run, bitwise.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torchvision.transforms import v2

from prisma_lightning.backbones import HookedViTConfig
from prisma_lightning.datamodules import (
    DSpritesDataModule,
    ImageNetDataModule,
    InductionDataModule,
    PrismaDataModule,
    ResumableDataLoader,
    TorchvisionDataModule,
    VideoClipDataModule,
    write_moving_sprites,
)
from prisma_lightning.datamodules.imagenet import ImageFileDataset
from prisma_lightning.modules import ViTClassifierModule

ROOT = Path(__file__).resolve().parents[1]
BATCH = 6
N_TRAIN = 22  # 4 batches per epoch (6, 6, 6, 4): the last one is partial


# ---------------------------------------------------------------------------------------------- data
def _noise_jpeg(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real JPEGs (2 classes x 11 train, x 1 val), real MP4s (4 directions x 6) and raw MNIST files (22 train)."""
    base = tmp_path_factory.mktemp("resume_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("val", 1)):
        for synset in ("n01440764", "n01443537"):
            for i in range(n):
                _noise_jpeg(base / "imagenet" / split / synset / f"{synset}_{i}.JPEG", rng)
    write_moving_sprites(base / "video", n_per_class=6, frames=12, size=16, seed=0)
    raw = base / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", N_TRAIN), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        header = np.array([2051, n, 28, 28], ">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = np.array([2049, n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    return {"imagenet": base / "imagenet", "video": base / "video", "mnist": base / "mnist"}


def random_crop_flip(size: int, pil: bool = False) -> v2.Compose:
    """A random training augmentation (random resized crop + flip), on PIL images or on float tensors."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)] if pil else []
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       *to_tensor])  # fmt: skip


def make_dsprites(files: dict[str, Path], num_workers: int, batch_size: int = BATCH) -> PrismaDataModule:
    return DSpritesDataModule(cache=False, subset_size=N_TRAIN, val_fraction=0.0, test_fraction=0.0, image_size=16,
                              transform=random_crop_flip(16), batch_size=batch_size, num_workers=num_workers,
                              seed=3)  # fmt: skip


def make_induction(files: dict[str, Path], num_workers: int, batch_size: int = BATCH) -> PrismaDataModule:
    return InductionDataModule(n_train=N_TRAIN, n_val=4, n_test=4, transform=random_crop_flip(32),
                               batch_size=batch_size, num_workers=num_workers, seed=3)  # fmt: skip


def make_imagenet(files: dict[str, Path], num_workers: int, batch_size: int = BATCH) -> PrismaDataModule:
    return ImageNetDataModule(str(files["imagenet"]), train_transform=random_crop_flip(16, pil=True),
                              batch_size=batch_size, num_workers=num_workers, seed=3)  # fmt: skip


def make_video(files: dict[str, Path], num_workers: int, batch_size: int = BATCH) -> PrismaDataModule:
    """24 MP4s, random clip starts: 4 full batches per epoch."""
    return VideoClipDataModule(str(files["video"]), frames=4, stride=2, clip_sampling="random", image_size=16,
                               val_fraction=0.0, test_fraction=0.0, batch_size=batch_size, num_workers=num_workers,
                               seed=3)  # fmt: skip


def make_torchvision(files: dict[str, Path], num_workers: int, batch_size: int = BATCH) -> PrismaDataModule:
    return TorchvisionDataModule("MNIST", root=str(files["mnist"]), val_fraction=0.0, augment=True,
                                 batch_size=batch_size, num_workers=num_workers, seed=3)  # fmt: skip


MODULES: dict[str, Callable[..., PrismaDataModule]] = {
    "dsprites": make_dsprites,
    "induction": make_induction,
    "imagenet": make_imagenet,
    "video": make_video,
    "torchvision": make_torchvision,
}


def train_loader(make: Callable[..., PrismaDataModule], files: dict[str, Path], num_workers: int, **kw):
    data = make(files, num_workers, **kw)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    return loader


def take(loader: ResumableDataLoader, epoch: int, n: int) -> list[list[torch.Tensor]]:
    """``n`` batches from ``epoch`` on, calling ``iter`` / ``set_epoch`` in the order Lightning's fit loop does:
    the first ``iter()`` of a (resumed) run comes before ``set_epoch``, later ones after it."""
    out: list[list[torch.Tensor]] = []
    first = True
    while len(out) < n:
        if first:
            iterator = iter(loader)
            loader.sampler.set_epoch(epoch)
        else:
            loader.sampler.set_epoch(epoch)
            iterator = iter(loader)
        first = False
        for batch in iterator:
            out.append(batch)
            if len(out) == n:
                break
        epoch += 1
    return out


def assert_same_batches(expected: list, got: list) -> None:
    assert len(expected) == len(got)
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"batch {step} differs"


def scramble_global_rngs() -> None:
    """The resumed process's global RNGs are in another state than the original's: batches must not care."""
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


# ---------------------------------------------------------------------------------------------- loader state
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", list(MODULES))
def test_resumed_loader_continues_bitwise(files, name: str, num_workers: int) -> None:
    """6 batches (into epoch 1), state, fresh data module: the next 7 batches (into epoch 3) are identical."""
    make, k, n = MODULES[name], 6, 13
    expected = take(train_loader(make, files, num_workers), 0, n)
    assert not torch.equal(expected[0][0], expected[4][0])  # each epoch is a new permutation

    loader = train_loader(make, files, num_workers)
    assert_same_batches(expected[:k], take(loader, 0, k))
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2 * BATCH
    del loader

    scramble_global_rngs()
    resumed = train_loader(make, files, num_workers)
    resumed.load_state_dict(state)
    assert_same_batches(expected[k:], take(resumed, k // 4, n - k))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_after_an_epochs_last_batch_starts_the_next_epoch(files, num_workers: int) -> None:
    expected = take(train_loader(make_dsprites, files, num_workers), 0, 8)
    loader = train_loader(make_dsprites, files, num_workers)
    take(loader, 0, 4)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    resumed = train_loader(make_dsprites, files, num_workers)
    resumed.load_state_dict(state)
    assert_same_batches(expected[4:], take(resumed, 1, 4))


def test_iterating_again_without_set_epoch_starts_the_next_epoch(files) -> None:
    """A loop that never calls ``set_epoch`` (the online SAE's activation stream) gets Lightning's epochs too."""
    expected = take(train_loader(make_induction, files, 0), 0, 12)  # epochs 0, 1, 2
    loader = train_loader(make_induction, files, 0)
    assert_same_batches(expected[:8], list(loader) + list(loader))
    loader = train_loader(make_induction, files, 0)
    iterator = iter(loader)
    assert_same_batches(expected[:2], [next(iterator), next(iterator)])
    resumed = train_loader(make_induction, files, 0)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(expected[2:], list(resumed) + list(resumed) + list(resumed))


def test_batches_do_not_depend_on_workers_or_global_rng(files) -> None:
    """Random crops and random clip starts are seeded per sample from (seed, epoch, index)."""
    for make in (make_imagenet, make_video):
        scramble_global_rngs()
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
        main_process = take(train_loader(make, files, 0), 0, 5)
        # Loading in the main process leaves the global RNGs (the model's dropout, ...) where they were.
        assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
        np.testing.assert_array_equal(states[2], np.random.get_state()[1])
        torch.manual_seed(0)
        assert_same_batches(main_process, take(train_loader(make, files, 2), 0, 5))


def test_resume_skips_consumed_images_without_decoding_them(files, monkeypatch) -> None:
    loader = train_loader(make_imagenet, files, 0)
    take(loader, 0, 6)
    state = loader.state_dict()
    decoded: list[int] = []
    original = ImageFileDataset.decode

    def counting_decode(self, index: int):
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(ImageFileDataset, "decode", counting_decode)
    resumed = train_loader(make_imagenet, files, 0)
    resumed.load_state_dict(state)
    rest = take(resumed, 1, 2)  # the rest of epoch 1: 6 + 4 images
    assert [len(b[1]) for b in rest] == [6, 4] and len(decoded) == N_TRAIN - 2 * BATCH


def test_ddp_ranks_resume_at_the_same_global_position(files) -> None:
    """2 ranks with batch 3 = 1 process with batch 6 (with random augmentation), before and after a resume."""

    def rank_loader(rank: int) -> ResumableDataLoader:
        loader = train_loader(make_imagenet, files, 0, batch_size=3)
        loader.sampler.num_replicas, loader.sampler.rank = 2, rank  # what GlobalBatchSampler reads under DDP
        return loader

    one = take(train_loader(make_imagenet, files, 0), 0, 8)  # 4 batches per epoch (the last one partial)
    ranks = [take(rank_loader(r), 0, 6) for r in (0, 1)]  # 3 global batches per epoch (the partial one dropped)
    global_batches = [[torch.cat([a, b]) for a, b in zip(*pair, strict=True)] for pair in zip(*ranks, strict=True)]
    assert_same_batches(one[:3] + one[4:7], global_batches)

    states = []
    for r in (0, 1):
        loader = rank_loader(r)
        take(loader, 0, 4)  # epoch 1, after 1 global batch
        states.append(loader.state_dict())
    assert states[0] == states[1] and (states[0]["epoch"], states[0]["position"]) == (1, 6)
    for r in (0, 1):
        resumed = rank_loader(r)
        resumed.load_state_dict(states[0])  # Lightning restores rank 0's state on every rank
        assert_same_batches(ranks[r][4:], take(resumed, 1, 2))


def test_loaded_state_of_other_data_warns(files) -> None:
    loader = train_loader(make_induction, files, 0)
    state = {**loader.state_dict(), "dataset_size": N_TRAIN + 5, "position": 12}
    with pytest.warns(RuntimeWarning, match="data settings of the checkpoint"):
        loader.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- Trainer
def tiny_classifier() -> ViTClassifierModule:
    torch.manual_seed(0)
    cfg = HookedViTConfig(d_model=16, n_layers=1, n_heads=2, d_mlp=32, image_size=16, patch_size=8, in_channels=1,
                          n_classes=3)  # fmt: skip
    return ViTClassifierModule(cfg, lr=1e-2, warmup_steps=2, max_steps=12)


def fit(root: Path, steps: int, ckpt_path: Path | None = None) -> ViTClassifierModule:
    """A dSprites classifier (40 training images, 5 batches per epoch, a random flip) trained to ``steps``."""
    data = DSpritesDataModule(cache=False, subset_size=50, val_fraction=0.2, test_fraction=0.0, image_size=16,
                              batch_size=8, seed=1, transform=v2.RandomHorizontalFlip())  # fmt: skip
    module = tiny_classifier()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=3,
                      check_val_every_n_epoch=None, default_root_dir=str(root), callbacks=[checkpoint])  # fmt: skip
    trainer.fit(module, data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return module


@pytest.mark.parametrize("stop", [5, 7], ids=["epoch_end", "mid_epoch"])
def test_trainer_resume_mid_epoch_equals_straight_run(tmp_path, stop: int) -> None:
    straight = fit(tmp_path / "straight", 12)
    fit(tmp_path / "resumed", stop)
    saved = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["position"]) == divmod(stop * 8, 40)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable")
        resumed = fit(tmp_path / "resumed", 12, tmp_path / "resumed" / "ckpt" / "last.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------- prisma fit
STEPS, STOP = 24, 8


def prisma_fit(root: Path, *extra: str) -> list[str]:
    """`prisma fit` of configs/vit/dsprites_2l.yaml, shrunk: a 16-wide model, 80 training images (5 batches per
    epoch), validation every 6 steps, a checkpoint (and last.ckpt) every step."""
    return [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(ROOT / "configs/vit/dsprites_2l.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.val_check_interval", "6",
            "--trainer.default_root_dir", str(root), "--trainer.callbacks.init_args.every_n_train_steps", "1",
            "--data.init_args.subset_size", "100", "--data.init_args.val_fraction", "0.2",
            "--data.init_args.test_fraction", "0", "--data.init_args.batch_size", "16",
            "--model.init_args.model.d_model", "16", "--model.init_args.model.n_heads", "2",
            "--model.init_args.model.d_mlp", "32", "--model.init_args.max_steps", str(STEPS),
            "--model.init_args.warmup_steps", "4", *extra]  # fmt: skip


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    return state["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("straight")
    run(prisma_fit(root, "--trainer.max_steps", str(STEPS)))
    return final_weights(root)


@pytest.mark.slow
def test_prisma_fit_resumed_from_last_ckpt_equals_straight_run(tmp_path, straight_run) -> None:
    run(prisma_fit(tmp_path, "--trainer.max_steps", str(STOP)))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == STOP
    run(prisma_fit(tmp_path, "--trainer.max_steps", str(STEPS), "--ckpt_path", str(last)))
    assert_same_weights(straight_run, final_weights(tmp_path))


@pytest.mark.slow
def test_prisma_fit_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, straight_run) -> None:
    """Killed at a step >= 8 (loading with 2 workers, the straight run used none), resumed from last.ckpt."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    cmd = prisma_fit(tmp_path, "--trainer.max_steps", str(STEPS), "--data.init_args.num_workers", "2")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, seen, step = time.time() + 200, None, 0
        while time.time() < deadline and proc.poll() is None and step < STOP:
            time.sleep(0.01)
            if last.exists() and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]  # written atomically
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert STOP <= killed_at < STEPS
    run([*cmd, "--ckpt_path", str(last)])
    assert_same_weights(straight_run, final_weights(tmp_path))
