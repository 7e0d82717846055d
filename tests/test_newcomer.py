"""The README's newcomer path, walked the way a newcomer walks it: `prisma` commands from the root of a fresh copy
of the repository, default paths and the default logger, a run killed and resumed with `--ckpt_path last`, a
WandbLogger run (offline), caching, a cached SAE, validation, a subclass -- and afterwards no file exists outside the
run folder (`runs/`) and no input file changed.

The step counts are shortened with command-line overrides; everything else is the README's commands as written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
COPIED = ["README.md", "configs", "callbacks", "datamodules", "examples"]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def prisma(repo: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "prisma_lightning", *args], cwd=repo, env=full_env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if check:
        assert result.returncode == 0, f"prisma {' '.join(args)}:\n{result.stderr[-3000:]}"
    return result


def test_the_newcomer_path(tmp_path) -> None:
    repo = tmp_path / "prisma-lightning"
    repo.mkdir()
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, repo / name)
    inputs = snapshot(repo)
    # a checkpoint every 10 steps (the quickstart's own is every 200) so the kill below has one to resume from
    overlay = tmp_path / "every10.yaml"
    quick = yaml.safe_load((repo / "configs" / "quickstart.yaml").read_text())
    callbacks = quick["trainer"]["callbacks"]
    callbacks[0]["init_args"]["every_n_train_steps"] = 10
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    qs = ["--config", "configs/quickstart.yaml", "--config", str(overlay)]

    # 1. the quickstart, killed after its first checkpoints ...
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prisma_lightning", "fit", *qs, "--trainer.max_steps", "60"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(repo.glob("runs/quickstart/**/last.ckpt")):
        time.sleep(0.1)
    assert proc.poll() is None, "the quickstart ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # ... and resumed: the same run folder continues, and the console says from where
    resumed = prisma(repo, "fit", *qs, "--trainer.max_steps", "60", "--ckpt_path", "last")
    assert "Resuming from runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt" in resumed.stderr
    assert "% CE recovered" in resumed.stdout
    sae_dir = repo / "runs" / "quickstart" / "lightning_logs" / "version_0" / "sae"
    assert (sae_dir / "cfg.json").is_file() and not (
        repo / "runs" / "quickstart" / "lightning_logs" / "version_1"
    ).exists()

    # 2. cache activations, 3. train an SAE on them, 4. a subclass of SAEModule on the same shards
    prisma(repo, "predict", "--config", "configs/cache/dsprites_vit.yaml", "--data.init_args.subset_size", "700")
    assert (repo / "runs" / "activations" / "dsprites-vit-2l" / "blocks.1.hook_resid_post" / "index.json").is_file()
    prisma(repo, "fit", "--config", "configs/sae/cached_shards.yaml", "--trainer.max_steps", "20")
    subclass = ["--model", "custom_sae_loss.DecorrelatedSAEModule", "--model.init_args.overlap_coefficient", "0.1"]
    prisma(repo, "fit", "--config", "configs/sae/cached_shards.yaml", *subclass, "--trainer.max_steps", "5",
           env={"PYTHONPATH": str(repo / "examples")})  # fmt: skip

    # 5. validate the trained SAE: its folder is an input and stays as it is
    before = snapshot(sae_dir)
    validated = prisma(repo, "validate", "--config", "configs/quickstart.yaml", "--model.init_args.sae",
                       "runs/quickstart/lightning_logs/version_0/sae")  # fmt: skip
    assert "% CE recovered" in validated.stdout and snapshot(sae_dir) == before
    assert list((repo / "runs" / "quickstart" / "validate").rglob("eval.json"))

    # 6. Weights & Biases, offline
    prisma(repo, "fit", "--config", "configs/quickstart.yaml", "--trainer.logger", "WandbLogger",
           "--trainer.max_steps", "10", env={"WANDB_MODE": "offline"})  # fmt: skip
    wandb_saes = [p for p in (repo / "runs" / "quickstart").rglob("sae/cfg.json") if "checkpoints" not in p.parts]
    assert len(wandb_saes) == 2  # the TensorBoard run's and the wandb run's, each in its own run folder

    after = snapshot(repo)
    changed = sorted(p for p in inputs if after.get(p) != inputs[p])
    assert not changed, f"input files changed: {changed}"
    outside = sorted(p for p in after if p not in inputs and not p.startswith("runs/"))
    assert not outside, f"files written outside runs/: {outside}"
