"""SAEModule / TranscoderModule / ActivationCacheModule + ActivationWriter with Lightning on tiny models."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.activations import ActivationShards
from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.callbacks import ActivationWriter
from prisma_lightning.datamodules.activations import ActivationDataModule
from prisma_lightning.modules import ActivationCacheModule, SAEModule, TranscoderModule
from prisma_lightning.sae import SAEConfig, SparseAutoencoder, TranscoderConfig

HOOK = "blocks.0.hook_resid_post"


def trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                    log_every_n_steps=1, accelerator="cpu", devices=1)  # fmt: skip
    return pl.Trainer(**{**defaults, **kw})


def image_loader(n=64, batch=8, size=16, frames=None, seed=0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, frames, 3, size, size) if frames else (n, 3, size, size)
    images = torch.randn(shape, generator=gen)
    return DataLoader(TensorDataset(images, torch.zeros(n)), batch_size=batch)


def sae_config(**kw) -> SAEConfig:
    base = dict(d_in=32, expansion_factor=4, architecture="topk", k=4, hook_name=HOOK, b_dec_init="mean")
    return SAEConfig(**{**base, **kw})


def test_online_training_learns_and_exports(tmp_path) -> None:
    module = SAEModule(sae_config(), backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=512,
                       batch_tokens=128, init_tokens=256, lr=3e-3)  # fmt: skip
    t = trainer(tmp_path, max_steps=40)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "train/mse_loss" in trainer.callback_metrics:
                losses.append(float(trainer.callback_metrics["train/mse_loss"]))

    t.callbacks.append(Record())
    t.fit(module, image_loader(n=160))
    assert t.global_step == 40
    assert int(module.tokens_seen) == 40 * 128
    assert module.buffer.size <= module.buffer.capacity
    assert losses[-1] < 0.8 * losses[0]
    exported = SparseAutoencoder.load(tmp_path / "lightning_logs" / "version_0" / "sae")
    exported_params = dict(exported.named_parameters())
    for name, value in module.sae.named_parameters():
        assert_close(exported_params[name], value)
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "sae" / "cfg.json").is_file()


def test_cls_tokens_give_one_row_per_image(tmp_path) -> None:
    module = SAEModule(sae_config(tokens="cls"), backbone="test/vit-tiny", pretrained_backbone=False,
                       buffer_tokens=0, batch_tokens=8, init_tokens=8)  # fmt: skip
    trainer(tmp_path, max_steps=5).fit(module, image_loader(n=40, batch=8))
    assert int(module.tokens_seen) == 5 * 8  # 8 images -> 8 rows -> exactly one step per batch


def test_cached_mode_first_step_equals_online(tmp_path) -> None:
    loader = image_loader(n=8, batch=8)
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    images = next(iter(loader))[0]
    with torch.no_grad():
        _, cache = backbone.run_with_cache(images, names_filter=HOOK)
    rows = cache[HOOK].reshape(-1, 32)  # 8 images x 17 tokens
    online = SAEModule(sae_config(), backbone=backbone, buffer_tokens=0, batch_tokens=rows.shape[0],
                       init_tokens=rows.shape[0])  # fmt: skip
    trainer(tmp_path / "a", max_steps=1).fit(online, loader)
    cached = SAEModule(sae_config(), init_tokens=rows.shape[0])
    trainer(tmp_path / "b", max_steps=1).fit(cached, DataLoader([rows], batch_size=None))
    for name, value in online.sae.state_dict().items():
        assert_close(cached.sae.state_dict()[name], value, atol=1e-6, rtol=1e-6)
    assert not torch.equal(online.sae.W_dec, SparseAutoencoder(sae_config()).W_dec)


def make_cache(tmp_path, hooks=(HOOK,), n=48, backbone="test/vit-tiny"):
    cache_module = ActivationCacheModule(backbone, hook_names=list(hooks), pretrained_backbone=False)
    writer = ActivationWriter(str(tmp_path / "acts"), images_per_shard=16)
    trainer(tmp_path, callbacks=[writer]).predict(cache_module, image_loader(n=n, batch=8), return_predictions=False)
    return tmp_path / "acts"


def test_caching_writes_shards_that_match_the_backbone(tmp_path) -> None:
    backbone = load_hooked_model("test/vit-tiny", pretrained=False)
    root = make_cache(tmp_path, backbone=backbone)
    shards = ActivationShards(root / HOOK)
    assert shards.index["n_images"] == 48 and shards.index["complete"] and shards.index["hook"] == HOOK
    assert shards.n_rows == 48 * 17
    images = torch.cat([b[0] for b in image_loader(n=48, batch=8)])[:16]
    with torch.no_grad():
        _, cache = backbone.run_with_cache(images, names_filter=HOOK)
    expected = cache[HOOK].reshape(-1, 32)
    got = shards.read(0, 0, shards.shards[0]["rows"])
    assert_close(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()])


def test_caching_resumes_where_it_stopped(tmp_path) -> None:
    root = make_cache(tmp_path, n=32)
    index_before = ActivationShards(root / HOOK).index
    assert index_before["n_images"] == 32
    # Re-running over a longer dataset continues after image 32 and keeps the first shards untouched.
    first_shard = (root / HOOK / "shard_00000.npy").read_bytes()
    make_cache(tmp_path, n=48)
    shards = ActivationShards(root / HOOK)
    assert shards.index["n_images"] == 48
    assert (root / HOOK / "shard_00000.npy").read_bytes() == first_shard


def fit_cached(tmp_path, root, max_steps, ckpt_path=None, every=1):
    dm = ActivationDataModule(str(root / HOOK), batch_size=64, seed=3)
    module = SAEModule(sae_config(), init_tokens=64, lr=1e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=every, save_top_k=-1)
    t = trainer(tmp_path, max_steps=max_steps, callbacks=[ckpt])
    t.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path) -> None:
    root = make_cache(tmp_path)
    full = fit_cached(tmp_path / "full", root, max_steps=9)
    fit_cached(tmp_path / "part", root, max_steps=4)
    resumed = fit_cached(tmp_path / "part", root, max_steps=9, ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    for name, value in full.sae.state_dict().items():
        assert_close(resumed.sae.state_dict()[name], value, atol=1e-6, rtol=1e-6)


def test_online_resume_restores_the_buffer(tmp_path) -> None:
    def run(max_steps, ckpt_path=None):
        module = SAEModule(sae_config(), backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=256,
                           batch_tokens=64, init_tokens=64)  # fmt: skip
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
        trainer(tmp_path, max_steps=max_steps, callbacks=[ckpt]).fit(module, image_loader(n=64), ckpt_path=ckpt_path)
        return module

    module = run(6)
    state = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    (buffer,) = state["mixing_buffers"].values()
    assert buffer["data"].shape[1] == 32 and buffer["size"] == module.buffer.size


def test_width_mismatch_fails_at_setup_naming_both(tmp_path) -> None:
    module = SAEModule(sae_config(d_in=48), backbone="test/vit-tiny", pretrained_backbone=False)
    with pytest.raises(ValueError, match=r"expects width 48 .* has width 32"):
        trainer(tmp_path, max_steps=1).fit(module, image_loader())


def test_unknown_hook_lists_close_names(tmp_path) -> None:
    module = SAEModule(sae_config(hook_name="blocks.0.hook_resid_pst"), backbone="test/vit-tiny",
                       pretrained_backbone=False)  # fmt: skip
    with pytest.raises(KeyError, match="blocks.0.hook_resid_post"):
        trainer(tmp_path, max_steps=1).fit(module, image_loader())


def test_nan_activations_name_hook_and_step(tmp_path) -> None:
    loader = image_loader()
    loader.dataset.tensors[0][3] = float("nan")
    module = SAEModule(sae_config(), backbone="test/vit-tiny", pretrained_backbone=False)
    with pytest.raises(ValueError, match=r"non-finite activations .* 'blocks.0.hook_resid_post', step 0"):
        trainer(tmp_path, max_steps=2).fit(module, loader)


def test_bad_module_arguments() -> None:
    with pytest.raises(ValueError, match="lr=-1.0 must be a positive finite number"):
        SAEModule(sae_config(), lr=-1.0)
    with pytest.raises(ValueError, match="buffer_tokens=100 must hold at least two batches"):
        SAEModule(sae_config(), buffer_tokens=100, batch_tokens=64)


def test_lr_schedule_warmup_and_cosine() -> None:
    module = SAEModule(sae_config(), lr_warmup_steps=10, lr_decay="cosine", lr_decay_steps=110, min_lr_ratio=0.1)
    assert module.lr_lambda(0) == pytest.approx(0.1) and module.lr_lambda(9) == pytest.approx(1.0)
    assert module.lr_lambda(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert module.lr_lambda(110) == pytest.approx(0.1) and module.lr_lambda(500) == pytest.approx(0.1)


@pytest.mark.parametrize("online", [True, False])
def test_transcoder_module_trains(tmp_path, online: bool) -> None:
    hook_in, hook_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    cfg = TranscoderConfig(
        d_in=32, d_out=32, expansion_factor=4, architecture="topk", k=4, hook_name=hook_in, hook_name_out=hook_out,
        b_dec_init="mean", normalize_activations="expected_norm",
    )  # fmt: skip
    if online:
        module = TranscoderModule(cfg, backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=512,
                                  batch_tokens=128, init_tokens=128, lr=3e-3)  # fmt: skip
        data = dict(train_dataloaders=image_loader(n=320))
    else:
        root = make_cache(tmp_path, hooks=(hook_in, hook_out))
        module = TranscoderModule(cfg, init_tokens=64, lr=3e-3)
        data = dict(datamodule=ActivationDataModule(str(root / hook_in), batch_size=64, path_out=str(root / hook_out)))
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "train/mse_loss" in trainer.callback_metrics:
                losses.append(float(trainer.callback_metrics["train/mse_loss"]))

    t = trainer(tmp_path / "fit", max_steps=60, callbacks=[Record()])
    t.fit(module, **data)
    assert t.global_step == 60
    assert losses[-1] < 0.7 * losses[0]


def test_video_backbone_online(tmp_path) -> None:
    cfg = sae_config(tokens="patches")
    module = SAEModule(cfg, backbone="test/video-tiny", pretrained_backbone=False, buffer_tokens=0,
                       batch_tokens=32, init_tokens=32)  # fmt: skip
    trainer(tmp_path, max_steps=4).fit(module, image_loader(n=8, batch=2, frames=4))
    assert int(module.tokens_seen) == 4 * 32  # 2 clips x (2 x 4 x 4) tubelets = 64 rows = 2 steps per batch


def test_custom_sae_subclass_example_runs_through_the_cli(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from prisma_lightning.activations import ShardWriter
    from prisma_lightning.cli import PrismaCLI

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "examples"))
    writer = ShardWriter(tmp_path / "acts", d=64, tokens_per_image=16, images_per_shard=32)
    writer.add(torch.randn(64 * 16, 64), 64)
    writer.close()
    args = [
        "fit", "--config", str(root / "configs/sae/cached_shards.yaml"),
        "--model", "custom_sae_loss.DecorrelatedSAEModule",
        "--model.init_args.overlap_coefficient", "0.5",
        "--model.init_args.export_dir", str(tmp_path / "sae"),
        "--data.init_args.path", str(tmp_path / "acts"),
        "--data.init_args.batch_size", "128",
        "--trainer.max_steps", "5",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert type(cli.model).__name__ == "DecorrelatedSAEModule" and cli.model.overlap_coefficient == 0.5
    assert cli.model.sae.cfg.d_in == 64 and cli.model.sae.cfg.k == 8  # the config's other arguments still apply
    assert "train/decoder_overlap" in cli.trainer.logged_metrics
    assert (tmp_path / "sae" / "cfg.json").is_file()


def test_module_hook_name_and_tokens_are_the_sae_config_everywhere(tmp_path) -> None:
    """One source of truth: the module's ``hook_name`` / ``tokens`` become the SAE's config, which decides the hook
    trained on, the rows taken, the exported cfg.json and the hook ``prisma validate`` evaluates at."""
    hook = "blocks.1.hook_resid_post"
    module = SAEModule(sae_config(), hook_name=hook, tokens="patches", backbone="test/vit-tiny",
                       pretrained_backbone=False, buffer_tokens=0, batch_tokens=64, init_tokens=64)  # fmt: skip
    assert module.sae.cfg.hook_name == hook and module.sae.cfg.tokens == "patches"
    assert module.hook_name == hook and module.tokens == "patches"
    seen: list[tuple[str, int]] = []
    backbone = module.backbone
    original = backbone.run_with_cache

    def spy(images, names_filter=None, **kw):
        out, cache = original(images, names_filter=names_filter, **kw)
        seen.extend((name, cache[name].shape[1]) for name in cache)
        return out, cache

    backbone.run_with_cache = spy
    trainer(tmp_path, max_steps=2, logger=False).fit(module, image_loader(n=32))
    assert {name for name, _ in seen} == {hook}  # trained on the module's hook, not the template's
    assert int(module.tokens_seen) == 2 * 64
    exported = SparseAutoencoder.load(tmp_path / "sae")
    assert exported.cfg.hook_name == hook and exported.cfg.tokens == "patches"
    validated = SAEModule(str(tmp_path / "sae"), backbone="test/vit-tiny", pretrained_backbone=False)
    assert validated.hook_name == hook and validated.tokens == "patches"  # what validate splices at
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        SAEModule(str(tmp_path / "sae"), hook_name=HOOK)  # a trained SAE is never silently re-pointed
