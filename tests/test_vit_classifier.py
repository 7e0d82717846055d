"""ViTClassifierModule: configs, training, resume, export, the shipped dSprites checkpoint, TorchvisionDataModule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from prisma_lightning.backbones import HookedViT, HookedViTConfig
from prisma_lightning.cli import PrismaCLI
from prisma_lightning.datamodules import DSpritesDataModule, DSpritesGrid, TorchvisionDataModule
from prisma_lightning.modules import ViTClassifierModule

ROOT = Path(__file__).resolve().parents[1]
VIT_CONFIGS = sorted((ROOT / "configs" / "vit").glob("*.yaml"))
SHIPPED = ROOT / "examples" / "checkpoints" / "dsprites-vit-2l"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run as fast on one thread, and much faster than on two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(**overrides) -> HookedViTConfig:
    kwargs = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, image_size=64, patch_size=16, in_channels=1, n_classes=3)
    return HookedViTConfig(**{**kwargs, **overrides})


def easy_dsprites(**overrides) -> DSpritesDataModule:
    """768 dSprites of one scale and orientation on a 16x16 position grid: shape is learnable in seconds."""
    kwargs = dict(grid=DSpritesGrid(n_scales=1, n_orientations=1, n_pos=16), cache=False, val_fraction=0.25,
                  test_fraction=0.0, batch_size=32, seed=0)  # fmt: skip
    return DSpritesDataModule(**{**kwargs, **overrides})


def plain_dsprites(**overrides) -> DSpritesDataModule:
    """96 images of the full dSprites grid."""
    kwargs = dict(cache=False, subset_size=96, val_fraction=0.25, test_fraction=0.0, batch_size=24, seed=0)
    return DSpritesDataModule(**{**kwargs, **overrides})


def fast_trainer(root: Path, **overrides) -> Trainer:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(root))  # fmt: skip
    return Trainer(**{**kwargs, **overrides})


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


# ---------------------------------------------------------------------------------------------- configs
def test_there_is_a_config_per_dsprites_row_and_dataset() -> None:
    names = {p.stem for p in VIT_CONFIGS}
    rows = {f"dsprites_{n}l{suffix}" for n in range(1, 5) for suffix in ("", "_attn_only")}
    assert rows | {"induction", "circle", "mnist", "cifar10"} <= names


@pytest.mark.parametrize("path", VIT_CONFIGS, ids=lambda p: p.stem)
def test_vit_config_instantiates(path: Path, tmp_path: Path) -> None:
    cli = PrismaCLI(run=False, args=["--config", str(path), "--trainer.logger", "false",
                                     "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    module, data = cli.model, cli.datamodule
    assert isinstance(module, ViTClassifierModule)
    cfg = module.model.cfg
    assert cfg.n_classes == data.num_classes
    module.check_datamodule(data)  # channels, image size and classes agree
    assert cli.trainer.max_steps > 0
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoints and checkpoints[0].save_last
    if path.stem.startswith("dsprites_"):
        assert cfg.n_layers == int(path.stem.split("_")[1][0])
        assert cfg.attn_only == path.stem.endswith("attn_only")
        assert cfg.attn_only == (not any("mlp" in n for n, _ in module.model.named_parameters()))
        assert data.cache is False  # rendered lazily: no 377 MB cache file
    expected_classes = {"induction": 4, "circle": 60, "mnist": 10, "cifar10": 10}.get(path.stem, 3)
    assert cfg.n_classes == expected_classes
    assert ("acc_top5" in module.val_metrics) == (expected_classes >= 5)


def test_dsprites_2l_config_fits_checkpoints_and_exports(tmp_path: Path) -> None:
    args = [
        "fit", "--config", str(ROOT / "configs/vit/dsprites_2l.yaml"),
        "--data.init_args.subset_size", "80", "--data.init_args.val_fraction", "0.2",
        "--data.init_args.test_fraction", "0.0", "--data.init_args.batch_size", "16",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.log_dir)
    for key in ("val/acc", "val/loss", "train/loss", "train/lr"):
        assert key in cli.trainer.logged_metrics or key in cli.trainer.callback_metrics, key
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and any(p.name.startswith("step000003-val_acc") for p in last.parent.iterdir())
    state = torch.load(last, map_location="cpu", weights_only=True)  # plain hyperparameters only
    assert state["hyper_parameters"]["model"]["n_layers"] == 2
    exported = HookedViT.from_pretrained(log_dir / "model")
    images = torch.rand(4, 1, 64, 64)
    torch.testing.assert_close(logits_of(exported, images), logits_of(cli.model.model, images))


@pytest.mark.parametrize("name", ["induction", "circle"])
def test_synthetic_configs_run(name: str, tmp_path: Path) -> None:
    args = ["fit", "--config", str(ROOT / f"configs/vit/{name}.yaml"), "--trainer.fast_dev_run", "2",
            "--data.init_args.batch_size", "8", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert cli.trainer.global_step == 2


# ---------------------------------------------------------------------------------------------- training
def test_short_training_beats_chance(tmp_path: Path) -> None:
    data = easy_dsprites()
    module = ViTClassifierModule(tiny_cfg(), lr=3e-3, warmup_steps=10, weight_decay=0.01)
    before = fast_trainer(tmp_path).validate(module, data, verbose=False)[0]["val/acc"]
    fast_trainer(tmp_path, max_steps=200).fit(module, data)
    after = fast_trainer(tmp_path).validate(module, data, verbose=False)[0]["val/acc"]
    assert before < 0.45, before  # chance is 1/3
    assert after > 0.65, (before, after)


def test_attention_only_model_trains(tmp_path: Path) -> None:
    cfg = tiny_cfg(attn_only=True)
    module = ViTClassifierModule(cfg, lr=3e-3, warmup_steps=10, weight_decay=0.01)
    assert not any("mlp" in name for name, _ in module.model.named_parameters())
    data = easy_dsprites()
    fast_trainer(tmp_path, max_steps=200).fit(module, data)
    metrics = fast_trainer(tmp_path).validate(module, data, verbose=False)[0]
    assert metrics["val/acc"] > 0.55, metrics


def test_resume_from_last_checkpoint(tmp_path: Path) -> None:
    data = easy_dsprites(subset_size=96, batch_size=24)  # a custom grid: stored as plain values in the checkpoint
    ckpt_dir = tmp_path / "ckpt"

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=4, save_top_k=-1)

    first = ViTClassifierModule(tiny_cfg(), lr=1e-3, warmup_steps=2, max_steps=8)
    fast_trainer(tmp_path, max_steps=4, callbacks=[checkpoint()], enable_checkpointing=True).fit(first, data)
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    data_hparams = saved["datamodule_hyper_parameters"]
    assert data_hparams["grid"] == {"n_scales": 1, "n_orientations": 1, "n_pos": 16}
    assert DSpritesDataModule(**data_hparams).grid == data.grid

    start: dict[str, torch.Tensor] = {}

    class RecordStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            start.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    resumed = ViTClassifierModule(tiny_cfg(), lr=1e-3, warmup_steps=2, max_steps=8)  # fresh random weights
    trainer = fast_trainer(tmp_path, max_steps=8, callbacks=[RecordStart(), checkpoint()], enable_checkpointing=True)
    trainer.fit(resumed, data, ckpt_path=str(ckpt_dir / "last.ckpt"))
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(start[key], value, msg=key)  # training went on from the checkpoint's weights
    assert trainer.global_step == 8
    optimizer = trainer.optimizers[0]
    assert int(optimizer.state[resumed.model.cls_token]["step"]) == 8  # AdamW moments restored, not restarted
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 8
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * resumed.lr_lambda(8))


def test_export_and_checkpoint_reload_give_the_same_logits(tmp_path: Path) -> None:
    data = plain_dsprites()
    export = tmp_path / "export"
    module = ViTClassifierModule(tiny_cfg(), lr=1e-3, export_dir=str(export))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fast_trainer(tmp_path, max_steps=3, callbacks=[ckpt], enable_checkpointing=True).fit(module, data)
    images = torch.rand(5, 1, 64, 64)
    expected = logits_of(module, images)
    torch.testing.assert_close(logits_of(HookedViT.from_pretrained(export), images), expected)
    reloaded = ViTClassifierModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    torch.testing.assert_close(logits_of(reloaded, images), expected)
    # predict returns the logits of the predict split (the validation images), in order
    data.setup("predict")
    predicted = torch.cat(fast_trainer(tmp_path).predict(module, data))
    val_images = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    torch.testing.assert_close(predicted, logits_of(module, val_images), rtol=1e-4, atol=1e-5)


def test_model_from_registry_name_and_object() -> None:
    by_name = ViTClassifierModule("test/vit-tiny", pretrained=False)
    assert by_name.model.cfg.n_classes == 10 and by_name.hparams["model"]["d_model"] == 32
    assert "acc_top5" in by_name.val_metrics
    model = HookedViT(tiny_cfg())
    by_object = ViTClassifierModule(model)
    assert by_object.model is model and by_object.hparams["model"] == model.cfg.to_dict()


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    module = ViTClassifierModule(tiny_cfg(), lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert module.lr_lambda(0) == pytest.approx(0.1)
    assert module.lr_lambda(9) == pytest.approx(1.0)
    assert module.lr_lambda(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert module.lr_lambda(110) == pytest.approx(0.1)
    assert module.lr_lambda(500) == pytest.approx(0.1)
    groups = module.parameter_groups()
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and id(module.model.pos_embed) in no_decay
    assert id(module.model.blocks[0].attn.qkv.weight) not in no_decay


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=0.0), "lr must be a positive"),
        (dict(lr=-1e-3), "lr must be a positive"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=20, max_steps=10), "longer than the schedule"),
        (dict(max_steps=0), "max_steps"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(label_smoothing=1.0), "label_smoothing"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViTClassifierModule(tiny_cfg(), **kwargs)


def test_bad_models_and_mismatched_data_raise() -> None:
    with pytest.raises(ValueError, match="classifier head"):
        ViTClassifierModule(tiny_cfg(head="none"))
    with pytest.raises(TypeError, match="HookedViTConfig"):
        ViTClassifierModule(3.0)
    module = ViTClassifierModule(tiny_cfg())
    with pytest.raises(ValueError, match="16 classes .* n_classes=3; set --model.init_args.model.n_classes=16"):
        module.check_datamodule(easy_dsprites(target="posX"))  # the easy grid has 16 x positions
    with pytest.raises(ValueError, match="in_channels"):
        module.check_datamodule(easy_dsprites(channels=3))
    with pytest.raises(ValueError, match="image_size"):
        module.check_datamodule(easy_dsprites(image_size=32))
    module.check_datamodule(easy_dsprites())


# ---------------------------------------------------------------------------------------------- shipped model
VIT_PRISMA = {  # (layers, attention-only): accuracy in ViT-Prisma's docs/experiments/dSprites_results.md
    (1, False): 0.535, (2, False): 0.996, (3, False): 1.000, (4, False): 1.000,
    (1, True): 0.459, (2, True): 0.685, (3, True): 0.774, (4, True): 0.991,
}  # fmt: skip
SHIPPED_MODELS = sorted(p.parent.name for p in (ROOT / "examples" / "checkpoints").glob("dsprites-vit-*/config.json"))


def test_every_shipped_model_has_its_config_and_card() -> None:
    assert len(SHIPPED_MODELS) == 8  # every row of ViT-Prisma's dSprites table
    for name in SHIPPED_MODELS:
        folder = ROOT / "examples" / "checkpoints" / name
        assert (folder / "model.safetensors").stat().st_size < 2**20, name  # the repository stays small
        assert (folder / "README.md").is_file(), name
        n_layers, attn_only = int(name.split("-")[2][:-1]), name.endswith("-attn-only")
        config = ROOT / "configs" / "vit" / f"dsprites_{n_layers}l{'_attn_only' if attn_only else ''}.yaml"
        trained = yaml.safe_load(config.read_text())["model"]["init_args"]["model"]
        model, expected = HookedViT.from_pretrained(folder), HookedViTConfig(**trained)
        for key in trained:
            if key != "model_name":
                assert getattr(model.cfg, key) == getattr(expected, key), f"{name}: {key} differs from {config.name}"


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_dsprites_checkpoint_is_accurate_on_held_out_images(name: str) -> None:
    folder = ROOT / "examples" / "checkpoints" / name
    model = HookedViT.from_pretrained(folder)
    assert model.cfg.n_classes == 3
    config = f"dsprites_{model.cfg.n_layers}l{'_attn_only' if model.cfg.attn_only else ''}.yaml"
    data_args = yaml.safe_load((ROOT / "configs" / "vit" / config).read_text())["data"]["init_args"]
    data = DSpritesDataModule(**data_args)  # the config it was trained with: same seed, so the same splits
    data.setup("test")
    assert not set(data.test_set.indices) & set(data.train_set.indices)
    loader = DataLoader(data.test_set, batch_size=500)
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    assert total >= 2000
    # the accuracy its model card states, to the reported precision
    card = (folder / "README.md").read_text()
    assert f"{correct / total:.4f}" in card or f"{correct / total:.2%}" in card, (name, correct / total)
    # the README's claim: at least ViT-Prisma's number for the row, at the three decimals ViT-Prisma reports
    vit_prisma = VIT_PRISMA[(model.cfg.n_layers, model.cfg.attn_only)]
    assert round(correct / total, 3) >= vit_prisma, (name, correct / total, vit_prisma)


# ---------------------------------------------------------------------------------------------- torchvision data
def write_fake_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    """Tiny MNIST files in torchvision's raw format (idx), so no download is needed."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_torchvision_missing_root_says_how_to_get_the_data(name: str, tmp_path: Path) -> None:
    data = TorchvisionDataModule(name=name, root=str(tmp_path / "nothing"), download=False)
    data.prepare_data()  # no download requested: nothing happens, nothing is fetched
    with pytest.raises(FileNotFoundError, match="download=true") as err:
        data.setup("fit")
    assert str(tmp_path / "nothing") in str(err.value) and name in str(err.value)


def test_torchvision_mnist_splits_and_transforms(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    data = TorchvisionDataModule(name="MNIST", root=str(tmp_path), val_fraction=0.25, image_size=32, channels=3)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (30, 10, 20)
    assert not set(data.train_set.indices) & set(data.val_set.indices)
    image, label = data.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 10
    assert torch.equal(image[0], image[1])  # grey repeated to RGB
    raw = TorchvisionDataModule(name="MNIST", root=str(tmp_path), normalize=False)
    raw.setup("fit")
    plain = raw.val_set[0][0]
    assert plain.shape == (1, 28, 28) and 0.0 <= plain.min() and plain.max() <= 1.0


def test_mnist_config_runs_on_local_files(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "data")
    args = ["fit", "--config", str(ROOT / "configs/vit/mnist.yaml"), "--data.init_args.root", str(tmp_path / "data"),
            "--trainer.fast_dev_run", "2", "--data.init_args.batch_size", "8",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert cli.trainer.global_step == 2
