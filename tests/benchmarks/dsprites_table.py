"""Reproduce ViT-Prisma's dSprites shape-classification table (1-4 layers, attention+MLP and attention-only) on CPU.

Each row trains the model of ``configs/vit/dsprites_{n}l[_attn_only].yaml`` through ``PrismaCLI`` (the same
command a user runs) with a smaller budget (``--steps``, ``--batch-size``, ``--subset-size``; the configs' own
budget is 8,000 steps), then measures shape accuracy on held-out images and prints a markdown table with
ViT-Prisma's published accuracy beside ours.

Read the numbers as a budget-limited reproduction: every model first sits on a plateau near 0.45-0.5 for about
1,000 steps of batch 128 before shape features emerge. At the default budget (5,000 steps per model) the eight
models take about 45 minutes with one thread, or 23 minutes as two processes on a 2-core CPU
(``--layers 1 4`` and ``--layers 2 3``); one seed each. The full 2-layer config (8,000 steps) reaches about 0.97.

Run: ``python tests/benchmarks/dsprites_table.py`` (``--help`` for the budget; ``--json`` writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIZES = {1: "tiny", 2: "base", 3: "small", 4: "medium"}
VIT_PRISMA = {  # accuracy from ViT-Prisma's README (docs/experiments/dSprites_results.md)
    1: {"mlp": 0.535, "attn_only": 0.459},
    2: {"mlp": 0.996, "attn_only": 0.685},
    3: {"mlp": 1.000, "attn_only": 0.774},
    4: {"mlp": 1.000, "attn_only": 0.991},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset-size", type=int, default=200_000, help="dSprites images drawn (train+val+test)")
    parser.add_argument("--test-images", type=int, default=2000, help="held-out images scored per model")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    return parser.parse_args()


def config_path(n_layers: int, variant: str) -> Path:
    suffix = "_attn_only" if variant == "attn_only" else ""
    return ROOT / "configs" / "vit" / f"dsprites_{n_layers}l{suffix}.yaml"


def train_and_score(path: Path, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Fit the config's model at the benchmark budget; return held-out accuracy and wall-clock seconds."""
    import torch

    from prisma_lightning.cli import PrismaCLI

    fraction = args.test_images / args.subset_size
    overrides = [
        "--trainer.max_steps", str(args.steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(workdir),
        "--trainer.callbacks", "[]",
        "--trainer.enable_checkpointing", "false",
        "--model.init_args.warmup_steps", str(max(1, args.steps // 20)),
        "--model.init_args.export_dir", str(workdir / "model"),
        "--data.init_args.subset_size", str(args.subset_size),
        "--data.init_args.val_fraction", str(fraction),
        "--data.init_args.test_fraction", str(fraction),
        "--data.init_args.batch_size", str(args.batch_size),
    ]  # fmt: skip
    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # this script's own flags are not meant for the CLI
    try:
        cli = PrismaCLI(args=["fit", "--config", str(path), *overrides])
    finally:
        sys.argv = argv
    seconds = time.perf_counter() - start
    model = cli.model.model.eval()
    loader = torch.utils.data.DataLoader(cli.datamodule.test_set, batch_size=500)
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    return {"accuracy": correct / total, "seconds": seconds, "test_images": total}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    results: dict[int, dict[str, dict[str, float]]] = {}
    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n_layers in args.layers:
            for variant in ("mlp", "attn_only"):
                path = config_path(n_layers, variant)
                row = train_and_score(path, args, Path(tmp) / path.stem)
                results.setdefault(n_layers, {})[variant] = row
                print(f"{path.name}: accuracy {row['accuracy']:.3f} in {row['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - total_start

    print()
    print(
        f"Budget per model: {args.steps} steps x batch {args.batch_size} = {args.steps * args.batch_size:,} "
        f"training images (subset {args.subset_size:,} of 737,280 dSprites, rendered on the fly), "
        f"{args.threads} CPU thread(s); accuracy on {args.test_images:,} held-out images; {total / 60:.1f} min in all."
    )
    print()
    print(
        "| **Size** | **NumLayers** | **Attention+MLP** (ours / ViT-Prisma) | **AttentionOnly** (ours / ViT-Prisma) |"
    )
    print("|:--------:|:-------------:|:-----------------:|:-----------------:|")
    for n_layers, row in results.items():
        cells = [
            f"{row[v]['accuracy']:.3f} / {VIT_PRISMA[n_layers][v]:.3f}" if v in row else "-"
            for v in ("mlp", "attn_only")
        ]
        print(f"| **{SIZES[n_layers]}** | **{n_layers}** | {cells[0]} | {cells[1]} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
