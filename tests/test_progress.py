"""StepProgressBar: optimizer steps out of max_steps, tokens/s for SAE runs, flushed lines when not a terminal."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from prisma_lightning.modules import SAEModule
from prisma_lightning.progress import StepProgressBar
from prisma_lightning.sae import SAEConfig


def online_module() -> SAEModule:
    cfg = SAEConfig(d_in=32, expansion_factor=2, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post",
                    b_dec_init="mean")  # fmt: skip
    return SAEModule(cfg, backbone="test/vit-tiny", pretrained_backbone=False, buffer_tokens=0, batch_tokens=8 * 17,
                     init_tokens=8 * 17)  # fmt: skip


def test_line_mode_prints_steps_of_max_steps_with_tokens_per_second(tmp_path, capsys) -> None:
    bar = StepProgressBar(print_every=4, min_seconds=0)
    assert bar.line_mode  # pytest's captured stdout is not a terminal
    images = torch.randn(96, 3, 16, 16)
    trainer = pl.Trainer(max_steps=8, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar])  # fmt: skip
    trainer.fit(online_module(), DataLoader(TensorDataset(images, torch.zeros(96)), batch_size=8))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["step 4/8", "step 8/8"]  # steps, not Lightning batches
    assert all(re.search(r"\| [\d,]+ tokens/s \|", ln) for ln in lines), lines
    assert "eta 0s" in lines[-1]
