"""Bad-input sweep: each mistake a user can make gets a specific exception whose message names the problem.

None of these may surface as a bare traceback from deep inside torch, PIL, PyAV or jsonargparse.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


# ---------------------------------------------------------------------------------------------- cases
def unknown_hook(tmp_path: Path) -> None:
    from prisma_lightning.backbones import load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False).run_with_cache(
        torch.zeros(1, 3, 16, 16), names_filter="blocks.0.hook_resid_pots"
    )


def wrong_d_in(tmp_path: Path) -> None:
    from prisma_lightning.modules import SAEModule
    from prisma_lightning.sae import SAEConfig

    module = SAEModule(SAEConfig(d_in=48, d_sae=96, hook_name="blocks.0.hook_resid_post"), backbone="test/vit-tiny",
                       pretrained_backbone=False)  # fmt: skip
    module.check_hook()


def unknown_architecture(tmp_path: Path) -> None:
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=16, architecture="top-k")


def k_larger_than_d_sae(tmp_path: Path) -> None:
    from prisma_lightning.sae import SAEConfig

    SAEConfig(d_in=8, d_sae=16, architecture="topk", k=32)


def negative_lr(tmp_path: Path) -> None:
    from prisma_lightning.modules import SAEModule
    from prisma_lightning.sae import SAEConfig

    SAEModule(SAEConfig(d_in=8, d_sae=16), lr=-1e-3)


def missing_data_folder(tmp_path: Path) -> None:
    from prisma_lightning.datamodules import ImageNetDataModule

    ImageNetDataModule(str(tmp_path / "no_such_imagenet"), num_workers=0).setup("fit")


def empty_class_folder(tmp_path: Path) -> None:
    from prisma_lightning.datamodules import ImageNetDataModule

    for split in ("train", "val"):
        (tmp_path / split / "n01440764").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "n01440764" / "a.JPEG")
        (tmp_path / split / "n01443537").mkdir()
    ImageNetDataModule(str(tmp_path), num_workers=0).setup("fit")


def corrupt_jpeg(tmp_path: Path) -> None:
    from prisma_lightning.datamodules import ImageNetDataModule

    for split in ("train", "val"):
        folder = tmp_path / split / "n01440764"
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "good.JPEG")
        data = (folder / "good.JPEG").read_bytes()
        (folder / "broken.JPEG").write_bytes(data[: len(data) // 3])
    dm = ImageNetDataModule(str(tmp_path), num_workers=0, on_bad_image="raise")
    dm.setup("fit")
    for i in range(len(dm.train_set)):
        dm.train_set[i]


def truncated_mp4(tmp_path: Path) -> None:
    from prisma_lightning.datamodules import VideoClipDataModule
    from prisma_lightning.datamodules.video import write_moving_sprites

    write_moving_sprites(tmp_path / "v", n_per_class=1, frames=8, size=32, seed=0, fps=8)
    for path in sorted((tmp_path / "v").rglob("*.mp4")):
        path.write_bytes(path.read_bytes()[:300])
    dm = VideoClipDataModule(str(tmp_path / "v"), frames=4, image_size=32, val_fraction=0.0, test_fraction=0.0,
                             on_bad_video="raise")  # fmt: skip
    dm.setup("fit")
    dm.train_set[0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_images_of_other_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    from prisma_lightning.datamodules.imagenet import load_rgb

    if mode == "I;16":
        array = np.full((4, 4), 65535, dtype=np.uint16)
        Image.fromarray(array).save(tmp_path / "x.png")
    else:
        Image.new(mode, (4, 4), 255 if mode == "L" else (255, 255, 255, 255)).save(tmp_path / "x.png")
    img = load_rgb(str(tmp_path / "x.png"))
    assert img.mode == "RGB" and np.asarray(img).min() == 255  # full white stays white (16-bit is scaled)


def grayscale_into_rgb_model(tmp_path: Path) -> None:
    from prisma_lightning.backbones import load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False)(torch.zeros(2, 1, 16, 16))


def nan_activations(tmp_path: Path) -> None:
    from prisma_lightning.activations import ShardWriter

    ShardWriter(tmp_path, d=2, tokens_per_image=1).add(torch.tensor([[float("nan"), 1.0]]), 1)


def malformed_cfg_json(tmp_path: Path) -> None:
    from prisma_lightning.sae import SAEConfig, SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_in=8, d_sae=16)).save(tmp_path)
    (tmp_path / "cfg.json").write_text('{"d_in": 8, "d_sae": ')
    SparseAutoencoder.load(tmp_path)


class _NotATensor:
    pass


def pickle_instead_of_safetensors(tmp_path: Path) -> None:
    from prisma_lightning.sae import SAEConfig, SparseAutoencoder

    SparseAutoencoder(SAEConfig(d_in=8, d_sae=16)).save(tmp_path)
    torch.save({"W_enc": _NotATensor()}, tmp_path / "sae_weights.safetensors")
    SparseAutoencoder.load(tmp_path)


def pickle_in_vit_prisma_file(tmp_path: Path) -> None:
    from prisma_lightning.sae import SparseAutoencoder

    torch.save({"W_enc": _NotATensor(), "W_dec": torch.zeros(16, 8)}, tmp_path / "weights.pt")
    config = {"d_in": 8, "d_sae": 16, "activation_fn_str": "relu", "hook_point": "blocks.0.hook_resid_post",
              "hook_point_layer": 0, "layer_subtype": "hook_resid_post", "model_name": "m"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    SparseAutoencoder.load(tmp_path)


def yaml_typo(tmp_path: Path) -> None:
    from prisma_lightning.cli import PrismaCLI

    cfg = Path(__file__).resolve().parents[1] / "configs" / "sae" / "cached_shards.yaml"
    text = cfg.read_text().replace("    lr: 0.001", "    lrr: 0.001")
    (tmp_path / "typo.yaml").write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            PrismaCLI(args=["fit", "--config", str(tmp_path / "typo.yaml")])
        except SystemExit as exit_:
            raise ValueError(err.getvalue()) from exit_


def truncated_model_weights(tmp_path: Path) -> None:
    from prisma_lightning.backbones import HookedViT, load_hooked_model

    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    HookedViT.from_pretrained(tmp_path)


CASES = [
    (unknown_hook, KeyError, r"Unknown hook name 'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"),
    (wrong_d_in, ValueError, r"expects width 48 .* has width 32; set d_in=32"),
    (unknown_architecture, ValueError, r"architecture='top-k' is not valid; choose one of \['relu', 'topk'"),
    (k_larger_than_d_sae, ValueError, r"k=32 must satisfy 0 < k <= d_sae=16"),
    (negative_lr, ValueError, r"lr must be positive, got -0.001"),
    (missing_data_folder, FileNotFoundError, r"no_such_imagenet"),
    (empty_class_folder, ValueError, r"n01443537 contains no images"),
    (corrupt_jpeg, RuntimeError, r"broken\.JPEG"),
    (truncated_mp4, RuntimeError, r"\.mp4"),
    (grayscale_into_rgb_model, ValueError, r"Expected 3 input channels, got 1"),
    (nan_activations, ValueError, r"Non-finite activations"),
    (malformed_cfg_json, ValueError, r"cfg\.json is not valid JSON"),
    (pickle_instead_of_safetensors, ValueError, r"sae_weights\.safetensors"),
    (pickle_in_vit_prisma_file, ValueError, r"weights\.pt"),
    (yaml_typo, ValueError, r"lrr"),
    (truncated_model_weights, ValueError, r"model\.safetensors is truncated"),
]


@pytest.mark.parametrize("case, error, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_gets_a_clear_error(tmp_path: Path, case, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        case(tmp_path)
