"""DDP end to end: `prisma fit` on 2 CPU processes (gloo) equals a 1-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from prisma_lightning.activations import ShardWriter
from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.sae import SparseAutoencoder

pytestmark = pytest.mark.slow

SAE = {"d_in": 32, "expansion_factor": 4, "architecture": "topk", "k": 4, "aux_k": 16, "dead_feature_window": 3,
       "hook_name": "blocks.0.hook_resid_post", "b_dec_init": "mean"}  # fmt: skip
TRAINER = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
           "enable_checkpointing": False}  # fmt: skip


def run_cli(tmp_path: Path, config: dict, name: str, *extra: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(path), *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_sae(a: Path, b: Path, atol: float = 1e-5) -> None:
    sae_a, sae_b = SparseAutoencoder.load(a), SparseAutoencoder.load(b)
    for (name, p), (_, q) in zip(sae_a.named_parameters(), sae_b.named_parameters(), strict=True):
        assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


def test_cached_sae_ddp_equals_one_process(tmp_path) -> None:
    torch.manual_seed(0)
    writer = ShardWriter(tmp_path / "acts", d=32, tokens_per_image=16, images_per_shard=64)
    writer.add(torch.randn(256 * 16, 32) @ torch.randn(32, 32), 256)
    writer.close()
    config = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "max_steps": 12},
        "model": {"class_path": "prisma_lightning.modules.SAEModule",
                  "init_args": {"sae": SAE, "init_tokens": 256, "lr": 1e-3}},
        "data": {"class_path": "prisma_lightning.datamodules.ActivationDataModule",
                 "init_args": {"path": str(tmp_path / "acts"), "batch_size": 256}},
    }  # fmt: skip
    run_cli(tmp_path, config, "one", "--model.init_args.export_dir", str(tmp_path / "one"))
    run_cli(tmp_path, config, "two", "--model.init_args.export_dir", str(tmp_path / "two"),
            "--trainer.strategy", "ddp", "--trainer.devices", "2")  # fmt: skip
    assert_same_sae(tmp_path / "one", tmp_path / "two")
    # Rank 0 alone writes the export: one folder with one set of files.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_online_sae_ddp_equals_one_process(tmp_path) -> None:
    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path / "backbone")
    data = {
        "class_path": "prisma_lightning.datamodules.DSpritesDataModule",
        "init_args": {"cache": False, "subset_size": 160, "image_size": 16, "channels": 3, "batch_size": 8},
    }
    model = {"class_path": "prisma_lightning.modules.SAEModule",
             "init_args": {"sae": SAE, "backbone": str(tmp_path / "backbone"), "buffer_tokens": 0,
                           "batch_tokens": 8 * 17, "init_tokens": 8 * 17, "lr": 1e-3}}  # fmt: skip
    config = {"seed_everything": 0, "trainer": {**TRAINER, "max_steps": 6, "limit_val_batches": 0},
              "model": model, "data": data}  # fmt: skip
    run_cli(tmp_path, config, "one", "--model.init_args.export_dir", str(tmp_path / "one"))
    # Two processes with 4 images each = the same 8-image global batches (GlobalBatchSampler).
    run_cli(tmp_path, config, "two", "--model.init_args.export_dir", str(tmp_path / "two"),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.batch_size", "4",
            "--model.init_args.batch_tokens", str(4 * 17), "--model.init_args.init_tokens", str(4 * 17))  # fmt: skip
    assert_same_sae(tmp_path / "one", tmp_path / "two")
