"""Logit lens on the shipped dSprites ViT, and ViT-Prisma's emoji logit lens on a CLIP model.

python examples/logit_lens.py --out runs/logit_lens
python examples/logit_lens.py --clip-model openai/clip-vit-base-patch32 --pretrained --image cat.jpg  # downloads

Part 1 reads the residual stream of examples/checkpoints/dsprites-vit-2l after every block (per patch, through
ln_final and the head) and draws a layer x token heatmap and the top class of every patch. Without the checkpoint a
random-weight stand-in runs instead. Part 2 does the same for a CLIP vision tower through its projection and a
zero-shot classifier over the 1000 ImageNet classes, drawn as emoji (matplotlib figure and an HTML page). Offline,
the CLIP weights and the class embeddings are random, so the labels are arbitrary; --pretrained downloads both.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from prisma_lightning.backbones import (
    HookedViT,
    HookedViTConfig,
    ZeroShotClassifier,
    imagenet_class_names,
    load_hooked_model,
)
from prisma_lightning.datamodules.dsprites import SHAPES, sprite_images
from prisma_lightning.interp import (
    logit_lens,
    plot_emoji_logit_lens,
    plot_logit_lens_grid,
    plot_logit_lens_heatmap,
    save_emoji_logit_lens_html,
    save_figure,
)

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "dsprites-vit-2l"
SHAPE_EMOJI = {0: "⬛", 1: "⬮", 2: "❤"}


def tiny_clip() -> HookedViT:
    """A CLIP-shaped vision tower (ln_pre, quick_gelu, class token, projection head) small enough for tests."""
    cfg = HookedViTConfig(
        d_model=32, n_layers=2, n_heads=4, image_size=32, patch_size=8, ln_pre=True, act_fn="quick_gelu",
        head="projection", projection_dim=16, model_name="tiny-clip",
    )  # fmt: skip
    return HookedViT(cfg).eval()


def clip_and_classifier(name: str, pretrained: bool) -> tuple[HookedViT, ZeroShotClassifier]:
    if pretrained:
        import transformers

        source = transformers.CLIPModel.from_pretrained(name)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(name)
        model = load_hooked_model(name, pretrained=True)
        return model, ZeroShotClassifier.from_clip(source, tokenizer, templates=["a photo of a {}."])
    model = tiny_clip() if name == "tiny" else load_hooked_model(name, pretrained=False)
    weights = torch.nn.functional.normalize(torch.randn(model.cfg.d_out, 1000), dim=0)  # random "text" embeddings
    return model, ZeroShotClassifier(weights, logit_scale=100.0, class_names=imagenet_class_names())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="HookedViT folder of the dSprites ViT")
    parser.add_argument(
        "--clip-model",
        default="openai/clip-vit-base-patch32",
        help="registry name of a CLIP model, or 'tiny' for a tiny random CLIP-shaped tower",
    )
    parser.add_argument("--pretrained", action="store_true", help="download CLIP weights and text embeddings")
    parser.add_argument("--image", type=Path, help="an image file for the CLIP part (default: a rendered sprite)")
    parser.add_argument("--out", type=Path, default=Path("runs/logit_lens"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # Part 1: the dSprites ViT.
    model = load_hooked_model(str(args.checkpoint))
    images = sprite_images([0, 1, 2], model.cfg.image_size, model.cfg.in_channels)
    names = list(SHAPES) if model.cfg.n_classes == len(SHAPES) else None
    lens = logit_lens(model, images, class_names=names)
    final = lens.pooled_logits[-1]
    print(f"dSprites ViT: {len(lens.layer_labels)} lens entries x {lens.logits.shape[2]} tokens")
    print(f"  last entry equals the model's logits: {torch.allclose(final, model(images).float(), atol=1e-5)}")
    for layer, label in enumerate(lens.layer_labels):
        top = lens.pooled_logits[layer].argmax(-1).tolist()
        print(f"  {label:>10}: pooled top class per image {[lens.class_names[i] for i in top]}")
    save_figure(plot_logit_lens_heatmap(lens, image=2), args.out / "logit_lens_heatmap.png", dpi=110)
    emoji = SHAPE_EMOJI if model.cfg.n_classes == 3 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a missing emoji font only means names are drawn
        grid = plot_logit_lens_grid(lens, images, layers=None, image=2, emoji=emoji)
    save_figure(grid, args.out / "logit_lens_patches.png", dpi=110)

    # Part 2: CLIP through its projection and a zero-shot classifier, shown as emoji.
    clip, classifier = clip_and_classifier(args.clip_model, args.pretrained)
    if args.image is not None:
        from PIL import Image

        picture = clip.preprocess()(Image.open(args.image).convert("RGB"))[None]
    else:
        picture = sprite_images([2], clip.cfg.image_size, clip.cfg.in_channels, pos_x=0.3, pos_y=0.6)
    clip_lens = logit_lens(clip, picture, classifier=classifier)
    top = clip_lens.top_labels(layer=-1, k=1)
    print(f"CLIP ({args.clip_model}): final top class of the first patches: {[t[0] for t in top[:4]]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        save_figure(plot_emoji_logit_lens(clip_lens, picture), args.out / "emoji_logit_lens.png", dpi=110)
    save_emoji_logit_lens_html(args.out / "emoji_logit_lens.html", clip_lens, picture)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()
