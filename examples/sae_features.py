"""SAE features inside the shipped dSprites ViT: splice, steer, and find each feature's top images.

python examples/sae_features.py --out runs/sae_features
python examples/sae_features.py --sae path/to/sae_folder   # an SAE trained with `prisma fit` (or SAELens)

Without --sae a small TopK SAE is trained here for a few hundred steps on the residual stream (all tokens) of
rendered dSprites. Then: (1) `with splice_saes(model, [sae])` splices its reconstruction into the forward pass, which
changes the logits, and with include_error=True leaves them unchanged; (2) feature_steering adds a feature's
decoder direction and shows how the logits move; (3) top_activating scans the data module for each feature's
top images and writes them, with the feature's patch heatmap, as an image grid. Without
examples/checkpoints/dsprites-vit-2l a random-weight stand-in runs instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prisma_lightning.backbones import HookedViT, load_hooked_model
from prisma_lightning.datamodules import DSpritesDataModule
from prisma_lightning.interp import feature_steering, save_top_activating, splice_saes, top_activating
from prisma_lightning.sae import SAEConfig, SparseAutoencoder, make_optimizer, train_step

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "dsprites-vit-2l"


@torch.no_grad()
def collect(model: HookedViT, loader, hook: str, max_batches: int) -> torch.Tensor:
    """Activations ``[n_tokens, d]`` of ``hook`` over a few batches (every token)."""
    rows = []
    for i, (images, _) in enumerate(loader):
        if i >= max_batches:
            break
        _, cache = model.run_with_cache(images, names_filter=hook, stop_at_layer=model.stop_layer_for(hook))
        rows.append(cache[hook].flatten(0, 1))
    return torch.cat(rows)


def train_sae(acts: torch.Tensor, hook: str, expansion: int, steps: int, batch: int) -> SparseAutoencoder:
    cfg = SAEConfig(d_in=acts.shape[-1], expansion_factor=expansion, architecture="topk", k=8, hook_name=hook,
                    b_dec_init="mean", aux_k_coefficient=1 / 32)  # fmt: skip
    sae = SparseAutoencoder(cfg)
    sae.initialize_b_dec(acts[:4096])
    optimizer = make_optimizer(sae, lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        out = train_step(sae, optimizer, acts[torch.randint(len(acts), (batch,), generator=gen)], step=step)
    variance = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    print(f"trained a {cfg.d_sae}-feature TopK SAE on {hook}: {steps} steps, final MSE {out.mse_loss:.4f} "
          f"(activation variance {variance:.4f})")  # fmt: skip
    return sae.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="HookedViT folder of the dSprites ViT")
    parser.add_argument("--sae", type=Path, help="a saved SAE folder (default: train a small one here)")
    parser.add_argument("--hook", default="blocks.0.hook_resid_post", help="hook of the SAE trained here")
    parser.add_argument("--images", type=int, default=512, help="dSprites images (half to train, half to scan)")
    parser.add_argument("--steps", type=int, default=200, help="SAE training steps")
    parser.add_argument("--features", type=int, default=6, help="features to show")
    parser.add_argument("--k", type=int, default=6, help="top images per feature")
    parser.add_argument("--out", type=Path, default=Path("runs/sae_features"), help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = load_hooked_model(str(args.checkpoint))
    size, channels = model.cfg.image_size[0], model.cfg.in_channels
    data = DSpritesDataModule(
        cache=False, subset_size=args.images, val_fraction=0.5, test_fraction=0.0, image_size=size,
        channels=channels, batch_size=64,
    )  # fmt: skip
    data.setup("fit")
    if args.sae is not None:
        sae = SparseAutoencoder.load(args.sae).eval()
    else:
        acts = collect(model, data.train_dataloader(), args.hook, max_batches=max(1, args.images // 128))
        sae = train_sae(acts, args.hook, expansion=4, steps=args.steps, batch=256)

    images = next(iter(data.val_dataloader()))[0][:16]
    with torch.no_grad():
        clean = model(images)
        with splice_saes(model, [sae]):
            spliced = model(images)
        with splice_saes(model, [sae], include_error=True):
            exact = model(images)
    agree = (spliced.argmax(-1) == clean.argmax(-1)).float().mean()
    print(f"spliced SAE: logits move by {(spliced - clean).abs().max():.4f} at most, predictions agree {agree:.0%}; "
          f"with the error term: {(exact - clean).abs().max():.2e}")  # fmt: skip

    # The features that fire most on the validation images.
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=sae.cfg.hook_name)
        mean_acts = sae.encode(cache[sae.cfg.hook_name]).flatten(0, 1).mean(0)
    features = mean_acts.argsort(descending=True)[: args.features].tolist()

    steer = feature_steering(sae, features[0], scale=4.0 * float(mean_acts[features[0]].clamp_min(1e-3)), model=model)
    with torch.no_grad():
        steered = model.run_with_hooks(images, fwd_hooks=steer)
    shift = (steered - clean).mean(0)
    print(f"steering with feature {features[0]}: mean logit change per class {[round(v, 3) for v in shift.tolist()]}")

    result = top_activating(sae, model, data, features, k=args.k, split="val")
    path = save_top_activating(result, args.out / "sae_top_images.png")
    print(f"features {features}: top scores {[round(v, 3) for v in result.values[:, 0].tolist()]} "
          f"over {result.n_images} images")  # fmt: skip
    print(f"wrote {path.name} to {args.out}")


if __name__ == "__main__":
    main()
