"""The README's main job: `prisma fit --config configs/quickstart.yaml` (shortened to 20 steps)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prisma_lightning.cli import PrismaCLI
from prisma_lightning.sae import SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_an_sae_and_prints_the_table(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)  # the config names the shipped checkpoint relative to the repository root
    args = ["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "20",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    cli = PrismaCLI(args=args)
    assert cli.trainer.global_step == 20
    version = Path(cli.trainer.log_dir)
    folder = version / "sae"
    sae = SparseAutoencoder.load(folder)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.d_sae == 1024
    results = json.loads((folder / "eval.json").read_text())
    assert results["global_step"] == 20 and results["l0"] == 16.0
    assert results["ce_recovered_pct"] is not None  # the dSprites ViT has a classifier head
    out = capsys.readouterr().out
    assert "% CE recovered" in out
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(version))  # TensorBoard by default
