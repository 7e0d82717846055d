"""FeatureDensityLogger, HubUploader and the YAML callback sets in callbacks/."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.callbacks import FeatureDensityLogger, HubUploader
from prisma_lightning.callbacks.density import HISTOGRAM_TAG, IMAGE_TAG
from prisma_lightning.modules import SAEModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder, load_sparsity

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_post"


def sae_config(**kw) -> SAEConfig:
    base = dict(d_in=32, expansion_factor=2, architecture="topk", hook_name=HOOK, b_dec_init="mean")
    if kw.get("architecture", "topk") == "topk":
        base["k"] = 4
    return SAEConfig(**{**base, **kw})


def trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    log_every_n_steps=1, accelerator="cpu", devices=1)  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def image_loader(n=48, batch=4) -> DataLoader:
    images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=batch)


def cached_loader(n=16) -> DataLoader:
    rows = torch.randn(n, 64, 32, generator=torch.Generator().manual_seed(0))
    return DataLoader(list(rows.unbind()), batch_size=None)


# ---------------------------------------------------------------------------------------------------- density
def test_density_logger_writes_histogram_scalars_and_patch_grid_to_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = SAEModule(sae_config(), backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=0,
                       batch_tokens=68, init_tokens=68)  # fmt: skip
    density = FeatureDensityLogger(every_n_steps=4, n_batches=2, top_features=3, top_k_patches=5, tile_size=8)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, max_steps=7, logger=logger, callbacks=[density], enable_checkpointing=False).fit(
        module, image_loader()
    )
    assert density.last_step == 5  # steps 4 and 5 were observed
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert HISTOGRAM_TAG in tags["histograms"] and IMAGE_TAG in tags["images"]
    assert {"density/dead_count", "density/dense_count", "density/alive_pct"} <= set(tags["scalars"])
    hist = events.Histograms(HISTOGRAM_TAG)[0]
    assert hist.step == 5 and hist.histogram_value.num == module.sae.d_sae
    log10 = density.last_stats["log10_density"]
    assert hist.histogram_value.min == pytest.approx(float(log10.min()))
    assert events.Scalars("density/dead_count")[0].value == float((10**log10 < 1e-8).sum())
    image = events.Images(IMAGE_TAG)[0]
    # 3 features x 5 patches of 8 px with make_grid's 2 px padding.
    assert (image.height, image.width) == (3 * 10 + 2, 5 * 10 + 2)
    assert density.last_grid.shape == (3, 32, 52)
    png = Path(logger.log_dir) / "feature_density" / "top_patches_step0000005.png"
    with Image.open(png) as png_image:
        assert png_image.size == (52, 32)
    assert_close(load_sparsity(png.parent), log10.float())


def test_density_counts_match_a_direct_count(tmp_path) -> None:
    module = SAEModule(sae_config(architecture="relu", l1_coefficient=1.0), init_tokens=64)
    rows = [torch.randn(64, 32), torch.randn(64, 32)]
    module.sae.initialize_b_dec(rows[0])
    with torch.no_grad():
        module.sae.b_enc[:5] = -100.0  # five features that never fire
    steps_since_fired = module.sae.steps_since_fired.clone()
    density = FeatureDensityLogger(every_n_steps=1, n_batches=2)
    density.folder = tmp_path
    fake = SimpleNamespace(is_global_zero=True, global_step=3, loggers=[], default_root_dir=tmp_path)
    density._start(module)
    for batch in rows:
        density.on_train_batch_end(fake, module, None, batch, 0)
    assert module.sae.training and torch.equal(module.sae.steps_since_fired, steps_since_fired)  # no side effects
    with torch.no_grad():
        feats = module.sae.eval()(torch.cat(rows)).feats
    rate = (feats != 0).double().mean(0)
    assert_close(density.last_stats["firing_rate"], rate)
    assert int(density.last_stats["dead_count"]) == int((rate == 0).sum()) >= 5
    assert density.last_grid is None  # cached mode: no images, no grid
    assert_close(load_sparsity(tmp_path), torch.log10(rate.clamp_min(1e-10)).float())


def test_tokens_map_to_their_image_patches() -> None:
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)  # 16 px, 4 px patches, class token
    images = torch.zeros(2, 3, 16, 16)
    for b in range(2):
        for p in range(16):
            r, c = divmod(p, 4)
            images[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 100 * b + p
    density = FeatureDensityLogger(tile_size=8)
    # "all" tokens: 17 rows per image (class token first).
    tiles = density.tiles(backbone, images, torch.tensor([17 + 1 + 6, 1 + 15, 17]), n_rows=34)
    assert tiles.shape == (3, 3, 8, 8)
    assert torch.equal(tiles[0], torch.full((3, 8, 8), 106.0))  # image 1, patch 6
    assert torch.equal(tiles[1], torch.full((3, 8, 8), 15.0))  # image 0, patch 15
    assert tiles[2].min() >= 100 and tiles[2].max() <= 115  # class token: the whole image 1, downscaled
    # "patches" tokens: 16 rows per image.
    patch_only = density.tiles(backbone, images, torch.tensor([16 + 3]), n_rows=32)
    assert torch.equal(patch_only[0], torch.full((3, 8, 8), 103.0))
    assert density.tiles(backbone, images, torch.tensor([0]), n_rows=10) is None  # unknown layout


def test_wandb_logger_gets_a_histogram_and_an_image(tmp_path) -> None:
    wandb = pytest.importorskip("wandb")

    class FakeRun:
        def __init__(self) -> None:
            self.logged: list[dict] = []

        def log(self, payload: dict) -> None:
            self.logged.append(payload)

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:  # no wandb run, nothing written
            self.run, self.metrics = FakeRun(), []

        @property
        def experiment(self):
            return self.run

        def log_metrics(self, metrics, step=None):
            self.metrics.append((metrics, step))

    density = FeatureDensityLogger(save_png=False)
    density.folder = tmp_path
    density._chosen = {"sae": [3, 1]}
    fake_logger = FakeWandb()
    stats = {"log10_density": torch.tensor([-10.0, -2.0, -1.0]), "dead_count": torch.tensor(1),
             "dense_count": torch.tensor(0), "alive_pct": torch.tensor(66.7)}  # fmt: skip
    density.write_logs(SimpleNamespace(global_step=9, loggers=[fake_logger]), stats, torch.rand(3, 10, 20))
    payload = fake_logger.run.logged[0]
    assert isinstance(payload[HISTOGRAM_TAG], wandb.Histogram) and isinstance(payload[IMAGE_TAG], wandb.Image)
    assert payload["trainer/global_step"] == 9
    assert fake_logger.metrics == [({"density/dead_count": 1.0, "density/dense_count": 0.0,
                                     "density/alive_pct": pytest.approx(66.7)}, 9)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- upload
class FakeApi:
    """Stands in for huggingface_hub.HfApi: records each call and what the folder held at upload time."""

    calls: list[tuple] = []
    fail: BaseException | None = None
    pool: ThreadPoolExecutor | None = None

    def __init__(self, **kwargs) -> None:
        FakeApi.calls.append(("init", kwargs, threading.current_thread().name))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeApi.fail is not None:
            raise FakeApi.fail

    def run_as_future(self, fn, *args, **kwargs):  # huggingface_hub runs these on one background worker
        if FakeApi.pool is None:
            FakeApi.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-upload")
        return FakeApi.pool.submit(fn, *args, **kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, files, kwargs, threading.current_thread().name))


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail, FakeApi.pool = [], None, None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def uploads(api) -> list[tuple]:
    return [c for c in api.calls if c[0] == "upload_folder"]


def fit_with_uploader(tmp_path, uploader, max_steps=6) -> SAEModule:
    module = SAEModule(sae_config(), init_tokens=64, export_dir=str(tmp_path / "sae"))
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "eval.json").write_text(json.dumps({"explained_variance_pct": 91.25, "l0": 4.0}))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer(tmp_path, max_steps=max_steps, callbacks=[ckpt, uploader], logger=False).fit(module, cached_loader())
    return module


def test_uploads_the_export_with_a_model_card(tmp_path, fake_api) -> None:
    uploader = HubUploader("me/tiny-sae", every_n_checkpoints=2, folder=str(tmp_path / "upload"))
    module = fit_with_uploader(tmp_path, uploader)
    assert uploader.n_checkpoints == 3  # steps 2, 4, 6 (last.ckpt at the same step is not counted twice)
    done = uploads(fake_api)
    assert [c[4] != "MainThread" for c in done] == [True, True]  # step 4 during training, step 6 at fit end: both
    # in huggingface_hub's background worker, and the final one finished before fit returned
    assert [c[3]["commit_message"].endswith(f"(step {s})") for c, s in zip(done, (4, 6), strict=True)] == [True] * 2
    assert all(c[0] != "init" or "token" not in c[1] for c in fake_api.calls)
    assert ("create_repo", "me/tiny-sae", {"private": True, "exist_ok": True, "repo_type": "model"}) in fake_api.calls
    files = done[-1][2]
    assert {"cfg.json", "sae_weights.safetensors", "README.md", "eval.json"} <= set(files)
    card = files["README.md"].decode()
    for text in ("license: apache-2.0", f"`{HOOK}`", "| d_in | 32 |", "| d_sae | 64 |", "| k | 4 |",
                 f"| Training tokens | {int(module.tokens_seen):,} |", "| explained_variance_pct | 91.25 |",
                 'SparseAutoencoder.from_pretrained("me/tiny-sae")'):  # fmt: skip
        assert text in card, text
    assert uploader.uploaded_step == 6 and uploader.error is None
    loaded = dict(SparseAutoencoder.load(tmp_path / "upload").named_parameters())
    for name, value in module.sae.named_parameters():
        assert torch.equal(loaded[name], value), name


def test_failed_upload_warns_keeps_the_folder_and_retries_at_fit_end(tmp_path, fake_api, monkeypatch, caplog) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    fake_api.fail = ConnectionError("Network is unreachable (token hf_SECRETtoken123)")
    uploader = HubUploader("me/tiny-sae", folder=str(tmp_path / "upload"))
    with caplog.at_level(logging.WARNING, logger="prisma_lightning.callbacks.hub_uploader"):
        module = fit_with_uploader(tmp_path, uploader)
    assert module.trainer.global_step == 6 and module.trainer.state.finished  # training was not disturbed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ConnectionError: Network is unreachable" in w and "retried at the end of fit" in w for w in warnings)
    assert any("final upload to me/tiny-sae failed too" in w for w in warnings)
    assert not any("hf_SECRETtoken123" in w for w in warnings) and uploader.error.endswith("(token ***)")
    create_calls = [c for c in fake_api.calls if c[0] == "create_repo"]
    inits = [c for c in fake_api.calls if c[0] == "init"]
    assert len(create_calls) >= 2 and len(inits) == 1  # one HfApi; the retry ran at the end of fit
    assert uploads(fake_api) == [] and uploader.uploaded_step is None
    assert {"cfg.json", "sae_weights.safetensors", "README.md"} <= {p.name for p in (tmp_path / "upload").iterdir()}
    assert SparseAutoencoder.load(tmp_path / "upload").d_sae == 64


def test_real_hub_client_with_the_network_unreachable(tmp_path, monkeypatch, caplog) -> None:
    """No fake: huggingface_hub's own client against an endpoint that refuses connections."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    uploader = HubUploader("me/tiny-sae", folder=str(tmp_path / "upload"))
    with caplog.at_level(logging.WARNING, logger="prisma_lightning.callbacks.hub_uploader"):
        module = fit_with_uploader(tmp_path, uploader)
    assert module.trainer.global_step == 6 and module.trainer.state.finished
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("retried at the end of fit" in w for w in warnings) and any("failed too" in w for w in warnings)
    assert not any("hf_SECRETtoken123" in w for w in warnings) and uploader.uploaded_step is None
    assert uploader.error is not None and "Connection refused" in uploader.error
    assert SparseAutoencoder.load(tmp_path / "upload").d_sae == 64


def test_a_server_that_never_answers_cannot_hang_training(tmp_path, monkeypatch, caplog) -> None:
    """huggingface_hub's real client against an endpoint that accepts connections and never replies: every
    network wait is bounded, fit ends after at most upload_timeout of waiting, and the SAE is exported."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []

    def accept_and_hold() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    uploader = HubUploader("me/tiny-sae", folder=str(tmp_path / "upload"), upload_timeout=2, network_timeout=1)
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="prisma_lightning.callbacks.hub_uploader"):
            module = fit_with_uploader(tmp_path, uploader)
    finally:
        server.close()
        for conn in held:
            conn.close()
    assert time.monotonic() - start < 120 and module.trainer.state.finished
    assert SparseAutoencoder.load(tmp_path / "sae").d_sae == 64  # the run's own export
    assert SparseAutoencoder.load(tmp_path / "upload").d_sae == 64  # the folder to upload later is kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("upload" in w and ("did not finish" in w or "failed" in w) for w in warnings), warnings
    assert uploader.uploaded_step is None and not any("hf_SECRETtoken123" in w for w in warnings)


def test_retry_at_fit_end_succeeds_after_a_transient_failure(tmp_path, fake_api) -> None:
    fake_api.fail = OSError("temporary DNS failure")
    uploader = HubUploader("me/tiny-sae", every_n_checkpoints=3, folder=str(tmp_path / "upload"), upload_at_end=False)

    class Recover(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            uploader.join()
            fake_api.fail = None  # the network is back for the retry

    module = SAEModule(sae_config(), init_tokens=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer(tmp_path, max_steps=6, callbacks=[ckpt, uploader, Recover()], logger=False).fit(module, cached_loader())
    assert len(uploads(fake_api)) == 1 and uploader.error is None  # the retry at the end of fit
    assert uploader.uploaded_step == 6


def test_only_rank_zero_uploads_and_save_pretrained_modules_are_supported(tmp_path, fake_api) -> None:
    class ViTModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = load_hooked_model("test/vit-tiny", pretrained=False)

    module = ViTModule()
    uploader = HubUploader("me/tiny-vit", folder=str(tmp_path / "up"))
    fake = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=3, is_global_zero=False,
                           checkpoint_callback=None)  # fmt: skip
    uploader.setup(fake, module, "fit")
    uploader.on_save_checkpoint(fake, module, {})
    assert uploader.n_checkpoints == 0 and not (tmp_path / "up").exists()
    fake.is_global_zero = True
    uploader.on_save_checkpoint(fake, module, {})
    uploader.join()
    files = uploads(fake_api)[0][2]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert "Vision transformer" in files["README.md"].decode() and "| d_model | 32 |" in files["README.md"].decode()
    with pytest.raises(TypeError, match="export"):
        uploader.setup(fake, pl.LightningModule(), "fit")
    with pytest.raises(ValueError, match="repo_id"):
        HubUploader("no-slash")


# ---------------------------------------------------------------------------------------------------- YAML sets
@pytest.mark.parametrize("name", ["sae_default.yaml", "sae_with_upload.yaml"])
def test_callback_yaml_files_parse(name: str, capsys) -> None:
    from prisma_lightning.cli import PrismaCLI

    args = ["fit", "--model", "prisma_lightning.modules.SAEModule", "--model.sae", json.dumps(sae_config().to_dict()),
            "--trainer.callbacks", str(ROOT / "callbacks" / name), "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        PrismaCLI(args=args)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    listed = yaml.safe_load((ROOT / "callbacks" / name).read_text())
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [c["class_path"] for c in listed]
    expected = ["ModelCheckpoint", "LearningRateMonitor", "SAEEvaluator", "DeadFeatureResampler"]
    expected += ["FeatureDensityLogger"]
    expected += ["HubUploader"] if "upload" in name else []
    assert [c["class_path"].rsplit(".", 1)[1] for c in listed] == expected
    evaluator = next(c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("SAEEvaluator"))
    assert evaluator["init_args"]["every_n_steps"] is None and evaluator["init_args"]["ce_source"] == "auto"


def write_image_folder(root: Path, n_per_class: int = 8) -> None:
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                pixels = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_callback_yaml_runs_a_fit_with_every_callback(tmp_path, fake_api) -> None:
    """sae_with_upload.yaml through the CLI with its step intervals shrunk (a temp copy) on a tiny online run."""
    from prisma_lightning.cli import PrismaCLI

    callbacks = yaml.safe_load((ROOT / "callbacks" / "sae_with_upload.yaml").read_text())
    shrink = {"every_n_train_steps": 4, "every_n_steps": 4, "n_samples": 64, "n_batches": 2, "top_k_patches": 4,
              "repo_id": "me/yaml-sae"}  # fmt: skip
    for callback in callbacks:
        callback["init_args"] = {k: shrink.get(k, v) if v is not None else v for k, v in callback["init_args"].items()}
    file = tmp_path / "callbacks.yaml"
    file.write_text(yaml.safe_dump(callbacks))
    write_image_folder(tmp_path / "images")
    model = {"sae": sae_config(dead_feature_window=2).to_dict(), "backbone": "test/vit-tiny",
             "pretrained_backbone": False, "buffer_tokens": 0, "batch_tokens": 68, "init_tokens": 68}  # fmt: skip
    args = ["fit", "--model", "prisma_lightning.modules.SAEModule", "--model.init_args", json.dumps(model),
            "--data", "prisma_lightning.datamodules.ImageNetDataModule", "--data.root", str(tmp_path / "images"),
            "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.callbacks", str(file),
            "--trainer.max_steps", "8", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--seed_everything", "0"]  # fmt: skip
    cli = PrismaCLI(args=args)
    t = cli.trainer
    assert t.global_step == 8
    by_type = {type(c).__name__: c for c in t.callbacks}
    assert by_type["DeadFeatureResampler"].last_step >= 4
    density = by_type["FeatureDensityLogger"]
    assert density.last_stats is not None and density.last_grid is not None
    log_dir = Path(t.log_dir)
    assert list((log_dir / "feature_density").glob("top_patches_step*.png"))
    assert (log_dir / "sae" / "eval.json").is_file()
    card = uploads(fake_api)[-1][2]["README.md"].decode()
    assert "# me/yaml-sae" in card and "explained_variance_pct" in card


def test_vit_classifier_upload_keeps_checkpoints_curve_data_and_hyperparameters(tmp_path, fake_api) -> None:
    """ViT mice: the export, one weights folder per uploaded step, the accuracy curve and the training setup."""
    from prisma_lightning.backbones import HookedViT, HookedViTConfig
    from prisma_lightning.datamodules import DSpritesDataModule
    from prisma_lightning.modules import ViTClassifierModule

    cfg = HookedViTConfig(d_model=16, n_layers=1, n_heads=2, image_size=16, patch_size=8, in_channels=1, n_classes=3)
    module = ViTClassifierModule(cfg, lr=3e-3, warmup_steps=1, max_steps=6, label_smoothing=0.1)
    data = DSpritesDataModule(cache=False, subset_size=64, image_size=16, val_fraction=0.25, test_fraction=0.0,
                              batch_size=8)  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    uploader = HubUploader("me/dsprites-vit", folder=str(tmp_path / "up"))
    trainer(tmp_path, max_steps=6, val_check_interval=2, callbacks=[ckpt, uploader], logger=False,
            num_sanity_val_steps=0).fit(module, data)  # fmt: skip
    uploader.join()
    assert uploader.error is None and uploader.uploaded_step == 6
    files = uploads(fake_api)[-1][2]
    steps = [2, 4, 6]
    expected = {"config.json", "model.safetensors", "README.md", "training_curve.json"} | {
        f"checkpoints/step_{s:08d}/{name}" for s in steps for name in ("config.json", "model.safetensors")
    }
    assert expected <= set(files), sorted(files)
    curve = json.loads(files["training_curve.json"])
    assert [p["step"] for p in curve] == steps and all("val/acc" in p and "val/loss" in p for p in curve)
    card = files["README.md"].decode()
    for text in ("## Training curve", "| val/acc |", "## Checkpoints", "checkpoints/step_<step>/", "(2, 4, 6)",
                 "Data: `DSpritesDataModule`", "| subset_size | 64 |", "| lr | 0.003 |", "| label_smoothing | 0.1 |",
                 "| d_model | 16 |", "Training steps | 6"):  # fmt: skip
        assert text in card, text
    assert "SAEEvaluator" not in card
    # Each step folder holds that step's weights: equal to the Lightning checkpoint of the same step.
    for step in steps:
        saved = torch.load(next((tmp_path / "ckpt").glob(f"*step={step}.ckpt")), weights_only=True)["state_dict"]
        model = HookedViT.from_pretrained(tmp_path / "up", subfolder=f"checkpoints/step_{step:08d}")
        for name, value in model.state_dict().items():
            assert torch.equal(value, saved[f"model.{name}"]), (step, name)


def test_a_multi_sae_run_uploads_one_subfolder_per_sae_and_one_card(tmp_path, fake_api) -> None:
    template = {k: v for k, v in vars(sae_config()).items() if k not in ("d_sae",)}
    module = SAEModule(sae=template, sweep={"k": [2, 4]}, init_tokens=64, export_dir=str(tmp_path / "saes"))
    uploader = HubUploader("me/sae-sweep", folder=str(tmp_path / "upload"))
    trainer(tmp_path, max_steps=2, callbacks=[uploader], logger=False).fit(module, cached_loader())
    names = sorted(module.saes)
    assert len(names) == 2
    files = uploads(fake_api)[-1][2]
    for name in names:
        assert {f"{name}/cfg.json", f"{name}/sae_weights.safetensors"} <= set(files), sorted(files)
        loaded = SparseAutoencoder.load(tmp_path / "upload" / name)
        assert loaded.cfg.k == module.saes[name].cfg.k
        assert torch.equal(loaded.W_dec, module.saes[name].W_dec)
    card = files["README.md"].decode()
    assert all(f"`{name}`" in card or name in card for name in names)
    assert f'subfolder="{names[0]}"' in card
