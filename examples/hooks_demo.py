"""Hook a ViT, cache its activations, ablate a head, and stop early.

python examples/hooks_demo.py                       # ViT-S/16 architecture, random weights, offline
python examples/hooks_demo.py --pretrained          # the same with timm's pretrained weights (downloads)
python examples/hooks_demo.py --model test/vit-tiny # any registry name (prisma_lightning.list_models())
"""

from __future__ import annotations

import argparse

import torch

from prisma_lightning import list_models, load_hooked_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm/vit_small_patch16_224.augreg_in21k")
    parser.add_argument("--pretrained", action="store_true", help="download weights through the source library")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_hooked_model(args.model, pretrained=args.pretrained)
    cfg = model.cfg
    print(f"{args.model}: {cfg.n_layers} layers, d_model={cfg.d_model}, {cfg.n_heads} heads, {cfg.n_tokens} tokens")
    print(f"{len(model.hook_dict)} hook points; registry has {len(list_models())} names")
    images = torch.randn(args.batch, cfg.in_channels, *cfg.image_size)

    with torch.no_grad():
        logits, cache = model.run_with_cache(
            images, names_filter=lambda name: "blocks.0." in name or "hook_" in name[:5]
        )
    print("\nCached activations (block 0 and the embeddings):")
    for name, value in cache.items():
        print(f"  {name:40s} {tuple(value.shape)}")

    # Ablate head 0 of the last block by zeroing its z vector.
    def ablate_head(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    last = cfg.n_layers - 1
    with torch.no_grad():
        ablated = model.run_with_hooks(images, fwd_hooks=[(f"blocks.{last}.attn.hook_z", ablate_head)])
    print(f"\nAblating L{last}H0 moves the output by {(ablated - logits).abs().max():.4f} (max abs change)")

    with torch.no_grad():
        resid, early = model.run_with_cache(
            images, names_filter=f"blocks.{last // 2}.hook_resid_post", stop_at_layer=last // 2 + 1
        )
    print(f"stop_at_layer={last // 2 + 1} returns the residual {tuple(resid.shape)}: "
          f"equal to the cache: {torch.equal(resid, early['resid_post', last // 2])}")  # fmt: skip


if __name__ == "__main__":
    main()
