"""Crash safety: `prisma fit` killed with SIGKILL (also mid-checkpoint-write) resumes to the same SAE."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from prisma_lightning.activations import ShardWriter
from prisma_lightning.checkpoint_io import AtomicCheckpointIO
from prisma_lightning.cli import check_checkpoint
from prisma_lightning.sae import SparseAutoencoder

STEPS = 16


def config(tmp_path: Path, name: str) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": STEPS, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / name),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / name / "ckpt"), "save_last": True,
                                         "every_n_train_steps": 1, "save_top_k": 0}}],
        },
        "model": {"class_path": "prisma_lightning.modules.SAEModule",
                  "init_args": {"sae": {"d_in": 64, "d_sae": 16384, "architecture": "topk", "k": 8,
                                        "hook_name": "blocks.0.hook_resid_post", "b_dec_init": "mean"},
                                "init_tokens": 512, "lr": 1e-3, "export_dir": str(tmp_path / name / "sae")}},
        "data": {"class_path": "prisma_lightning.datamodules.ActivationDataModule",
                 "init_args": {"path": str(tmp_path / "acts"), "batch_size": 512, "seed": 1}},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(cfg), *extra]


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_checkpoint_resumes_to_the_same_weights(tmp_path) -> None:
    torch.manual_seed(0)
    writer = ShardWriter(tmp_path / "acts", d=64, tokens_per_image=32, images_per_shard=64)
    writer.add(torch.randn(128 * 32, 64), 128)
    writer.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = subprocess.run(command(config(tmp_path, "ref")), env=env, capture_output=True, text=True, timeout=400)
    assert reference.returncode == 0, reference.stderr[-2000:]

    cfg = config(tmp_path, "crash")
    ckpt_dir = tmp_path / "crash" / "ckpt"

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(command(cfg, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(proc: subprocess.Popen, condition) -> None:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None and not condition():
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be interrupted"

    # 1. Kill during a checkpoint write: its temporary file exists beside an older complete last.ckpt.
    proc = start()
    wait_for(proc, lambda: (ckpt_dir / "last.ckpt").exists() and bool(list(ckpt_dir.glob(".*.tmp"))))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpt_dir.glob(".*.tmp")), "the kill did not land during a checkpoint write"
    check_checkpoint(str(ckpt_dir / "last.ckpt"), None)  # the visible checkpoint is complete

    # 2. Resume, then kill between writes, a few steps later.
    first_mtime = (ckpt_dir / "last.ckpt").stat().st_mtime_ns
    proc = start("--ckpt_path", "last")
    wait_for(proc, lambda: (ckpt_dir / "last.ckpt").stat().st_mtime_ns != first_mtime)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    check_checkpoint(str(ckpt_dir / "last.ckpt"), None)

    # 3. Resume to the end.
    final = subprocess.run(command(cfg, "--ckpt_path", "last"), env=env, capture_output=True, text=True, timeout=400)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(ckpt_dir.glob(".*.tmp")), "the temporary file of the killed write was left behind"
    ref = SparseAutoencoder.load(tmp_path / "ref" / "sae")
    resumed = SparseAutoencoder.load(tmp_path / "crash" / "sae")
    for (name, p), (_, q) in zip(ref.named_parameters(), resumed.named_parameters(), strict=True):
        assert_close(q, p, atol=1e-6, rtol=0, msg=f"{name} differs after resuming")


def test_truncated_checkpoint_is_reported_clearly(tmp_path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, path)
    check_checkpoint(str(path), None)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="last.ckpt is truncated or corrupt"):
        check_checkpoint(str(path), None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint(str(tmp_path / "missing.ckpt"), None)


def test_a_later_write_removes_temporaries_of_crashed_writes(tmp_path) -> None:
    import os

    from prisma_lightning.utils import atomic_path

    dead = tmp_path / ".last.ckpt.999999999.a1b2.tmp"  # a process id that is not running: a crashed save
    legacy = tmp_path / ".last.ckpt.x7y8.tmp"  # the naming of earlier versions (no process id)
    running = tmp_path / f".last.ckpt.{os.getppid()}.c3d4.tmp"  # a live process writing right now
    other = tmp_path / ".other.ckpt.999999999.e5f6.tmp"  # another file's temporary: not ours to touch
    for path in (dead, legacy, running, other):
        path.write_bytes(b"partial")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "last.ckpt")
    assert not dead.exists() and not legacy.exists() and running.exists() and other.exists()
    with atomic_path(tmp_path / "last.ckpt") as tmp:
        assert str(os.getpid()) in tmp.name
        tmp.write_bytes(b"x")
