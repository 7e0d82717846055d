"""The atlas the way a user runs it: `prisma predict --config configs/atlas/quickstart.yaml`, the example script,
2 DDP processes (gloo) against 1, and a run killed with SIGKILL then started again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from prisma_lightning.atlas import validate_feature
from prisma_lightning.sae import SAEConfig, SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "atlas" / "quickstart.yaml"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    """A random TopK SAE on the shipped dSprites ViT's block-1 residual stream (as the quickstart trains)."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=64, d_sae=96, architecture="topk", k=8, hook_name="blocks.1.hook_resid_post", tokens="all",
                    model_name="dsprites-vit-2l")  # fmt: skip
    folder = tmp_path_factory.mktemp("sae") / "sae"
    SparseAutoencoder(cfg).save(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def predict(out: Path, sae: Path, *extra: str, images: int = 128, batch: int = 32) -> list[str]:
    cmd = [sys.executable, "-m", "prisma_lightning", "predict", "--config", str(CONFIG),
           "--model.init_args.sae", str(sae), "--trainer.callbacks.init_args.output_dir", str(out),
           "--trainer.default_root_dir", str(out),
           "--trainer.enable_progress_bar", "false", "--data.init_args.subset_size", str(2 * images),
           "--data.init_args.batch_size", str(batch), *extra]  # fmt: skip
    return cmd


def run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "features.jsonl").read_text().splitlines()]


def test_quickstart_config_parses() -> None:
    import contextlib
    import io

    import yaml

    from prisma_lightning.cli import PrismaCLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        PrismaCLI(args=["predict", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(out.getvalue())
    assert cfg["model"]["class_path"].endswith("AtlasModule")
    assert cfg["model"]["init_args"]["sae"] == "runs/quickstart/lightning_logs/version_0/sae"
    writer = cfg["trainer"]["callbacks"][0]
    assert writer["class_path"].endswith("AtlasWriter") and writer["init_args"]["top_k"] == 16


@pytest.mark.slow
def test_quickstart_config_through_prisma_predict(tmp_path, sae_dir) -> None:
    before = snapshot(sae_dir)
    out = tmp_path / "atlas"
    run(predict(out, sae_dir), cwd=ROOT)
    assert snapshot(sae_dir) == before  # the SAE folder is an input: untouched
    rows = records(out)
    assert len(rows) == 96 and [r["index"] for r in rows] == list(range(96))
    assert all(validate_feature(r) == [] for r in rows)
    assert rows[0]["modelId"] == "dsprites-vit-2l" and rows[0]["layer"] == "blocks.1.hook_resid_post"
    assert rows[0]["patch_grid"] == [1, 4, 4]
    fired = [r for r in rows if r["activations"]]
    assert fired and all(len(r["activations"]) <= 16 for r in fired)
    for r in fired:
        names = {a["labelName"] for a in r["activations"]}
        assert names <= {"square", "ellipse", "heart"}
        assert all(len(a["values"]) == 16 and (out / a["image"]).is_file() for a in r["activations"])
        scores = [a["maxValue"] for a in r["activations"]]
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(r["maxActApprox"], rel=1e-5)
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["n_images"] == 128 and meta["n_tokens"] == 128 * 17 and meta["d_sae"] == 96
    report = json.loads((out / "ground_truth.json").read_text())
    assert set(report["factors"]) == {"shape", "scale", "orientation", "posX", "posY"}
    assert report["n_images"] == 128 and len(report["factors"]["orientation"]["values"]) == 40
    for name in ("index.html", "feature.html", "ground_truth.html", "assets/atlas.js", "data/index.js"):
        assert (out / name).is_file(), name
    assert not (out / ".atlas_state").exists() and not list(out.rglob("*.tmp"))


def test_output_inside_the_sae_folder_is_refused(sae_dir) -> None:
    import lightning.pytorch as pl

    from prisma_lightning.callbacks.atlas_writer import AtlasWriter
    from prisma_lightning.datamodules import DSpritesDataModule
    from prisma_lightning.modules.atlas_module import AtlasModule

    module = AtlasModule(str(sae_dir), backbone=str(ROOT / "examples" / "checkpoints" / "dsprites-vit-2l"))
    data = DSpritesDataModule(cache=False, subset_size=64, val_fraction=0.5, test_fraction=0.0, batch_size=32)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AtlasWriter(str(sae_dir / "atlas"))])  # fmt: skip
    with pytest.raises(ValueError, match="inside the SAE folder"):
        trainer.predict(module, datamodule=data)
    assert not (sae_dir / "atlas").exists()


@pytest.mark.slow
def test_feature_atlas_example(tmp_path) -> None:
    """The example trains a short quickstart SAE and builds its atlas (fast settings)."""
    cmd = [sys.executable, str(ROOT / "examples" / "feature_atlas.py"), "--steps", "4", "--images", "64",
           "--batch-size", "32", "--out", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    index = tmp_path / "run" / "atlas" / "index.html"
    assert f"Open {index}" in result.stdout and index.is_file()
    rows = records(index.parent)
    assert len(rows) == 1024 and all(validate_feature(r) == [] for r in rows[:50])
    assert json.loads((index.parent / "atlas.json").read_text())["n_images"] == 64


def assert_same_atlas(a: Path, b: Path) -> None:
    ra, rb = records(a), records(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for key in ("frac_nonzero", "frac_images", "maxActApprox", "mean_act"):
            assert_close(torch.tensor(x[key]), torch.tensor(y[key]), rtol=1e-5, atol=1e-9)
        assert x["freq_hist_data_bar_heights"] == y["freq_hist_data_bar_heights"]
        assert [t["imageIndex"] for t in x["activations"]] == [t["imageIndex"] for t in y["activations"]]
        for s, t in zip(x["activations"], y["activations"], strict=True):
            assert s["values"] == t["values"] and s["maxValue"] == t["maxValue"] and s["factors"] == t["factors"]
        assert x["label_distribution"] == y["label_distribution"]
    ga, gb = (json.loads((f / "ground_truth.json").read_text()) for f in (a, b))
    for name, fa in ga["factors"].items():
        fb = gb["factors"][name]
        assert [v["best_feature"] for v in fa["values"]] == [v["best_feature"] for v in fb["values"]]
        auc = [[v["auroc"] for v in f["values"]] for f in (fa, fb)]
        assert_close(torch.tensor(auc[0], dtype=torch.float64), torch.tensor(auc[1], dtype=torch.float64))
        assert fa["mean_probe"] == pytest.approx(fb["mean_probe"]) and fa["dominance"] == fb["dominance"]
    assert snapshot(a / "images") == snapshot(b / "images")


@pytest.mark.slow
def test_atlas_ddp_equals_one_process(tmp_path, sae_dir) -> None:
    """2 gloo processes with 16 images each per step = 1 process with batches of 16 (the same batches)."""
    run(predict(tmp_path / "one", sae_dir, images=192, batch=16), cwd=ROOT)
    run(predict(tmp_path / "two", sae_dir, "--trainer.strategy", "ddp", "--trainer.devices", "2", images=192,
                batch=16), cwd=ROOT)  # fmt: skip
    assert_same_atlas(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "atlas.json").read_text())["n_images"] == 192
    assert not (tmp_path / "two" / ".atlas_state").exists()


@pytest.mark.slow
def test_atlas_resumes_after_sigkill(tmp_path, sae_dir) -> None:
    """A run killed with SIGKILL mid-pass, started again, writes the atlas of an uninterrupted run."""
    extra = ("--trainer.callbacks.init_args.save_every_n_batches", "1")
    run(predict(tmp_path / "ref", sae_dir, *extra, images=640, batch=8), cwd=ROOT)
    out = tmp_path / "crash"
    cmd = predict(out, sae_dir, *extra, images=640, batch=8)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / ".atlas_state" / "rank0-of-1.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.005)
    time.sleep(0.5)  # a few more batches
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "features.jsonl").exists() and state.exists()
    saved = torch.load(state, weights_only=True)["batches_done"]
    assert 1 <= saved < 80
    run(cmd, cwd=ROOT)
    assert (out / "features.jsonl").read_bytes() == (tmp_path / "ref" / "features.jsonl").read_bytes()
    assert (out / "ground_truth.json").read_bytes() == (tmp_path / "ref" / "ground_truth.json").read_bytes()
    assert snapshot(out / "images") == snapshot(tmp_path / "ref" / "images")
    assert not (out / ".atlas_state").exists()
