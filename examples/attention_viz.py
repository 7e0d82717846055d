"""Attention of the shipped dSprites ViT: a static grid of every head and an interactive HTML page.

python examples/attention_viz.py --out runs/attention
python examples/attention_viz.py --model test/video-tiny --out runs/attention_video  # any registry model

attention_heads.png shows, for the class token (or the mean over patch queries in models without one), where each
head of each layer attends over the image. attention.html is a standalone page (no network): hover a patch to see
its attention over the image, pick a layer and head (or click a head thumbnail), query the class token with a
button, and step through time for video models. Without examples/checkpoints/dsprites-vit-2l a random-weight
stand-in runs instead; with --model a registry model runs on a random image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.datamodules.dsprites import sprite_images
from prisma_lightning.interp import plot_attention_heads, save_attention_html, save_figure

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "dsprites-vit-2l"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="HookedViT folder of the dSprites ViT")
    parser.add_argument("--model", help="a registry name to use instead (random weights, random image)")
    parser.add_argument("--shape", type=int, default=2, help="dSprites shape: 0 square, 1 ellipse, 2 heart")
    parser.add_argument("--out", type=Path, default=Path("runs/attention"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    if args.model:
        model = load_hooked_model(args.model, pretrained=False)
        image = torch.rand(model.example_input().shape[1:])
    else:
        model = load_hooked_model(str(args.checkpoint))
        image = sprite_images([args.shape], model.cfg.image_size, model.cfg.in_channels, pos_x=0.35, pos_y=0.6)[0]

    save_figure(plot_attention_heads(model, image), args.out / "attention_heads.png", dpi=110)
    page = save_attention_html(args.out / "attention.html", model, image, title=f"Attention: {model.cfg.model_name}")
    print(f"{model.cfg.n_layers} layers x {model.cfg.n_heads} heads; page {page.stat().st_size / 1024:.0f} KiB")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}; open attention.html in a browser")


if __name__ == "__main__":
    main()
