"""Build the feature atlas of the quickstart SAE and print where its ``index.html`` is (offline, CPU).

    python examples/feature_atlas.py                       # trains a short quickstart SAE first (200 steps)
    python examples/feature_atlas.py --sae runs/quickstart/lightning_logs/version_0/sae

Without ``--sae`` a TopK SAE is trained for ``--steps`` steps with ``configs/quickstart.yaml`` (its run folder is
``<out>/sae_run``). The atlas is one ``Trainer.predict`` pass of :class:`AtlasModule` with the
:class:`AtlasWriter` callback over ``--images`` held-out dSprites images: what ``prisma predict --config
configs/atlas/quickstart.yaml`` does. Open the printed ``index.html`` in a browser; it needs no network.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

from prisma_lightning.callbacks.atlas_writer import AtlasWriter
from prisma_lightning.datamodules import DSpritesDataModule
from prisma_lightning.modules.atlas_module import AtlasModule

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ROOT / "examples" / "checkpoints" / "dsprites-vit-2l"


def train_sae(run_dir: Path, steps: int) -> Path:
    """Train the quickstart SAE for ``steps`` steps with ``prisma fit`` and return its exported folder."""
    cmd = [
        sys.executable, "-m", "prisma_lightning", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false", "--model.init_args.backbone", str(BACKBONE),
        "--model.init_args.export_dir", str(run_dir / "sae"),
    ]  # fmt: skip
    print(f"Training a {steps}-step quickstart SAE in {run_dir} ...")
    subprocess.run(cmd, check=True, cwd=ROOT)
    if (run_dir / "sae" / "cfg.json").is_file():
        return run_dir / "sae"
    exports = sorted(run_dir.glob("lightning_logs/version_*/sae"), key=lambda p: p.stat().st_mtime)
    if not exports:
        raise FileNotFoundError(f"Training finished but no SAE folder was exported under {run_dir}.")
    return exports[-1]


def build_atlas(sae: str | Path, out: Path, images: int, batch_size: int, top_k: int) -> Path:
    """Run the atlas pass over ``images`` held-out dSprites images; returns the path of ``index.html``."""
    module = AtlasModule(str(sae), backbone=str(BACKBONE))
    data = DSpritesDataModule(
        target="shape", cache=False, subset_size=2 * images, val_fraction=0.5, test_fraction=0.0,
        batch_size=batch_size, seed=1,
    )  # fmt: skip
    writer = AtlasWriter(str(out), top_k=top_k, title="Quickstart SAE feature atlas")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_model_summary=False, callbacks=[writer],
        enable_progress_bar=False,
    )  # fmt: skip
    trainer.predict(module, datamodule=data)
    return out / "index.html"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", default=None, help="SAE folder (default: train a short quickstart SAE)")
    parser.add_argument("--out", default="runs/feature_atlas", help="output folder of the atlas")
    parser.add_argument("--steps", type=int, default=200, help="training steps when --sae is not given")
    parser.add_argument("--images", type=int, default=4000, help="held-out dSprites images in the atlas")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--top-k", type=int, default=16, help="top images per feature")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    sae = args.sae or train_sae(out / "sae_run", args.steps)
    index = build_atlas(sae, out / "atlas", args.images, args.batch_size, args.top_k)
    print(f"Open {index} in a browser (offline). features.jsonl and ground_truth.json are beside it.")


if __name__ == "__main__":
    main()
