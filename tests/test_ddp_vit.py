"""DDP end to end for ViT mice: `prisma fit` of a ViT config on 2 CPU processes (gloo), with the default paths a user
gets (no export_dir, the default TensorBoard logger), equals a 1-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.backbones import load_hooked_model

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vit" / "dsprites_2l.yaml"
COMMON = ["--trainer.accelerator", "cpu", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          "--trainer.enable_progress_bar", "false", "--data.init_args.subset_size", "256",
          "--data.init_args.val_fraction", "0.125", "--data.init_args.test_fraction", "0",
          "--model.init_args.warmup_steps", "2"]  # fmt: skip


def fit(root: Path, *extra: str) -> Path:
    """Run `prisma fit` in ``root`` (its working folder, so the default log folder is ``root/runs/lightning_logs``)."""
    root.mkdir()
    cmd = [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(CONFIG), *COMMON, *extra]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def val_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every logged ``val/*`` scalar in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("val/")]
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags}


DDP = ["--data.init_args.batch_size", "8", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
LOGS = Path("runs") / "lightning_logs"  # prisma's default default_root_dir is runs/ under the working folder
LOG_DIR = LOGS / "version_0"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The working folders of a 1-process run (batch 16) and a 2-process run (batch 8 each)."""
    base = tmp_path_factory.mktemp("ddp_vit")
    return fit(base / "one", "--data.init_args.batch_size", "16"), fit(base / "two", *DDP)


def test_vit_classifier_ddp_equals_one_process(runs) -> None:
    """`configs/vit/dsprites_2l.yaml` on 2 processes: same weights, same synced metrics, one set of files."""
    one, two = runs
    for root in (one, two):
        # One run folder, one export: the model under the run's log folder, written once (by rank 0).
        assert sorted(p.relative_to(root) for p in root.rglob("model.safetensors")) == [
            LOG_DIR / "model" / "model.safetensors"
        ]
        assert sorted(p.name for p in (root / LOGS).iterdir()) == ["version_0"]
        assert sorted(p.name for p in (root / LOG_DIR / "model").iterdir()) == ["config.json", "model.safetensors"]

    model_one, model_two = (load_hooked_model(str(root / LOG_DIR / "model"), pretrained=True) for root in (one, two))
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

    scalars_one, scalars_two = val_scalars(one / LOG_DIR), val_scalars(two / LOG_DIR)
    assert scalars_one.keys() == scalars_two.keys() and {"val/acc", "val/loss", "val/acc_top5"} & scalars_one.keys()
    for tag, values in scalars_one.items():
        assert [s for s, _ in values] == [s for s, _ in scalars_two[tag]] and len(values) == 2, tag
        assert_close(torch.tensor([v for _, v in values]), torch.tensor([v for _, v in scalars_two[tag]]),
                     atol=1e-5, rtol=0, msg=tag)  # fmt: skip
    # Checkpoints written once (rank 0): the same file names as the 1-process run, in one folder.
    ckpts = [sorted(p.name for p in (root / LOG_DIR / "checkpoints").iterdir()) for root in (one, two)]
    assert ckpts[0] == ckpts[1] and "last.ckpt" in ckpts[0]


def test_vit_classifier_ddp_resumes_mid_epoch_bitwise(runs, tmp_path) -> None:
    """2 processes stopped after 4 steps (last.ckpt at step 3, mid-epoch) and resumed: the straight run's weights."""
    _, two = runs
    root = fit(tmp_path / "resumed", *DDP, "--trainer.max_steps", "4", "--model.init_args.max_steps", "6")
    last = root / LOG_DIR / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == 3 * 16  # global samples
    cmd = [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(CONFIG), *COMMON, *DDP,
           "--model.init_args.max_steps", "6", "--ckpt_path", str(last)]  # fmt: skip
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    straight = load_hooked_model(str(two / LOG_DIR / "model"), pretrained=True).state_dict()
    resumed = load_hooked_model(str(root / LOGS / "version_1" / "model"), pretrained=True).state_dict()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), f"{key} differs after resuming"
