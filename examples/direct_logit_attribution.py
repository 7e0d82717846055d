"""Direct logit attribution on the shipped dSprites ViT: which heads and MLPs write each shape's logit.

python examples/direct_logit_attribution.py --out runs/dla

For one sprite of each shape it attributes the predicted class's logit, and the logit difference between the true
shape and another one, to the embeddings, every attention head (with its output bias), every MLP and the biases
after the residual stream, using the cached LayerNorm scales. The parts sum to the model's logit; the script checks
it. Without examples/checkpoints/dsprites-vit-2l a random-weight stand-in runs instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prisma_lightning.backbones import load_hooked_model
from prisma_lightning.datamodules.dsprites import SHAPES, sprite_images
from prisma_lightning.interp import direct_logit_attribution, plot_dla, save_figure

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "dsprites-vit-2l"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="HookedViT folder of the dSprites ViT")
    parser.add_argument("--top", type=int, default=8, help="components to print per image")
    parser.add_argument("--out", type=Path, default=Path("runs/dla"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_hooked_model(str(args.checkpoint))
    shapes = [0, 1, 2]
    images = sprite_images(shapes, model.cfg.image_size, model.cfg.in_channels)
    names = list(SHAPES) if model.cfg.n_classes == len(SHAPES) else [str(i) for i in range(model.cfg.n_classes)]

    dla = direct_logit_attribution(model, images)  # the predicted class of each image
    error = (dla.total - dla.logit).abs().max().item()
    print(f"{len(dla.labels)} components; |sum of contributions - logit| = {error:.2e} (checked < 1e-4)")
    assert error < 1e-4, "the contributions must sum to the logit"
    predicted = model(images).argmax(-1).tolist()
    for b, shape in enumerate(shapes):
        order = dla.contributions[:, b].abs().argsort(descending=True)[: args.top]
        parts = ", ".join(f"{dla.labels[i]} {dla.contributions[i, b]:+.3f}" for i in order)
        print(f"{SHAPES[shape]:>8} -> '{names[predicted[b]]}' logit {dla.logit[b]:.3f} = ... {parts}")
    save_figure(plot_dla(dla), args.out / "dla_predicted.png", dpi=110)

    # Logit difference: true shape minus the next shape (mod 3), averaged plot over the three images.
    if model.cfg.n_classes >= 3:
        target = torch.tensor(shapes)
        diff = direct_logit_attribution(model, images, target=target, baseline=(target + 1) % 3)
        heads = diff.heads().mean(-1)
        best = divmod(int(heads.abs().argmax()), model.cfg.n_heads)
        values = [round(v, 3) for v in diff.logit.tolist()]
        print(f"logit difference (true - next shape): {values}; largest head on average: L{best[0]}H{best[1]}")
        save_figure(plot_dla(diff), args.out / "dla_logit_diff.png", dpi=110)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()
