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
    run_cli(tmp_path, config, "two", "--model.init_args.export_dir", str(tmp_path / "two"),
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.batch_size", "4",
            "--model.init_args.batch_tokens", str(4 * 17), "--model.init_args.init_tokens", str(4 * 17))  # fmt: skip
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
    sae = SparseAutoencoder(SAEConfig(**{**SAE, "architecture": "relu", "k": None}))
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
    run_cli(tmp_path, config, "one", subcommand="validate")
    run_cli(tmp_path, config, "two", "--model.init_args.sae", str(tmp_path / "two"), "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--data.init_args.batch_size", "128", subcommand="validate")  # fmt: skip
    assert_same_eval(tmp_path / "one", tmp_path / "two")
    table = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert table["ce_recon"] is None and 0 < table["alive_pct"] <= 100


def test_vit_classifier_ddp_equals_one_process(tmp_path) -> None:
    """`configs/vit/dsprites_2l.yaml` on 2 processes: same weights, same synced metrics, one set of files."""
    import csv

    config = Path(__file__).resolve().parents[1] / "configs" / "vit" / "dsprites_2l.yaml"
    common = ["--trainer.accelerator", "cpu", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "CSVLogger",
              "--data.init_args.subset_size", "256", "--data.init_args.val_fraction", "0.125",
              "--data.init_args.test_fraction", "0", "--model.init_args.warmup_steps", "2"]  # fmt: skip

    def fit(name: str, *extra: str) -> Path:
        root = tmp_path / name
        cmd = [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(config), *common,
               "--trainer.logger.save_dir", str(root), "--model.init_args.export_dir", str(root / "model"),
               *extra]  # fmt: skip
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return root

    one = fit("one", "--data.init_args.batch_size", "16")
    two = fit("two", "--data.init_args.batch_size", "8", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    model_one, model_two = (load_hooked_model(str(root / "model"), pretrained=True) for root in (one, two))
    a, b = model_one.state_dict(), model_two.state_dict()
    d = model_one.cfg.d_model
    for key in a:
        if key.endswith("attn.qkv.bias"):
            # The key bias adds a per-query constant to the scores, which softmax removes: its true gradient is 0,
            # and Adam scales the float noise of that 0 (summation order differs across ranks) up to ~lr. Compare
            # the query and value biases, and the key bias through its (null) effect on the outputs below.
            a[key], b[key] = torch.cat([a[key][:d], a[key][2 * d :]]), torch.cat([b[key][:d], b[key][2 * d :]])
        assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    images = torch.rand(8, 1, 64, 64)
    with torch.no_grad():
        assert_close(model_one(images), model_two(images), atol=1e-5, rtol=0)

    def val_rows(root: Path) -> list[dict[str, str]]:
        with open(root / "lightning_logs" / "version_0" / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r.get("val/acc")]

    rows_one, rows_two = val_rows(one), val_rows(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] and len(rows_one) == 2
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in ("val/acc", "val/loss", "val/acc_top5"):
            if r1.get(key):
                assert abs(float(r1[key]) - float(r2[key])) <= 1e-5, (key, r1[key], r2[key])
    # Checkpoints written once (rank 0): the same file names as the 1-process run, in one folder.
    ckpts = [
        sorted(p.name for p in (root / "lightning_logs" / "version_0" / "checkpoints").iterdir()) for root in (one, two)
    ]
    assert ckpts[0] == ckpts[1] and "last.ckpt" in ckpts[0]
    assert not (two / "lightning_logs" / "version_1").exists()
