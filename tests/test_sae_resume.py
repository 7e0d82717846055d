"""Online SAE training resumes exactly: `prisma fit` stopped (or killed with SIGKILL) and resumed with
`--ckpt_path` ends with the same weights, bitwise, as an uninterrupted run; checkpoints land at the configured steps.

The runs go through `python -m prisma_lightning fit` on the shipped dSprites ViT with a mixing buffer, the way a
user runs them. Resuming needs the image loader's position (the data modules' resumable train loaders), the mixing
buffer with its random state, and the rows of the last image batch not yet in the buffer -- all checkpointed.
"""

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

from prisma_lightning.sae import SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def config(tmp_path: Path, every: int = 1) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 0, "log_every_n_steps": 1,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True, "every_n_train_steps": every, "save_top_k": -1}}],
        },
        "model": {"class_path": "SAEModule", "init_args": {
            "backbone": str(ROOT / "examples/checkpoints/dsprites-vit-2l"),
            "sae": {"d_in": 64, "expansion_factor": 4, "architecture": "topk", "k": 8,
                    "normalize_activations": "expected_norm", "hook_name": "blocks.1.hook_resid_post"},
            "lr": 3e-3, "batch_tokens": 128, "buffer_tokens": 1024, "init_tokens": 512,
        }},
        "data": {"class_path": "DSpritesDataModule", "init_args": {
            "cache": False, "subset_size": 2000, "val_fraction": 0.05, "test_fraction": 0.0, "batch_size": 12}},
    }  # fmt: skip
    path = tmp_path / f"sae_every{every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prisma(cfg: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prisma_lightning", "fit", "--config", str(cfg),
            "--trainer.default_root_dir", str(root), *extra]  # fmt: skip


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]


def final_sae(root: Path) -> SparseAutoencoder:
    (folder,) = root.rglob("version_0/sae")
    return SparseAutoencoder.load(folder)


def assert_bitwise(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"


def test_stop_and_resume_equals_an_uninterrupted_run_bitwise(tmp_path) -> None:
    cfg = config(tmp_path)
    run(prisma(cfg, tmp_path / "straight", "--trainer.max_steps", "30"))
    run(prisma(cfg, tmp_path / "resumed", "--trainer.max_steps", "8"))  # stops mid-drain of a full buffer
    run(prisma(cfg, tmp_path / "resumed", "--trainer.max_steps", "30", "--ckpt_path", "last"))
    straight, resumed = final_sae(tmp_path / "straight"), final_sae(tmp_path / "resumed")
    assert_bitwise(straight, resumed)
    # `--ckpt_path last` continued the same run folder: no second version, one set of outputs
    assert not list((tmp_path / "resumed").rglob("version_1"))
    assert not torch.equal(straight.W_dec, SparseAutoencoder(straight.cfg).W_dec)  # it trained


def test_sigkill_mid_run_resumes_bitwise(tmp_path) -> None:
    cfg = config(tmp_path)
    run(prisma(cfg, tmp_path / "straight", "--trainer.max_steps", "24"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(prisma(cfg, tmp_path / "killed", "--trainer.max_steps", "24"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 300
    target = None
    while time.time() < deadline and proc.poll() is None:
        done = list((tmp_path / "killed").rglob("*-step=9.ckpt"))
        if done:
            target = done[0]
            break
        time.sleep(0.05)
    assert proc.poll() is None and target is not None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run(prisma(cfg, tmp_path / "killed", "--trainer.max_steps", "24", "--ckpt_path", "last"))
    assert_bitwise(final_sae(tmp_path / "straight"), final_sae(tmp_path / "killed"))


def test_checkpoints_land_at_the_configured_steps(tmp_path) -> None:
    """Online, one Lightning batch is one SAE step, so every_n_train_steps=3 means steps 3, 6, 9, ..."""
    cfg = config(tmp_path, every=3)
    run(prisma(cfg, tmp_path / "run", "--trainer.max_steps", "14"))
    steps = sorted(int(p.stem.split("step=")[1]) for p in (tmp_path / "run").rglob("epoch=*-step=*.ckpt"))
    assert steps == [3, 6, 9, 12]
    last = torch.load(next((tmp_path / "run").rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert last["global_step"] == 12  # updated with every checkpoint


def test_an_explicit_checkpoint_cannot_redirect_outputs_and_says_what_it_set(tmp_path) -> None:
    """`--ckpt_path <file>` of another run: its hyperparameters are applied (and listed on the console), but its
    output folder is not -- the resumed run exports where this command line says, and the first run's SAE stays."""
    cfg = config(tmp_path, every=5)
    first = tmp_path / "first_export"
    run(prisma(cfg, tmp_path / "a", "--trainer.max_steps", "5", "--model.init_args.export_dir", str(first)))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    (ckpt,) = (tmp_path / "a").rglob("last.ckpt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = prisma(cfg, tmp_path / "b", "--trainer.max_steps", "8", "--ckpt_path", str(ckpt), "--model.init_args.lr",
                 "0.001", "--model.init_args.export_dir", str(tmp_path / "second_export"))  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "From the checkpoint's hyperparameters" in result.stderr
    assert "model.lr: 0.001 -> 0.003" in result.stderr  # the checkpoint's learning rate, said out loud
    listed = result.stderr.split("From the checkpoint's hyperparameters")[1].split("Seed set")[0]
    assert "model.sae." not in listed  # derived values the checkpoint stores resolved are not reported as overrides
    assert "export_dir" not in result.stderr.split("From the checkpoint's hyperparameters")[1]
    assert (tmp_path / "second_export" / "cfg.json").is_file()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the other run's SAE is untouched
