"""DDP end to end: `prisma fit` on 2 CPU processes (gloo) equals a 1-process run with the same global batch."""

from __future__ import annotations

import json
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
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

pytestmark = pytest.mark.slow

SAE = {"d_in": 32, "expansion_factor": 4, "architecture": "topk", "k": 4, "aux_k": 16, "dead_feature_window": 3,
       "hook_name": "blocks.0.hook_resid_post", "b_dec_init": "mean"}  # fmt: skip
TRAINER = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
           "enable_checkpointing": False}  # fmt: skip


def run_cli(tmp_path: Path, config: dict, name: str, *extra: str, subcommand: str = "fit") -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "prisma_lightning", subcommand, "--config", str(path), *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_sae(a: Path, b: Path, atol: float = 1e-5) -> None:
    sae_a, sae_b = SparseAutoencoder.load(a), SparseAutoencoder.load(b)
    for (name, p), (_, q) in zip(sae_a.named_parameters(), sae_b.named_parameters(), strict=True):
        assert_close(p, q, atol=atol, rtol=0, msg=f"{name} differs")


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_cached_sae_ddp_equals_one_process(tmp_path, architecture: str) -> None:
    """BatchTopK selects over the global batch (all ranks' rows), so it too matches one process."""
    torch.manual_seed(0)
    writer = ShardWriter(tmp_path / "acts", d=32, tokens_per_image=16, images_per_shard=64)
    writer.add(torch.randn(256 * 16, 32) @ torch.randn(32, 32), 256)
    writer.close()
    config = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "max_steps": 12},
        "model": {"class_path": "prisma_lightning.modules.SAEModule",
                  "init_args": {"sae": {**SAE, "architecture": architecture}, "init_tokens": 256, "lr": 1e-3}},
        "data": {"class_path": "prisma_lightning.datamodules.ActivationDataModule",
                 "init_args": {"path": str(tmp_path / "acts"), "batch_size": 256}},
    }  # fmt: skip
    run_cli(tmp_path, config, "one", "--model.init_args.export_dir", str(tmp_path / "one"))
    run_cli(tmp_path, config, "two", "--model.init_args.export_dir", str(tmp_path / "two"),
            "--trainer.strategy", "ddp", "--trainer.devices", "2")  # fmt: skip
    assert_same_sae(tmp_path / "one", tmp_path / "two")
    # Rank 0 alone writes the export: one folder with one set of files.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def assert_same_eval(a: Path, b: Path, atol: float = 1e-5) -> None:
    table_a, table_b = (json.loads((folder / "eval.json").read_text()) for folder in (a, b))
    assert table_a.keys() == table_b.keys()
    for key, value in table_a.items():
        if isinstance(value, float):
            assert abs(value - table_b[key]) <= atol * max(1.0, abs(value)), (key, value, table_b[key])
        else:
            assert value == table_b[key], key


def test_online_sae_ddp_equals_one_process(tmp_path) -> None:
    """Weights after training and the evaluation table (synced torchmetrics) equal a 1-process run."""
    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path / "backbone")
    data = {
        "class_path": "prisma_lightning.datamodules.DSpritesDataModule",
        "init_args": {"cache": False, "subset_size": 160, "image_size": 16, "channels": 3, "batch_size": 8},
    }
    model = {"class_path": "prisma_lightning.modules.SAEModule",
             "init_args": {"sae": SAE, "backbone": str(tmp_path / "backbone"), "buffer_tokens": 0,
                           "batch_tokens": 8 * 17, "init_tokens": 8 * 17, "lr": 1e-3}}  # fmt: skip
    # Validation (16 images = 2 global batches) runs once, after the last step, inside Lightning's loop.
    evaluator = {"class_path": "prisma_lightning.callbacks.SAEEvaluator",
                 "init_args": {"n_batches": None, "ce_source": "head", "print_table": False}}  # fmt: skip
    trainer = {**TRAINER, "max_steps": 6, "val_check_interval": 6, "num_sanity_val_steps": 0,
               "callbacks": [evaluator]}  # fmt: skip
    config = {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}
    run_cli(tmp_path, config, "one", "--model.init_args.export_dir", str(tmp_path / "one"))
    # Two processes with 4 images each = the same 8-image global batches (GlobalBatchSampler).
    run_cli(
        tmp_path,
        config,
        "two",
        "--model.init_args.export_dir",
        str(tmp_path / "two"),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.init_args.batch_size",
        "4",
        "--model.init_args.batch_tokens",
        str(4 * 17),
    )  # fmt: skip (init_tokens counts all ranks' rows)
    assert_same_sae(tmp_path / "one", tmp_path / "two")
    assert_same_eval(tmp_path / "one", tmp_path / "two")
    table = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert table["global_step"] == 6 and table["ce_recovered_pct"] is not None


def test_cached_eval_table_ddp_equals_one_process(tmp_path) -> None:
    """`prisma validate` of an SAE folder on cached activations: 2 processes give the 1-process table."""
    torch.manual_seed(0)
    writer = ShardWriter(tmp_path / "acts", d=32, tokens_per_image=16, images_per_shard=64)
    writer.add(torch.randn(256 * 16, 32) @ torch.randn(32, 32), 256)
    writer.close()
    relu = {k: v for k, v in SAE.items() if k not in ("k", "aux_k")}
    sae = SparseAutoencoder(SAEConfig(**{**relu, "architecture": "relu"}))
    for name in ("one", "two"):
        sae.save(tmp_path / name)
    config = {
        "seed_everything": 0,
        "trainer": {**TRAINER, "callbacks": [{"class_path": "prisma_lightning.callbacks.SAEEvaluator",
                                              "init_args": {"n_batches": None, "print_table": False}}]},
        "model": {"class_path": "prisma_lightning.modules.SAEModule", "init_args": {"sae": str(tmp_path / "one")}},
        "data": {"class_path": "prisma_lightning.datamodules.ActivationDataModule",
                 "init_args": {"path": str(tmp_path / "acts"), "batch_size": 256, "val_fraction": 0.5}},
    }  # fmt: skip
    run_cli(tmp_path, config, "one", "--trainer.default_root_dir", str(tmp_path / "run_one"), subcommand="validate")
    run_cli(
        tmp_path,
        config,
        "two",
        "--model.init_args.sae",
        str(tmp_path / "two"),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run_two"),
        subcommand="validate",
    )
    # the evaluated SAE folders are inputs: the tables go to each run's own folder
    assert not (tmp_path / "one" / "eval.json").exists() and not (tmp_path / "two" / "eval.json").exists()
    assert_same_eval(tmp_path / "run_one" / "eval", tmp_path / "run_two" / "eval")
    table = json.loads((tmp_path / "run_one" / "eval" / "eval.json").read_text())
    assert table["ce_recon"] is None and 0 < table["alive_pct"] <= 100


def test_many_saes_ddp_equal_one_process(tmp_path) -> None:
    """Three SAEs on two hooks (one with a k sweep) from one backbone pass: each equals its 1-process run, and the
    evaluation table has one row per SAE with the same values."""
    load_hooked_model("test/vit-tiny", pretrained=False).save_pretrained(tmp_path / "backbone")
    data = {
        "class_path": "prisma_lightning.datamodules.DSpritesDataModule",
        "init_args": {"cache": False, "subset_size": 160, "image_size": 16, "channels": 3, "batch_size": 8},
    }
    template = {k: v for k, v in SAE.items() if k != "hook_name"}
    model = {"class_path": "prisma_lightning.modules.SAEModule",
             "init_args": {"sae": template, "hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                           "sweep": {"k": [2, 4]}, "backbone": str(tmp_path / "backbone"), "buffer_tokens": 0,
                           "batch_tokens": 8 * 17, "init_tokens": 8 * 17, "lr": 1e-3}}  # fmt: skip
    evaluator = {"class_path": "prisma_lightning.callbacks.SAEEvaluator",
                 "init_args": {"n_batches": None, "ce_source": "head", "print_table": False}}  # fmt: skip
    trainer = {**TRAINER, "max_steps": 4, "val_check_interval": 4, "num_sanity_val_steps": 0,
               "callbacks": [evaluator]}  # fmt: skip
    config = {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}
    run_cli(tmp_path, config, "one", "--model.init_args.export_dir", str(tmp_path / "one"))
    run_cli(tmp_path, config, "two", "--model.init_args.export_dir", str(tmp_path / "two"), "--trainer.strategy",
            "ddp", "--trainer.devices", "2", "--data.init_args.batch_size", "4", "--model.init_args.batch_tokens",
            str(4 * 17))  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if (p / "cfg.json").is_file())
    assert len(names) == 4, names  # 2 hooks x 2 values of k
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir() if (p / "cfg.json").is_file())
    for name in names:
        assert_same_sae(tmp_path / "one" / name, tmp_path / "two" / name)
        assert_same_eval(tmp_path / "one" / name, tmp_path / "two" / name)
